"""Loggers from `conf/logger/*`: csv (default), tensorboard, wandb (WANDB_MODE=offline works without network),
none. Each gets the resolved config as its hyperparameters (launch/train.py)."""

from __future__ import annotations

import os
import secrets
import string
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger

from sdtrain.errors import ConfigError

WANDB_ID_FILE = "wandb_run_id.txt"


def _wandb_run_id(run_dir: str, resumed_id: str | None) -> str:
    """The run id stored in the run folder (else the resumed checkpoint's), so a resumed run logs into the same
    W&B run; a new id for a new run."""
    path = os.path.join(run_dir, WANDB_ID_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    run_id = resumed_id or "".join(
        secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8)
    )  # W&B's id shape
    os.makedirs(run_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(run_id)
    return run_id


SECRET_WORDS = ("key", "token", "secret", "password")


def build_loggers(cfg: dict[str, Any], run_dir: str, rank: int, resumed_id: str | None = None) -> list[Logger]:
    options = dict(cfg)
    secret = [k for k in options if any(word in k.lower() for word in SECRET_WORDS)]
    if secret:
        raise ConfigError(
            f"logger.{secret[0]} looks like a secret: configs are saved in the run folder, so pass it in the "
            "environment (e.g. WANDB_API_KEY) instead"
        )
    kind = options.pop("kind", "csv")
    if kind == "none":
        return []
    if kind == "csv":
        # A new version_N folder per (re)start: a resumed run never overwrites the earlier metrics.csv.
        return [CSVLogger(save_dir=run_dir, name="logs", **options)]
    if kind == "tensorboard":  # DIR/logs/version_N/events.out.tfevents.* (+ hparams.yaml)
        return [TensorBoardLogger(save_dir=run_dir, name="logs", default_hp_metric=False, **options)]
    if kind == "wandb":
        # Only rank 0 creates the id file; other ranks' WandbLogger is a no-op (rank_zero_only experiment).
        run_id = _wandb_run_id(run_dir, resumed_id) if rank == 0 else None
        return [WandbLogger(save_dir=run_dir, id=run_id, resume="allow", **options)]
    raise ConfigError(f"logger.kind={kind!r} is not known (csv, tensorboard, wandb, none)")
