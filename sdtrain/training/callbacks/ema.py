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
        self._last_step = trainer.global_step
        if self._pending is not None:
            self._restore(self._pending)

    def _restore(self, state: dict[str, Any]) -> None:
        self.ema.load_state_dict(state)
        # trainer.global_step may not be restored yet; the saved step is the one to continue from
        self._last_step = int(state.get("last_step", self._last_step))
        self._pending = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step  # counts optimizer steps; unchanged across accumulation micro-batches
        if self.ema is None or step == self._last_step:
            return
        self._last_step = step
        if step <= self.cfg.start_step:
            self.ema.copy_from()
        elif step % self.cfg.update_every == 0:
            self.ema.update(ema_decay(self.ema.num_updates, self.cfg.decay, self.cfg.warmup))

    @contextmanager
    def swapped(self, pl_module: L.LightningModule) -> Iterator[None]:
        with self.ema.swapped_into() if self.ema is not None else nullcontext():
            yield

    def state_dict(self) -> dict[str, Any]:
        if self.ema is None:
            return self._pending or {}
        return {**self.ema.state_dict(), "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        # Single-file checkpoints are restored before on_fit_start (the model's EMA does not exist yet);
        # sharded ones (DeepSpeed, FSDP) after it, once the strategy has wrapped the model.
        if self.ema is None:
            self._pending = state_dict
        else:
            self._restore(state_dict)


def find_ema(trainer: L.Trainer) -> EMACallback | None:
    return next((c for c in trainer.callbacks if isinstance(c, EMACallback)), None)
