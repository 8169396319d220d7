"""What every sdtrain job does around its LightningModule (the U-Net's `sdtrain-train`, the VAE's
`sdtrain-train-vae`): trainer settings, resume, loggers, strategy, the Lightning Trainer, and `fit`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from sdtrain.checkpoint.files import AtomicCheckpointIO, load_checkpoint_meta, state_dict_mismatch
from sdtrain.checkpoint.format import WANDB_ID_KEY, sdtrain_state
from sdtrain.checkpoint.resume import resolve_resume
from sdtrain.config import to_object
from sdtrain.errors import CheckpointError, ConfigError
from sdtrain.launch.config import to_plain
from sdtrain.launch.loggers import build_loggers
from sdtrain.launch.slurm import log_placement
from sdtrain.launch.startup import start_header
from sdtrain.launch.strategy import build_strategy
from sdtrain.training.callbacks.progress import ProgressConfig


@dataclass(slots=True)
class PreparedRun:
    trainer: L.Trainer
    ckpt_path: str | None  # the checkpoint a resumed run continues from
    resumed: dict[str, Any] | None  # its metadata (step, sdtrain state)
    loggers: list[Logger]
    run_dir: str


def prepare_trainer(
    cfg: DictConfig,
    run_dir: str,
    module: L.LightningModule,
    *,
    progress: ProgressConfig,
    batch_size: int,
    make_callbacks: Callable[[bool], list[L.Callback]],
) -> PreparedRun:
    """The Trainer for `cfg.trainer`/`cfg.strategy`/`cfg.logger`/`cfg.resume`; `make_callbacks(progress_bar)`
    gives the job's callbacks (progress_bar: whether the trainer draws one)."""
    trainer_kwargs: dict[str, Any] = to_plain(cfg.trainer)
    if not trainer_kwargs.get("max_steps") or trainer_kwargs["max_steps"] < 1:
        raise ConfigError("trainer.max_steps must be >= 1 (the data stream is endless; steps set the length)")
    log_placement()
    ckpt_path = resolve_resume(cfg.resume, run_dir)
    # A resumed run keeps logging into the W&B run its checkpoint came from.
    resumed = load_checkpoint_meta(ckpt_path) if ckpt_path else None
    resumed_id = sdtrain_state(resumed).get(WANDB_ID_KEY) if resumed else None
    loggers = build_loggers(to_plain(cfg.logger), run_dir, rank_zero_only.rank, resumed_id)
    module.run_metadata = {WANDB_ID_KEY: next((lg.version for lg in loggers if isinstance(lg, WandbLogger)), None)}
    if not progress.bar():  # lines instead (job logs): no bar drawing into a file
        trainer_kwargs["enable_progress_bar"] = False
    trainer_kwargs.setdefault("enable_model_summary", False)  # the start header says it in a few lines
    callbacks = make_callbacks(trainer_kwargs.get("enable_progress_bar", True))
    strategy = build_strategy(to_object(cfg.strategy, "strategy"), trainer_kwargs, batch_size)
    # Under SLURM our RequeueOnSignal does the requeue (into DIR/checkpoints), not Lightning's hpc_ckpt.
    environment = [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []
    try:
        trainer = L.Trainer(
            **trainer_kwargs,
            strategy=strategy,
            logger=loggers or False,
            callbacks=callbacks,
            plugins=[AtomicCheckpointIO(), *environment],
            default_root_dir=run_dir,
            max_epochs=-1,
            limit_val_batches=0,
            num_sanity_val_steps=0,
        )
    except TypeError as exc:
        raise ConfigError(f"trainer: {exc}") from None
    return PreparedRun(trainer, ckpt_path, resumed, loggers, run_dir)


def fit(
    run: PreparedRun,
    cfg: DictConfig,
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    *,
    header: list[str],
) -> L.Trainer:
    """Log the start header (`header`: what the job trains, on what), then train."""
    start_header(
        what=header,
        trainer=run.trainer,
        strategy=str(cfg.strategy.get("kind", "auto")),
        ckpt_path=resume_line(run.ckpt_path, run.resumed),
        run_dir=run.run_dir,
    )
    for logger in run.loggers:  # the resolved config: runs compared by their settings (secrets were refused)
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        run.trainer.fit(module, datamodule=datamodule, ckpt_path=run.ckpt_path)
    except RuntimeError as exc:
        if "Error(s) in loading state_dict" in str(exc):
            mismatch = state_dict_mismatch(exc)
            raise CheckpointError(f"checkpoint {run.ckpt_path} does not fit this model: {mismatch}") from None
        raise
    return run.trainer


def resume_line(ckpt_path: str | None, meta: dict[str, Any] | None) -> str | None:
    """Which checkpoint a resumed run continues, at which step and data position (the stream's batches)."""
    if not ckpt_path or meta is None:
        return None
    step = int(meta.get("global_step", 0))
    return f"{ckpt_path} at step {step} (each rank's stream resumes after {step} batches)"
