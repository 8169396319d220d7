"""Samples/s (all ranks) in the progress bar and the logs, measured between optimizer steps."""

from __future__ import annotations

import time
from typing import Any

import lightning as L


class SpeedCallback(L.Callback):
    def __init__(self) -> None:
        self._t0: float | None = None
        self._samples = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        self._samples += int(batch["latents"].shape[0]) * trainer.world_size
        if self._t0 is None:  # the first step includes start-up; start measuring after it
            self._t0, self._samples = now, 0
            return
        elapsed = now - self._t0
        if elapsed > 0:
            pl_module.log("train/samples_per_s", self._samples / elapsed, prog_bar=True)
        self._t0, self._samples = now, 0
