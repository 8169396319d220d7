"""Runs the EMA update after optimizer steps and keeps the EMA weights in the checkpoint."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import lightning as L

from sdtrain.checkpoint.format import EMA_STATE_KEY
from sdtrain.models.ema import EMAWeights, ema_decay


@dataclass(kw_only=True, slots=True)
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999
    """Target decay. Short CPU runs want ~0.99-0.999: decay d keeps d**n of the weights from n updates ago."""
    warmup: int = 10
    """Effective decay is min(decay, (1 + n) / (warmup + n)) after n updates; 0 = constant decay."""
    start_step: int = 0
    """Before this global step the EMA just copies the weights."""
    update_every: int = 1
    """Update every this many optimizer steps (the decay is applied per update, not per step)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")
        if self.update_every < 1 or self.warmup < 0 or self.start_step < 0:
            raise ValueError("update_every must be >= 1; warmup and start_step >= 0")


class EMACallback(L.Callback):
    def __init__(self, cfg: EMAConfig) -> None:
        self.cfg = cfg
        self.ema: EMAWeights | None = None
        self._pending: dict[str, Any] | None = None  # restored state, applied once the model exists
        self._last_step = -1

    @property
    def state_key(self) -> str:
        return EMA_STATE_KEY  # where checkpoints keep the EMA weights (checkpoint/format.py)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ema = EMAWeights(pl_module.trained_model)  # the U-Net, or the VAE job's autoencoder
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
