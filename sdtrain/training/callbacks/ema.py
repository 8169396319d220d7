"""Runs the EMA update after optimizer steps and keeps the EMA weights in the checkpoint."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import lightning as L

from sdtrain.models.ema import EMAConfig, EMAWeights, ema_decay


class EMACallback(L.Callback):
    def __init__(self, cfg: EMAConfig) -> None:
        self.cfg = cfg
        self.ema: EMAWeights | None = None
        self._pending: dict[str, Any] | None = None  # restored state, applied once the model exists
        self._last_step = -1

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ema = EMAWeights(pl_module.unet)
        if self._pending is not None:
            self.ema.load_state_dict(self._pending)
            # trainer.global_step is not restored yet at on_fit_start; the saved step is the one to continue from
            self._last_step = int(self._pending.get("last_step", trainer.global_step))
            self._pending = None
        else:
            self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step  # counts optimizer steps; unchanged across accumulation micro-batches
        if self.ema is None or step == self._last_step:
            return
        self._last_step = step
        if step <= self.cfg.start_step:
            self.ema.copy_from(pl_module.unet)
        elif step % self.cfg.update_every == 0:
            self.ema.update(pl_module.unet, ema_decay(self.ema.num_updates, self.cfg.decay, self.cfg.warmup))

    @contextmanager
    def swapped(self, pl_module: L.LightningModule) -> Iterator[None]:
        with self.ema.swapped_into(pl_module.unet) if self.ema is not None else nullcontext():
            yield

    def state_dict(self) -> dict[str, Any]:
        if self.ema is None:
            return self._pending or {}
        return {**self.ema.state_dict(), "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._pending = state_dict


def find_ema(trainer: L.Trainer) -> EMACallback | None:
    return next((c for c in trainer.callbacks if isinstance(c, EMACallback)), None)
