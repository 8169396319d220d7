"""Validation loss at fixed timesteps (MLPerf style) on a held-out latent set, every N steps, on all ranks.

Every evaluation uses the same samples, posterior draws, timesteps (evenly spaced over the schedule) and noise
(seeded per sample index), so the curve moves only because the model does, and the number does not depend on
the world size. The loss is the plain MSE to the training target (no min-SNR weights): comparable across runs
whose loss weighting differs. Logged as val/loss (mean over timesteps) and val/loss_tNNN.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from sdtrain.data.holdout import HoldoutSet, load_holdout
from sdtrain.data.loader import batch_time_ids
from sdtrain.data.shards import ShardSet
from sdtrain.errors import ConfigError
from sdtrain.models.conditioning import encode_text, unet_kwargs
from sdtrain.models.diffusers_parts import vae_scale_factor
from sdtrain.seeding import validation_generator
from sdtrain.training.callbacks.ema import find_ema

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class ValidationConfig:
    every_n_steps: int = 0
    """0 = off. Needs data.val_shards."""
    timesteps: int = 8
    max_samples: int = 512
    batch_size: int = 64
    seed: int = 0
    at_start: bool = True
    """Also evaluate before the first step (the baseline the curve falls from)."""
    weights: str = "raw"
    """raw | ema (the EMA weights, swapped in for the evaluation)."""

    def __post_init__(self) -> None:
        if self.weights not in ("raw", "ema"):
            raise ValueError(f"weights must be raw or ema, got {self.weights!r}")
        if self.timesteps < 1 or self.max_samples < 1 or self.batch_size < 1:
            raise ValueError("timesteps, max_samples and batch_size must be >= 1")


def fixed_timesteps(count: int, num_train_timesteps: int) -> list[int]:
    """`count` timesteps at the centres of equal slices of [0, T): 8 of 1000 -> 62, 187, ..., 937."""
    return [int((i + 0.5) * num_train_timesteps / count) for i in range(count)]


def rank_batches(indices: list[int], rank: int, world_size: int, batch_size: int) -> list[list[int]]:
    """This rank's batches of `indices` (every world_size-th from `rank`); every rank gets the same number of
    batches, padded with empty ones."""
    mine = indices[rank::world_size]
    batches = math.ceil(math.ceil(len(indices) / world_size) / batch_size)
    return [mine[b * batch_size : (b + 1) * batch_size] for b in range(batches)]


class FixedTimestepValidation(L.Callback):
    def __init__(self, cfg: ValidationConfig, shard_set: ShardSet, *, latent_key: str = "auto") -> None:
        self.cfg = cfg
        self.shard_set = shard_set
        self.latent_key = latent_key
        self.holdout: HoldoutSet | None = None
        self.history: list[tuple[int, float]] = []
        self._last_step = -1

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.objective.cfg.inpainting:
            raise ConfigError(
                "callbacks.validation does not feed an inpainting U-Net's mask channels yet; set "
                "callbacks.validation.every_n_steps=0 with diffusion.inpainting=true"
            )
        self.holdout = load_holdout(
            self.shard_set,
            tokenizer=pl_module.tokenizer,
            latent_channels=pl_module.unet.config.in_channels,
            normalizer=pl_module.normalizer,
            latent_key=self.latent_key,
            max_samples=self.cfg.max_samples,
            seed=self.cfg.seed,
        )
        log.info("validation: %d held-out samples x %d timesteps", len(self.holdout), self.cfg.timesteps)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.cfg.at_start and trainer.global_step == 0:
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.cfg.every_n_steps > 0 and step % self.cfg.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def noise(self, index: int, shape: tuple[int, ...]) -> torch.Tensor:
        generator = validation_generator(self.cfg.seed, index)
        return torch.randn((self.cfg.timesteps, *shape), generator=generator)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """All ranks call this (the same number of forward passes each); returns the metrics on every rank."""
        assert self.holdout is not None
        self._last_step = trainer.global_step
        objective = pl_module.objective
        timesteps = fixed_timesteps(self.cfg.timesteps, objective.cfg.num_train_timesteps)
        device = pl_module.device
        sums = torch.zeros(len(timesteps), dtype=torch.float64, device=device)
        count = torch.zeros(1, dtype=torch.float64, device=device)
        ema = find_ema(trainer) if self.cfg.weights == "ema" else None
        was_training = pl_module.unet.training
        pl_module.unet.eval()
        try:
            with ema.swapped(pl_module) if ema is not None else nullcontext():
                for group in self.holdout.groups():  # one latent shape at a time (aspect buckets)
                    for chunk in rank_batches(group, trainer.global_rank, trainer.world_size, self.cfg.batch_size):
                        weight = torch.ones(len(chunk), dtype=torch.float64, device=device)
                        if not chunk:  # this rank ran out: a dummy batch keeps collectives (ZeRO-3/FSDP) in step
                            chunk, weight = group[:1], torch.zeros(1, dtype=torch.float64, device=device)
                        sums += self._batch_losses(trainer, pl_module, chunk, timesteps) @ weight
                        count += weight.sum()
        finally:
            pl_module.unet.train(was_training)
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
            dist.all_reduce(count)
        per_t = (sums / count).tolist()
        metrics = {"val/loss": sum(per_t) / len(per_t)}
        metrics.update({f"val/loss_t{t:03d}": v for t, v in zip(timesteps, per_t, strict=True)})
        self.history.append((trainer.global_step, metrics["val/loss"]))
        if trainer.global_rank == 0:
            log.info("step %d: val/loss %.5f", trainer.global_step, metrics["val/loss"])
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        return metrics

    def _batch_losses(
        self, trainer: L.Trainer, pl_module: L.LightningModule, chunk: list[int], timesteps: list[int]
    ) -> torch.Tensor:
        """(T, B) plain MSE per timestep and sample."""
        assert self.holdout is not None
        device = pl_module.device
        latents = self.holdout.stacked(chunk).to(device)
        text = encode_text(pl_module.text_encoder, self.holdout.tokens[chunk].to(device))
        micro = None
        if text.pooled is not None:
            sizes = [self.holdout.sizes[i] for i in chunk]
            micro = batch_time_ids(sizes, latents.shape[-2:], vae_scale_factor(pl_module.vae)).to(device)
        conditioning = unet_kwargs(text, micro)
        noise = torch.stack([self.noise(i, tuple(latents.shape[1:])) for i in chunk]).to(device)
        losses = []
        with trainer.precision_plugin.forward_context():
            for j, t in enumerate(timesteps):
                ts = torch.full((len(chunk),), t, device=device, dtype=torch.long)
                noisy, target = pl_module.objective.noisy_and_target(latents, noise[:, j], ts)
                pred = pl_module.unet(noisy, ts, **conditioning).sample
                losses.append((pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3)).double())
        return torch.stack(losses)
