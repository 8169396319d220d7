"""Periodic checkpoints: DIR/checkpoints/step_XXXXXX.ckpt every N steps (the newest `keep_last` kept) and
last.ckpt, always holding the final state. Files are written atomically by checkpoint.files.AtomicCheckpointIO."""

from __future__ import annotations

import os
from dataclasses import dataclass

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from sdtrain.checkpoint.format import STEP_NAME


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    every_n_steps: int = 500
    """DIR/checkpoints/step_XXXXXX.ckpt every this many steps, and last.ckpt with each."""
    keep_last: int = 3
    """Step checkpoints kept besides last.ckpt; -1 keeps all."""


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that always leaves the final state in last.ckpt.

    Lightning writes last.ckpt at the end of training only if no checkpoint was ever written, so a run whose
    max_steps is not a multiple of every_n_train_steps would end with a stale last.ckpt.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def run_checkpoint(cfg: CheckpointConfig, run_dir: str) -> RunCheckpoint:
    return RunCheckpoint(
        dirpath=os.path.join(run_dir, "checkpoints"),
        filename=STEP_NAME,
        auto_insert_metric_name=False,
        every_n_train_steps=cfg.every_n_steps,
        save_top_k=cfg.keep_last,
        monitor="step" if cfg.keep_last >= 0 else None,
        mode="max",
        save_last=True,
        save_on_train_epoch_end=True,
        enable_version_counter=False,  # last.ckpt is replaced (atomically), never last-v1.ckpt
    )
