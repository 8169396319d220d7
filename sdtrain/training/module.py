"""The LightningModule: one training step = text encode (frozen) -> noise -> U-Net -> weighted MSE.

Reproducibility: the noise and timesteps of every micro-batch come from a generator seeded by
(seed, rank, global step, micro-batch), so a resumed run draws exactly what the uninterrupted one would have,
with no generator state to carry. The global torch/numpy/python RNG states of every rank are saved as well
(for anything else random, e.g. dropout) and put back before the first step after a resume.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities.enums import GradClipAlgorithmType
from torch import nn

from sdtrain.checkpoint.format import SDTRAIN_KEY, SPEC_KEY, sdtrain_state
from sdtrain.data.loader import Tokenizer
from sdtrain.data.normalizer import LatentNormalizer
from sdtrain.diffusion.objective import DiffusionObjective
from sdtrain.errors import CheckpointError
from sdtrain.models.conditioning import TextStates, encode_text, unet_kwargs
from sdtrain.models.lora import trainable_names
from sdtrain.seeding import get_rng_state, set_rng_state, step_generator
from sdtrain.training.log_steps import logs_this_step
from sdtrain.training.metrics import training_flops_per_image
from sdtrain.training.nonfinite import NonfiniteGuard
from sdtrain.training.optim import OptimConfig, build_optimizer

log = logging.getLogger(__name__)


class LatentDiffusionModule(L.LightningModule):
    """Holds the trainable U-Net and the frozen parts sampling needs (text encoder, VAE, tokenizer)."""

    def __init__(
        self,
        *,
        unet: nn.Module,
        text_encoder: nn.Module,
        vae: nn.Module,
        tokenizer: Tokenizer,
        objective: DiffusionObjective,
        optim: OptimConfig,
        normalizer: LatentNormalizer,
        latent_shape: tuple[int, ...],
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.vae = vae
        self.tokenizer = tokenizer
        self.objective = objective
        self.optim = optim
        self.normalizer = normalizer
        self.latent_shape = latent_shape
        self.seed = seed
        self.skipped: Counter[str] = Counter()
        self.source_samples: Counter[str] = Counter()  # data.sources: samples this rank took from each source
        self.nonfinite = NonfiniteGuard(optim)
        self._micro = (-1, 0)  # (global step, micro-batch index within it)
        self._pending_rng: dict[str, Any] | None = None
        self.run_metadata: dict[str, Any] = {}  # saved with checkpoints (e.g. the W&B run id)
        self._empty_context: torch.Tensor | None = None  # the frozen encoder's states for "", made once
        self.sample_shapes: list[tuple[int, ...]] = [tuple(latent_shape)]  # aspect buckets: a grid per shape
        self.spec: dict[str, Any] = {}  # how to rebuild the model from the checkpoint alone (checkpoint/spec.py)

    @property
    def trained_model(self) -> nn.Module:
        """What EMA follows."""
        return self.unet

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One training sample's shape, where the default FLOP count is taken (see ThroughputCallback)."""
        return tuple(self.latent_shape)

    def training_flops_per_image(self, latent_shape: tuple[int, ...] | None = None) -> int:
        """U-Net forward + backward and the frozen text encoder's forward, for MFU, at `latent_shape` (an aspect
        bucket's; default the data's first)."""
        shape = tuple(latent_shape or self.latent_shape)
        return training_flops_per_image(self.unet, shape, self.text_encoder, self.tokenizer.context_length)

    def forward(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextStates, micro: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.unet(noisy, timesteps, **unet_kwargs(text, micro)).sample

    def text_states(self, batch: dict[str, Any]) -> TextStates:
        """The frozen encoders' states for the batch's captions: encoded now from tokens, or pre-encoded
        (`text.npy`, SDXL's `pooled.npy`). Dropped captions (CFG training) get the empty prompt's states
        (SD 1.x/2.x) or zeros (SDXL, whose loader sends them as `dropped` beside the tokens)."""
        if "context" not in batch:
            states = encode_text(self.text_encoder, batch["tokens"])
            return states.zeroed(batch["dropped"]) if "dropped" in batch else states
        if "pooled" in batch:
            return TextStates(batch["context"], batch["pooled"]).zeroed(batch["dropped"])
        context = batch["context"]
        if self._empty_context is None or self._empty_context.device != context.device:
            self._empty_context = self.text_encoder(self.tokenizer([""]).to(context.device))
        # unconditionally: asking whether any caption dropped would be a host sync every step
        dropped = batch["dropped"].to(context.device)[:, None, None]
        return TextStates(torch.where(dropped, self._empty_context.to(context.dtype), context))

    def noise_generator(self, device: torch.device) -> torch.Generator:
        step, micro = self._micro
        self._micro = (self.global_step, micro + 1 if step == self.global_step else 0)
        return step_generator(self.seed, self.global_rank, self.global_step, self._micro[1], device)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        torch.compiler.cudagraph_mark_step_begin()  # compile_mode=reduce-overhead: a new step, new graph outputs
        latents = batch["latents"]
        generator = self.noise_generator(latents.device)
        noise = self.objective.sample_noise(latents, generator)
        timesteps = self.objective.sample_timesteps(latents.shape[0], latents.device, generator)
        noisy, target = self.objective.noisy_and_target(
            latents, noise, timesteps, self.objective.input_noise(noise, generator)
        )
        if self.objective.cfg.inpainting:  # the SD inpainting layout: noisy latents ++ mask ++ masked-image latents
            noisy = torch.cat([noisy, batch["mask"].to(noisy.dtype), batch["masked_latents"].to(noisy.dtype)], dim=1)
        prediction = self(noisy, timesteps, self.text_states(batch), batch.get("time_ids"))
        loss = self.objective.loss(prediction, target, timesteps, batch.get("loss_mask"))
        self.skipped.update(batch.get("skipped") or {})
        self.source_samples.update(batch.get("sources") or {})
        if (self.skipped or self.source_samples) and logs_this_step(self.trainer):
            if self.skipped:
                self.log("data/skipped", float(sum(self.skipped.values())))
            for name, count in self.source_samples.items():
                self.log(f"data/samples/{name}", float(count))
        if self.nonfinite.on_device:
            self.log("train/loss", loss)  # a device tensor: no copy, no read
            return self.nonfinite.poison(loss)
        if not self.nonfinite.finite_everywhere(self.trainer, loss):
            self.nonfinite.skip_now(self.trainer, loss, self.global_step)
            self.log("train/nonfinite_skips", float(self.nonfinite.skips))
            return None  # Lightning skips backward and the parameter update
        self.log("train/loss", loss)  # a device tensor: no copy, no read
        return loss

    @property
    def nonfinite_skips(self) -> int:
        return self.nonfinite.skips

    def on_train_start(self) -> None:
        self.nonfinite.choose(self.trainer)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.nonfinite.on_device and logs_this_step(self.trainer):
            self._read_nonfinite_count()

    def on_train_end(self) -> None:
        self.nonfinite.check(self.global_step)

    def _read_nonfinite_count(self) -> None:
        before = self.nonfinite.skips
        if self.nonfinite.check(self.global_step) != before:
            self.log("train/nonfinite_skips", float(self.nonfinite.skips))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """train/grad_norm (the U-Net's total L2 norm, on the device: no host sync) and train/lr."""
        if logs_this_step(self.trainer):
            self.log("train/lr", float(optimizer.param_groups[0]["lr"]))
        grads = [p.grad for p in self.unet.parameters() if p.grad is not None]
        if grads:  # under DeepSpeed ZeRO the gradients live in its partitions: none to measure here
            norm = torch.nn.utils.get_total_norm(grads)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            self.log("train/grad_norm", norm)
            if self.nonfinite.on_device:
                self.nonfinite.gate(optimizer, norm)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._pending_rng is not None:  # after the dataloader started, right before the first resumed step
            set_rng_state(self._pending_rng)
            self._pending_rng = None

    def configure_model(self) -> None:
        # Sharding strategies (FSDP2) wrap the U-Net here, before optimizers exist; others have nothing to do.
        parallelize = getattr(self.trainer.strategy, "parallelize_unet", None)
        if parallelize is not None and not getattr(self, "_parallelized", False):
            parallelize(self.unet)
            self._parallelized = True

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # Lightning's mixed-precision plugin refuses to clip for any optimizer that could unscale gradients itself
        # (fused AdamW), even in bf16, where nothing is scaled; clip as its base plugin does then.
        plugin = self.trainer.precision_plugin
        if isinstance(plugin, MixedPrecision) and plugin.scaler is None and gradient_clip_val:
            algorithm = GradClipAlgorithmType(gradient_clip_algorithm or "norm")
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> dict[str, Any]:
        optim = self.optim
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None and self.trainer.gradient_clip_val:
            optim = dataclasses.replace(optim, fused=False)  # fp16: clipping needs unscaled grads before the step
        optimizer, scheduler = build_optimizer(
            [p for p in self.unet.parameters() if p.requires_grad],  # LoRA: the adapters only
            optim,
            self.trainer.max_steps,
            cpu_adam=getattr(self.trainer.strategy, "optimizer_on_cpu", False),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite.check(self.global_step)  # the saved count is the true one
        # Lightning builds the checkpoint on every rank and rank 0 writes it: gather each rank's RNG state.
        states = [get_rng_state()]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, get_rng_state())
        if self.spec.get("lora"):  # small checkpoints: the adapters; the base comes back from model.pretrained
            kept = {f"unet.{name}" for name in trainable_names(self.unet)}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in kept}
        checkpoint[SDTRAIN_KEY] = {
            "latent_shape": list(self.latent_shape),
            "skipped": dict(self.skipped),
            "source_samples": dict(self.source_samples),
            "nonfinite_skips": self.nonfinite.skips,
            "rng": states,
            SPEC_KEY: self.spec,
            **self.run_metadata,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = sdtrain_state(checkpoint)
        # a LoRA checkpoint holds the adapters only (strict_loading is off): each must be there (sharded
        # strategies load the weights themselves, before this hook, and leave no state_dict here)
        if self.spec.get("lora") and "state_dict" in checkpoint:
            wanted = {f"unet.{name}" for name in trainable_names(self.unet)}
            missing = sorted(wanted - set(checkpoint.get("state_dict", {})))
            if missing:
                raise CheckpointError(
                    f"the checkpoint lacks {len(missing)} of this run's LoRA adapter tensors (first: {missing[0]}): "
                    "it was trained with other model.lora settings (or without LoRA)"
                )
        self.skipped = Counter(state.get("skipped", {}))
        self.source_samples = Counter(state.get("source_samples", {}))
        self.nonfinite.skips = int(state.get("nonfinite_skips", 0))
        saved = state.get("latent_shape")
        if saved is not None and tuple(saved) != tuple(self.latent_shape):
            raise CheckpointError(f"checkpoint was trained on latents {tuple(saved)}, the data has {self.latent_shape}")
        rng = state.get("rng") or []
        rank = self.trainer.global_rank if self._trainer is not None else 0
        self._pending_rng = rng[rank] if rank < len(rng) else None
