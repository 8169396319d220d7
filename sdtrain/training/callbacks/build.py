"""`callbacks.*`: every callback's config, gathered as the `callbacks` group, and the callbacks a run gets."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import lightning as L
from lightning.pytorch.plugins.environments import SLURMEnvironment

from sdtrain.checkpoint.format import LAST_NAME
from sdtrain.data.shards import resolve_shards
from sdtrain.diffusion.sampling import SamplingConfig
from sdtrain.errors import ConfigError
from sdtrain.training.callbacks.checkpointing import CheckpointConfig, run_checkpoint
from sdtrain.training.callbacks.ema import EMACallback, EMAConfig
from sdtrain.training.callbacks.preemption import PreemptionConfig, RequeueOnSignal
from sdtrain.training.callbacks.progress import ProgressConfig, ProgressLog, StepProgressBar
from sdtrain.training.callbacks.samples import SampleGridCallback, SampleScheduleConfig
from sdtrain.training.callbacks.throughput import ThroughputCallback
from sdtrain.training.callbacks.validation import FixedTimestepValidation, ValidationConfig


@dataclass(kw_only=True, slots=True)
class BaseCallbacksConfig:
    """What every sdtrain job has (the U-Net's and the VAE's): checkpoints, EMA, SLURM requeue, progress, MFU."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    progress: ProgressConfig = field(default_factory=ProgressConfig)
    """Progress lines in job logs (no terminal) or the progress bar (a terminal)."""
    peak_flops: float | None = None
    """Accelerator peak FLOP/s for MFU; null = looked up by device name (H100, A100, ...)."""


@dataclass(kw_only=True, slots=True)
class CallbacksConfig(BaseCallbacksConfig):
    samples: SampleScheduleConfig = field(default_factory=SampleScheduleConfig)
    """When sample grids are drawn; what they show is `sampling`."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    """Fixed-timestep validation loss on data.val_shards (val/loss, val/loss_tNNN)."""


def base_callbacks(cfg: BaseCallbacksConfig, run_dir: str, *, progress_bar: bool = True) -> list[L.Callback]:
    """Checkpoints, throughput/MFU, progress, SLURM requeue and EMA; `progress_bar` is false when the trainer
    draws none (trainer.enable_progress_bar=false)."""
    callbacks: list[L.Callback] = [
        run_checkpoint(cfg.checkpoint, run_dir),
        ThroughputCallback(peak_flops_override=cfg.peak_flops),
    ]
    if cfg.progress.lines():
        callbacks.append(ProgressLog(cfg.progress))
    if cfg.progress.bar() and progress_bar:
        callbacks.append(StepProgressBar())
    if cfg.preemption.enabled and SLURMEnvironment.detect():
        last = os.path.join(run_dir, "checkpoints", LAST_NAME)
        requeue = cfg.preemption.requeue
        callbacks.append(RequeueOnSignal(ckpt_path=last, signal_name=cfg.preemption.signal, requeue=requeue))
    if cfg.ema.enabled:
        callbacks.append(EMACallback(cfg.ema))
    return callbacks


def build_callbacks(
    cfg: CallbacksConfig, run_dir: str, *, val_shards: object, latent_key: str, progress_bar: bool = True
) -> list[L.Callback]:
    """The U-Net run's callbacks; `val_shards` is data.val_shards (the held-out set callbacks.validation needs)."""
    if cfg.sampling.autoguidance != 1.0:
        raise ConfigError(
            "callbacks.sampling.autoguidance needs a guide checkpoint, which training grids do not have: use "
            "sdtrain-sample/sdtrain-eval --guide EARLIER.ckpt on the run's checkpoints"
        )
    callbacks = base_callbacks(cfg, run_dir, progress_bar=progress_bar)
    if cfg.validation.every_n_steps > 0:
        if val_shards is None:
            raise ConfigError("callbacks.validation.every_n_steps > 0 needs data.val_shards (a held-out shard set)")
        callbacks.append(FixedTimestepValidation(cfg.validation, resolve_shards(val_shards), latent_key=latent_key))
    if cfg.samples.every_n_steps > 0 or cfg.samples.at_end:
        callbacks.append(
            SampleGridCallback(
                cfg.sampling,
                out_dir=os.path.join(run_dir, "samples"),
                every_n_steps=cfg.samples.every_n_steps,
                at_end=cfg.samples.at_end,
            )
        )
    return callbacks
