"""The training entry point: `python -m sdtrain.train` / `sdtrain-train` (the only @hydra.main).

Config meets code here and nowhere else: each conf group becomes a typed dataclass, the parts are built, and
Lightning runs. Any SdtrainError (bad data, bad config, missing file) ends the run with one line on stderr.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from sdtrain.config import from_conf, to_plain
from sdtrain.data.datamodule import LatentDataModule
from sdtrain.data.loader import LatentDataConfig, LatentNormalizer, LatentStream, probe_dataset
from sdtrain.data.shards import resolve_shards
from sdtrain.diffusion.objective import DiffusionConfig, DiffusionObjective
from sdtrain.diffusion.sampling import SamplingConfig
from sdtrain.errors import CheckpointError, ConfigError, DataError, SdtrainError, one_line
from sdtrain.launch.loggers import build_loggers
from sdtrain.launch.strategy import build_strategy
from sdtrain.models.diffusers_parts import UNetConfig, VAEConfig, build_unet, build_vae
from sdtrain.models.ema import EMAConfig
from sdtrain.models.text_encoder import TextEncoderConfig, build_text_encoder, build_tokenizer
from sdtrain.models.unet_runtime import UNetRuntimeConfig, apply_runtime
from sdtrain.training.callbacks.ema import EMACallback
from sdtrain.training.callbacks.preemption import RequeueOnSignal
from sdtrain.training.callbacks.samples import SampleGridCallback
from sdtrain.training.callbacks.throughput import ThroughputCallback
from sdtrain.training.callbacks.validation import FixedTimestepValidation, ValidationConfig
from sdtrain.training.checkpoint import (
    AtomicCheckpointIO,
    RunCheckpoint,
    find_resume_checkpoint,
    load_checkpoint_meta,
)
from sdtrain.training.module import LatentDiffusionModule
from sdtrain.training.optim import OptimConfig
from sdtrain.training.spec import build_spec

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
log = logging.getLogger("sdtrain")


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    every_n_steps: int = 500
    keep_last: int = 3
    """Step checkpoints kept besides last.ckpt; -1 keeps all."""


@dataclass(kw_only=True, slots=True)
class PreemptionConfig:
    enabled: bool = True
    """Under SLURM: on `signal`, save DIR/checkpoints/last.ckpt, requeue the job once and stop."""
    signal: str = "SIGUSR1"
    requeue: bool = True


@dataclass(kw_only=True, slots=True)
class SampleScheduleConfig:
    every_n_steps: int = 500
    at_end: bool = True


def check_text_embeddings(manifest: dict[str, Any], text_cfg: TextEncoderConfig) -> None:
    """Pre-encoded text.npy is only usable from the very text encoder this run has (never silently mixed)."""
    recorded = (manifest or {}).get("text_encoder")
    if not recorded:
        raise DataError("data.text_embeddings=true but the manifest names no text encoder (shards without text.npy)")
    expected = text_cfg.identity()
    differ = sorted(k for k in expected if recorded.get(k) != expected[k])
    if differ:
        k = differ[0]
        raise DataError(
            f"the shards' text.npy came from another text encoder ({k}: {recorded.get(k)!r} there, {expected[k]!r} "
            "in model.text_encoder); set data.text_embeddings=false to encode the captions instead"
        )


def build_module(cfg: DictConfig, data: LatentDataConfig) -> tuple[LatentDiffusionModule, LatentDataModule]:
    model = to_plain(cfg.model)
    parts = {"unet", "vae", "text_encoder"}
    extra = sorted(set(model) - parts - set(UNetRuntimeConfig.__dataclass_fields__))
    if extra:
        known = sorted(parts | set(UNetRuntimeConfig.__dataclass_fields__))
        raise ConfigError(f"unknown key model.{extra[0]} (known: {', '.join(known)})")
    runtime = from_conf(UNetRuntimeConfig, {k: v for k, v in model.items() if k not in parts}, "model")
    unet_cfg = from_conf(UNetConfig, model.get("unet"), "model.unet")
    text_cfg = from_conf(TextEncoderConfig, model.get("text_encoder"), "model.text_encoder")
    if (unet_cfg.config or {}).get("addition_embed_type"):
        raise ConfigError(
            "model.unet.config.addition_embed_type is set (SDXL micro-conditioning), which the training step "
            "does not feed yet; use model=tiny|sd15|sd2"
        )
    unet = apply_runtime(build_unet(unet_cfg), runtime)
    text_encoder = build_text_encoder(text_cfg)
    if unet.config.cross_attention_dim != text_encoder.width:
        raise ConfigError(
            f"model.unet.config.cross_attention_dim={unet.config.cross_attention_dim} but the text encoder "
            f"width is {text_encoder.width}"
        )
    tokenizer = build_tokenizer(text_cfg.context_length)

    shard_set = resolve_shards(data.shards)
    latent_shape = probe_dataset(shard_set, data, unet.config.in_channels)
    normalizer = LatentNormalizer.resolve(data, shard_set.manifest)
    if data.text_embeddings:
        check_text_embeddings(shard_set.manifest, text_cfg)
    datamodule = LatentDataModule(
        partial(
            LatentStream,
            shard_set,
            data,
            tokenizer,
            latent_channels=unet.config.in_channels,
            normalizer=normalizer,
            seed=cfg.seed,
        )
    )
    vae = build_vae(from_conf(VAEConfig, model.get("vae"), "model.vae"))
    diffusion = from_conf(DiffusionConfig, cfg.diffusion, "diffusion")
    module = LatentDiffusionModule(
        unet=unet,
        text_encoder=text_encoder,
        vae=vae,
        tokenizer=tokenizer,
        objective=DiffusionObjective(diffusion),
        optim=from_conf(OptimConfig, cfg.optim, "optim"),
        normalizer=normalizer,
        latent_shape=latent_shape,
        seed=cfg.seed,
    )
    module.spec = build_spec(
        unet=unet,
        vae=vae,
        text_encoder=text_cfg,
        diffusion=diffusion,
        normalizer=normalizer,
        latent_shape=latent_shape,
    )
    return module, datamodule


def build_callbacks(cfg: DictConfig, data: LatentDataConfig, run_dir: str) -> list[L.Callback]:
    callbacks_cfg = to_plain(cfg.callbacks)
    known = {"checkpoint", "ema", "samples", "sampling", "validation", "preemption", "peak_flops"}
    extra = sorted(set(callbacks_cfg) - known)
    if extra:
        raise ConfigError(f"unknown key callbacks.{extra[0]} (known: {', '.join(sorted(known))})")
    ckpt = from_conf(CheckpointConfig, callbacks_cfg.get("checkpoint"), "callbacks.checkpoint")
    callbacks: list[L.Callback] = [
        RunCheckpoint(
            dirpath=os.path.join(run_dir, "checkpoints"),
            filename="step_{step:06d}",
            auto_insert_metric_name=False,
            every_n_train_steps=ckpt.every_n_steps,
            save_top_k=ckpt.keep_last,
            monitor="step" if ckpt.keep_last >= 0 else None,
            mode="max",
            save_last=True,
            save_on_train_epoch_end=True,
            enable_version_counter=False,  # last.ckpt is replaced (atomically), never last-v1.ckpt
        ),
        ThroughputCallback(peak_flops_override=callbacks_cfg.get("peak_flops")),
    ]
    preemption = from_conf(PreemptionConfig, callbacks_cfg.get("preemption"), "callbacks.preemption")
    if preemption.enabled and SLURMEnvironment.detect():
        last = os.path.join(run_dir, "checkpoints", "last.ckpt")
        callbacks.append(RequeueOnSignal(ckpt_path=last, signal_name=preemption.signal, requeue=preemption.requeue))
    ema = from_conf(EMAConfig, callbacks_cfg.get("ema"), "callbacks.ema")
    if ema.enabled:
        callbacks.append(EMACallback(ema))
    validation = from_conf(ValidationConfig, callbacks_cfg.get("validation"), "callbacks.validation")
    if validation.every_n_steps > 0:
        if data.val_shards is None:
            raise ConfigError("callbacks.validation.every_n_steps > 0 needs data.val_shards (a held-out shard set)")
        val_set = resolve_shards(data.val_shards)
        callbacks.append(FixedTimestepValidation(validation, val_set, latent_key=data.latent_key))
    schedule = from_conf(SampleScheduleConfig, callbacks_cfg.get("samples"), "callbacks.samples")
    sampling = from_conf(SamplingConfig, callbacks_cfg.get("sampling"), "callbacks.sampling")
    if schedule.every_n_steps > 0 or schedule.at_end:
        callbacks.append(
            SampleGridCallback(
                sampling,
                out_dir=os.path.join(run_dir, "samples"),
                every_n_steps=schedule.every_n_steps,
                at_end=schedule.at_end,
            )
        )
    return callbacks


def resolve_resume(resume: str | None, run_dir: str) -> str | None:
    if resume in (None, "", "none", "null"):
        return None
    if resume == "auto":
        return find_resume_checkpoint(os.path.join(run_dir, "checkpoints"))
    if not os.path.exists(resume):
        raise CheckpointError(f"resume checkpoint not found: {resume}")
    load_checkpoint_meta(resume)  # a damaged checkpoint fails here, with its name, before any work
    return resume


def log_placement() -> None:
    """Where this process runs: one line per rank, so multi-node logs show every rank's place."""
    keys = ("SLURM_JOB_ID", "SLURM_NODEID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_RESTART_COUNT")
    env = {k: os.environ[k] for k in keys if k in os.environ}
    if env:
        log.info("placement: host=%s %s", socket.gethostname(), " ".join(f"{k}={v}" for k, v in env.items()))


def state_dict_mismatch(exc: RuntimeError) -> str:
    """torch's multi-line load_state_dict error as one line: counts per kind and the first example."""
    text = str(exc)
    missing = re.search(r"Missing key\(s\) in state_dict: (.*?)\.\s*$", text, re.M)
    unexpected = re.search(r"Unexpected key\(s\) in state_dict: (.*?)\.\s*$", text, re.M)
    sizes = re.findall(r"size mismatch for ([^:]+): (.*)", text)
    parts = []
    if sizes:
        parts.append(f"{len(sizes)} size mismatches (first: size mismatch for {sizes[0][0]}: {sizes[0][1].strip()})")
    for label, match in (("missing", missing), ("unexpected", unexpected)):
        if match:
            keys = [k.strip().strip('"') for k in match.group(1).split(",")]
            parts.append(f"{len(keys)} {label} keys (first: {keys[0]})")
    return "; ".join(parts) or text.strip().splitlines()[-1]


def run(cfg: DictConfig, run_dir: str) -> L.Trainer:
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    data = from_conf(LatentDataConfig, cfg.data, "data")
    module, datamodule = build_module(cfg, data)
    trainer_kwargs: dict[str, Any] = to_plain(cfg.trainer)
    if not trainer_kwargs.get("max_steps") or trainer_kwargs["max_steps"] < 1:
        raise ConfigError("trainer.max_steps must be >= 1 (the data stream is endless; steps set the length)")
    log_placement()
    ckpt_path = resolve_resume(cfg.resume, run_dir)
    # A resumed run keeps logging into the W&B run its checkpoint came from.
    resumed_id = load_checkpoint_meta(ckpt_path).get("sdtrain", {}).get("wandb_run_id") if ckpt_path else None
    loggers = build_loggers(to_plain(cfg.logger), run_dir, rank_zero_only.rank, resumed_id)
    module.run_metadata = {"wandb_run_id": next((lg.version for lg in loggers if isinstance(lg, WandbLogger)), None)}
    try:
        trainer = L.Trainer(
            **trainer_kwargs,
            strategy=build_strategy(to_plain(cfg.strategy), trainer_kwargs, data.batch_size),
            logger=loggers or False,
            callbacks=build_callbacks(cfg, data, run_dir),
            # Under SLURM our RequeueOnSignal does the requeue (into DIR/checkpoints), not Lightning's hpc_ckpt.
            plugins=[AtomicCheckpointIO()]
            + ([SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []),
            default_root_dir=run_dir,
            max_epochs=-1,
            limit_val_batches=0,
            num_sanity_val_steps=0,
        )
    except TypeError as exc:
        raise ConfigError(f"trainer: {exc}") from None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except RuntimeError as exc:
        if "Error(s) in loading state_dict" in str(exc):
            mismatch = state_dict_mismatch(exc)
            raise CheckpointError(f"checkpoint {ckpt_path} does not fit this model: {mismatch}") from None
        raise
    return trainer


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        run(cfg, run_dir)
    except SdtrainError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
