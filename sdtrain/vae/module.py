"""The first stage's LightningModule: one step = encode -> posterior sample -> decode -> loss.py's objective.

The posterior draw of every micro-batch comes from a generator seeded by (seed, rank, global step, micro-batch),
as the U-Net's noise does, so a resumed run computes exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from diffusers import AutoencoderKL

from sdtrain.checkpoint.format import SDTRAIN_KEY, sdtrain_state
from sdtrain.errors import CheckpointError
from sdtrain.models.diffusers_parts import VAEConfig
from sdtrain.seeding import step_generator
from sdtrain.training.log_steps import logs_this_step
from sdtrain.training.metrics import autoencoder_training_flops
from sdtrain.training.optim import OptimConfig, build_optimizer
from sdtrain.vae.losses import (
    InceptionPerceptual,
    PatchDiscriminator,
    VAELossConfig,
    gan_losses,
    perturb_latents,
    reconstruction_loss,
)

ENCODER_PREFIXES = ("encoder.", "quant_conv.")  # what decides the latents (models/diffusers_parts.py)


@dataclass(kw_only=True, slots=True)
class AutoencoderModelConfig(VAEConfig):
    """`model.*` of `sdtrain-train-vae`: a diffusers AutoencoderKL from `config`, or `pretrained` (a diffusers VAE
    folder, a pipeline folder's vae/, or a diffusers-named single file loaded into `config`)."""

    train: str = "all"
    """all | decoder: `decoder` keeps the encoder (and so the latent space of existing shards) frozen, as SD's
    ft-MSE/ft-EMA VAEs were fine-tuned."""

    def __post_init__(self) -> None:
        if self.train not in ("all", "decoder"):
            raise ValueError(f"train must be all or decoder, got {self.train!r}")


class AutoencoderModule(L.LightningModule):
    def __init__(
        self, *, vae: AutoencoderKL, loss: VAELossConfig, optim: OptimConfig, train: str, resolution: int, seed: int
    ) -> None:
        super().__init__()
        self.vae = vae.train()
        for name, param in vae.named_parameters():
            param.requires_grad_(train == "all" or not name.startswith(ENCODER_PREFIXES))
        self.train_encoder = train == "all"
        self.loss_cfg = loss
        self.optim = optim
        self.resolution = resolution
        self.seed = seed
        self.discriminator = PatchDiscriminator(loss.disc_channels, loss.disc_layers) if loss.gan_weight else None
        self.perceptual = InceptionPerceptual(loss.perceptual_size) if loss.perceptual_weight else None
        self._micro = (-1, 0)  # (global step, micro-batch index within it)

    @property
    def trained_model(self) -> torch.nn.Module:
        """What EMA follows and DIR/vae/ is written from."""
        return self.vae

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One training sample's shape, where the default FLOP count is taken (see ThroughputCallback)."""
        return (self.vae.config.in_channels, self.resolution, self.resolution)

    def training_flops_per_image(self, input_shape: tuple[int, ...] | None = None) -> int:
        size = tuple((input_shape or self.input_shape)[-2:])
        return autoencoder_training_flops(dict(self.vae.config), size, self.train_encoder)

    def _generator(self, device: torch.device) -> torch.Generator:
        step, micro = self._micro
        self._micro = (self.global_step, micro + 1 if step == self.global_step else 0)
        return step_generator(self.seed, self.global_rank, self.global_step, self._micro[1], device)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x = batch["pixels"]
        cfg = self.loss_cfg
        with nullcontext() if self.train_encoder else torch.no_grad():
            posterior = self.vae.encode(x).latent_dist
        generator = self._generator(x.device)
        latents = perturb_latents(posterior.sample(generator=generator), cfg.latent_noise, generator)
        reconstruction = self.vae.decode(latents).sample
        terms = {"reconstruction": reconstruction_loss(reconstruction, x, cfg.reconstruction)}
        loss = terms["reconstruction"]
        if self.train_encoder:
            terms["kl"] = posterior.kl().mean()
            loss = loss + cfg.kl_weight * terms["kl"]
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(reconstruction, x)
            loss = loss + cfg.perceptual_weight * terms["perceptual"]
        if self.discriminator is not None:
            # before disc_start both terms are in the graph at weight 0: every rank's DDP sees the same parameters
            on = float(self.global_step >= cfg.disc_start)
            terms["generator"], terms["discriminator"] = gan_losses(self.discriminator, x, reconstruction)
            loss = loss + on * (cfg.gan_weight * terms["generator"] + terms["discriminator"])
        self.log("train/loss", loss)
        if logs_this_step(self.trainer):
            self.log_dict({f"train/{name}": value.detach() for name, value in terms.items()})
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        groups: list[dict[str, Any]] = [{"params": list(self.vae.parameters())}]
        if self.discriminator is not None:
            lr = self.optim.lr * self.loss_cfg.disc_lr_ratio
            groups.append({"params": list(self.discriminator.parameters()), "lr": lr})
        optimizer, scheduler = build_optimizer(
            groups,
            self.optim,
            self.trainer.max_steps,
            cpu_adam=getattr(self.trainer.strategy, "optimizer_on_cpu", False),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[SDTRAIN_KEY] = {"autoencoder": dict(self.vae.config), "resolution": self.resolution}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = sdtrain_state(checkpoint).get("autoencoder")
        if saved is None:
            raise CheckpointError("the checkpoint is not from sdtrain-train-vae (no autoencoder config in it)")
        saved, mine = _plain(saved), _plain(dict(self.vae.config))
        differing = sorted(k for k in set(saved) | set(mine) if not k.startswith("_") and saved.get(k) != mine.get(k))
        if differing:
            raise CheckpointError(f"the checkpoint's autoencoder differs from model.config in {differing}")


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    """A config as JSON sees it (tuples and lists alike), for comparing."""
    return json.loads(json.dumps(config, default=str))
