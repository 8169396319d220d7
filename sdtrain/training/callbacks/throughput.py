"""Images/s, step-time breakdown (data wait vs compute), achieved TFLOP/s and MFU, over each logging window.

data wait = host time from the end of one step to the start of the next (waiting on the DataLoader plus
Lightning's own bookkeeping); compute = the rest. The figures are taken over the steps since the last logging
step (`trainer.log_every_n_steps`), not per step: the hot path has no host sync, so on a GPU the host runs ahead
of the device and a single step's wall time says little, while a window ending where Lightning reads the logged
values (a sync) measures what the device did. Python numbers are handed to `self.log` only on those steps.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from sdtrain.training.log_steps import logs_this_step
from sdtrain.training.metrics import mfu, peak_flops


class ThroughputCallback(L.Callback):
    def __init__(self, *, peak_flops_override: float | None = None) -> None:
        self.peak_flops_override = peak_flops_override
        self.flops_per_image = 0  # at the module's input_shape (the data's first latent shape)
        self._flops_by_shape: dict[tuple[int, ...], int] = {}  # aspect buckets: each shape counted once
        self._flops = 0.0  # this window's, summed per batch at its shape
        self.peak: float | None = None
        self._window_start: float | None = None
        self._last_end = self._wait = 0.0
        self._images = self._steps = 0
        self.images_per_s: float | None = None  # the last window's rate (the progress bar shows it)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flops_per_image = pl_module.training_flops_per_image()
        self._flops_by_shape = {tuple(pl_module.input_shape): self.flops_per_image}
        device = pl_module.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        self.peak = peak_flops(name, str(trainer.precision), self.peak_flops_override)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._window_start, self._images, self._steps, self._wait, self._flops = None, 0, 0, 0.0, 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int) -> None:
        now = time.perf_counter()
        if self._window_start is not None:
            self._wait += now - self._last_end

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        self._last_end = now
        if self._window_start is None:  # the first step includes start-up (worker spawn, first batch)
            self._window_start = now
            return
        self._images += len(batch["keys"])
        self._flops += len(batch["keys"]) * self.flops_at(pl_module, input_shape(batch))
        self._steps += 1
        if logs_this_step(trainer):
            self._log_window(trainer, pl_module, now)

    def flops_at(self, pl_module: L.LightningModule, shape: tuple[int, ...]) -> int:
        """FLOPs per image at a batch's sample shape (counted on the meta device the first time it is seen)."""
        if shape not in self._flops_by_shape:
            self._flops_by_shape[shape] = pl_module.training_flops_per_image(shape)
        return self._flops_by_shape[shape]

    def _log_window(self, trainer: L.Trainer, pl_module: L.LightningModule, now: float) -> None:
        elapsed = max(now - self._window_start, 1e-9)
        per_rank = self._images / elapsed
        achieved = self._flops / elapsed  # each batch at its own bucket's FLOPs
        per_image = self._flops / max(self._images, 1)
        metrics = {
            "perf/images_per_s": per_rank * trainer.world_size,
            "perf/images_per_s_per_rank": per_rank,
            "perf/step_time_s": elapsed / max(self._steps, 1),
            "perf/data_wait_fraction": self._wait / elapsed,
            "perf/tflops_per_s_per_rank": achieved / 1e12,
        }
        utilisation = mfu(per_image, per_rank, self.peak)
        if utilisation is not None:
            metrics["perf/mfu"] = utilisation
        pl_module.log_dict(metrics)
        self.images_per_s = metrics["perf/images_per_s"]
        self._window_start, self._images, self._steps, self._wait, self._flops = now, 0, 0, 0.0, 0.0


def input_shape(batch: dict[str, Any]) -> tuple[int, ...]:
    """One sample's shape: latents for the U-Net, pixels for the VAE."""
    return tuple((batch["latents"] if "latents" in batch else batch["pixels"]).shape[1:])
