"""Every N steps: a grid of fixed prompts x seeds from the EMA weights, to DIR/samples/ and the logger.

Every rank renders its share of the images (padded to equal counts) and rank 0 gathers them. No rank waits for
a long rank-0-only render, so collectives never time out, and the same code works when parameters are sharded.
"""

from __future__ import annotations

import logging
import math
import os
import signal
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import WandbLogger

from sdtrain.diffusion.editing import EditInputs, load_edit_inputs
from sdtrain.diffusion.grid import labelled_grid
from sdtrain.diffusion.sampling import SamplingConfig, generate
from sdtrain.errors import ConfigError
from sdtrain.models.diffusers_parts import vae_scale_factor
from sdtrain.training import signals
from sdtrain.training.callbacks.ema import find_ema

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class SampleScheduleConfig:
    every_n_steps: int = 500
    """DIR/samples/step_XXXXXX.png every this many steps; 0 = only at the end."""
    at_end: bool = True


class SampleGridCallback(L.Callback):
    def __init__(self, cfg: SamplingConfig, *, out_dir: str, every_n_steps: int, at_end: bool = True) -> None:
        self.cfg = cfg
        self.out_dir = out_dir
        self.every_n_steps = every_n_steps
        self.at_end = at_end
        self._last_step = -1
        self._edit: EditInputs | None = None  # the init images (and masks) per prompt, read once

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cfg = self.cfg
        if not cfg.init_images:
            return
        images, masks = list(cfg.init_images), list(cfg.masks)
        if len(images) not in (1, len(cfg.prompts)):
            raise ConfigError(f"callbacks.sampling.init_images: {len(images)} images for {len(cfg.prompts)} prompts")
        if masks and not pl_module.objective.cfg.inpainting:
            raise ConfigError("callbacks.sampling.masks need an inpainting model (diffusion.inpainting=true)")
        images, masks = images * (len(cfg.prompts) // len(images)), masks * (len(cfg.prompts) // len(masks or [1]))
        _, h, w = pl_module.latent_shape
        factor = vae_scale_factor(pl_module.vae)
        self._edit = load_edit_inputs(images, masks, height=h * factor, width=w * factor, strength=cfg.strength)

    def _edit_for(self, indices: list[int]) -> EditInputs | None:
        """The edit inputs of the grid images `indices` (row i = prompt i = init image i)."""
        if self._edit is None:
            return None
        rows = [i // len(self.cfg.seeds) for i in indices]
        masks = self._edit.masks[rows] if self._edit.masks is not None else None
        return EditInputs(self._edit.pixels[rows], masks, self._edit.strength)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.render(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run stopped by SLURM's warning signal is about to be requeued and killed: no time for a final grid.
        if self.at_end and trainer.global_step != self._last_step and not signals.received(signal.SIGUSR1):
            self.render(trainer, pl_module)

    def pairs(self) -> list[tuple[str, int]]:
        return [(p, s) for p in self.cfg.prompts for s in self.cfg.seeds]

    def render(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str | None:
        """All ranks call this; returns the (first) PNG path on rank 0. With aspect buckets one grid per bucket
        shape (`pl_module.sample_shapes`), each at its size; img2img/inpainting grids at the first shape."""
        self._last_step = trainer.global_step
        shapes = list(getattr(pl_module, "sample_shapes", None) or [pl_module.latent_shape])
        shapes = shapes[:1] if self._edit is not None else shapes
        paths = [self._render_shape(trainer, pl_module, tuple(shape), len(shapes) > 1) for shape in shapes]
        return paths[0]

    def _render_shape(
        self, trainer: L.Trainer, pl_module: L.LightningModule, shape: tuple[int, ...], named: bool
    ) -> str | None:
        pairs = self.pairs()
        rank, world = trainer.global_rank, trainer.world_size
        per_rank = math.ceil(len(pairs) / world)
        mine = list(range(rank * per_rank, min(len(pairs), (rank + 1) * per_rank)))
        # Pad with a repeat so every rank runs the same number of forward passes (needed under ZeRO-3/FSDP).
        padded = mine + [mine[-1] if mine else 0] * (per_rank - len(mine))
        ema = find_ema(trainer)
        was_training = pl_module.unet.training
        pl_module.unet.eval()
        try:
            with ema.swapped(pl_module) if ema is not None else torch.no_grad():
                images = generate(
                    unet=pl_module.unet,
                    vae=pl_module.vae,
                    text_encoder=pl_module.text_encoder,
                    tokenizer=pl_module.tokenizer,
                    normalizer=pl_module.normalizer,
                    prompts=[pairs[i][0] for i in padded],
                    seeds=[pairs[i][1] for i in padded],
                    latent_shape=shape,
                    cfg=self.cfg,
                    train_scheduler_config=pl_module.objective.cfg.scheduler_config(),
                    edit=self._edit_for(padded),
                    inpainting=pl_module.objective.cfg.inpainting,
                )
        finally:
            pl_module.unet.train(was_training)
        ours = list(zip(mine, images[: len(mine)].cpu(), strict=True))
        if world > 1 and dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, ours)
            ours = [item for part in gathered for item in part]
        if rank != 0:
            return None
        ordered = [img for _, img in sorted(ours, key=lambda x: x[0])]
        size = f"{images.shape[-1]}x{images.shape[-2]}" if named else None  # width x height, as buckets are named
        return self._save(trainer, torch.stack(ordered), size)

    def _save(self, trainer: L.Trainer, images: torch.Tensor, size: str | None = None) -> str:
        os.makedirs(self.out_dir, exist_ok=True)
        name = f"step_{trainer.global_step:06d}" + (f"_{size}" if size else "")
        path = os.path.join(self.out_dir, f"{name}.png")
        labelled_grid(images, list(self.cfg.prompts), len(self.cfg.seeds)).save(path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):  # each image with its prompt and seed as the caption
                pairs = self.pairs()
                logger.log_image(
                    f"samples/{size}" if size else "samples",
                    list(images),
                    step=trainer.global_step,
                    caption=[f"{prompt} (seed {seed})" for prompt, seed in pairs],
                )
        log.info("sample grid written to %s", path)
        return path
