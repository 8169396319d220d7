"""Images/s, step-time breakdown (data wait vs compute), achieved TFLOP/s and MFU, logged every step.

data wait = host time from the end of one step to the start of the next (waiting on the DataLoader plus
Lightning's own bookkeeping); compute = the step itself (forward, backward, optimizer, callbacks). On a GPU the
step is only measured end to end once the host blocks on the device (the loss logged each step does that).
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from sdtrain.training.metrics import mfu, peak_flops, training_flops_per_image


class ThroughputCallback(L.Callback):
    def __init__(self, *, peak_flops_override: float | None = None) -> None:
        self.peak_flops_override = peak_flops_override
        self.flops_per_image = 0
        self.peak: float | None = None
        self._batch_start: float | None = None
        self._last_end: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flops_per_image = training_flops_per_image(
            pl_module.unet, pl_module.latent_shape, pl_module.text_encoder, pl_module.tokenizer.context_length
        )
        device = pl_module.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        self.peak = peak_flops(name, str(trainer.precision), self.peak_flops_override)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._batch_start is None:
            return
        compute = now - self._batch_start
        wait = self._batch_start - self._last_end if self._last_end is not None else None
        self._last_end = now
        if wait is None:  # the first step includes start-up (worker spawn, first batch); not representative
            return
        step = compute + wait
        per_rank = batch["latents"].shape[0] / step
        achieved = self.flops_per_image * per_rank
        metrics = {
            "perf/images_per_s": per_rank * trainer.world_size,
            "perf/images_per_s_per_rank": per_rank,
            "perf/step_time_s": step,
            "perf/data_wait_s": wait,
            "perf/data_wait_fraction": wait / step,
            "perf/tflops_per_s_per_rank": achieved / 1e12,
        }
        utilisation = mfu(self.flops_per_image, per_rank, self.peak)
        if utilisation is not None:
            metrics["perf/mfu"] = utilisation
        pl_module.log_dict(metrics)
        pl_module.log("img/s", metrics["perf/images_per_s"], prog_bar=True, logger=False)
        if utilisation is not None:
            pl_module.log("mfu", utilisation, prog_bar=True, logger=False)
