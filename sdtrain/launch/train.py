"""The training entry point: `python -m sdtrain.train` / `sdtrain-train` (the only @hydra.main).

Config meets code here: each conf group becomes its typed dataclass (launch/config.py), the model is built
(models/builder.py), the data probed (data/probe.py), the callbacks made (training/callbacks/build.py), and
Lightning runs. Any SdtrainError (bad data, bad config, missing file) ends the run with one line on stderr.
"""

from __future__ import annotations

import logging
import sys
from functools import partial
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from sdtrain.checkpoint.files import AtomicCheckpointIO, load_checkpoint_meta, state_dict_mismatch
from sdtrain.checkpoint.format import WANDB_ID_KEY, sdtrain_state
from sdtrain.checkpoint.resume import resolve_resume
from sdtrain.checkpoint.spec import build_spec
from sdtrain.checkpoint.weights import read_weights
from sdtrain.config import to_object
from sdtrain.data.datamodule import LatentDataModule
from sdtrain.data.loader import LatentDataConfig, LatentStream
from sdtrain.data.probe import probe
from sdtrain.data.shards import ShardSet
from sdtrain.diffusion.objective import DiffusionConfig, DiffusionObjective
from sdtrain.errors import CheckpointError, ConfigError, SdtrainError, one_line
from sdtrain.launch.config import (
    CONF_PATH,
    one_line_config_errors,
    quote_brace_patterns,
    register_configs,
    to_plain,
)
from sdtrain.launch.loggers import build_loggers
from sdtrain.launch.slurm import log_placement
from sdtrain.launch.startup import quiet_known_noise, start_header
from sdtrain.launch.strategy import build_strategy
from sdtrain.models.builder import ModelConfig, ModelParts, build_model
from sdtrain.models.diffusers_parts import encoder_fingerprint
from sdtrain.models.pipeline_folder import is_inpainting_folder, scheduler_config
from sdtrain.models.single_file import pipeline_folder
from sdtrain.seeding import seed_everything
from sdtrain.training.callbacks.build import CallbacksConfig, build_callbacks
from sdtrain.training.module import LatentDiffusionModule
from sdtrain.training.optim import OptimConfig

log = logging.getLogger("sdtrain")


def build_module(cfg: DictConfig, data: LatentDataConfig) -> tuple[LatentDiffusionModule, LatentDataModule, ShardSet]:
    """The LightningModule (model + objective + optimizer settings), the data stream and its shards for `cfg`."""
    model: ModelConfig = to_object(cfg.model, "model", ModelConfig)
    if model.unet.config.get("addition_embed_type"):
        raise ConfigError(
            "model.unet.config.addition_embed_type is set (SDXL micro-conditioning), which the training step "
            "does not feed yet; use model=tiny|sd15|sd2"
        )
    parts = build_model(model, read=read_weights)  # sdtrain checkpoints are valid `pretrained` files too
    diffusion = to_object(cfg.diffusion, "diffusion", DiffusionConfig)
    if model.pretrained:  # the released model's schedule, for every diffusion.* key left at its default
        folder = pipeline_folder(model)
        diffusion = diffusion.with_schedule_of(scheduler_config(folder), inpainting=is_inpainting_folder(folder))
    channels = latent_channels(parts, diffusion)
    probed = probe(
        data,
        latent_channels=channels,
        text_config=parts.text_config,
        # a VAE from weights must be the one that made the latents; a random one (tests) only decodes grids
        vae_encoder_sha256=encoder_fingerprint(parts.vae) if model.pretrained or model.vae.pretrained else None,
        inpainting=diffusion.inpainting,
        masked_loss=diffusion.masked_loss,
    )
    module = LatentDiffusionModule(
        unet=parts.unet,
        text_encoder=parts.text_encoder,
        vae=parts.vae,
        tokenizer=parts.tokenizer,
        objective=DiffusionObjective(diffusion),
        optim=to_object(cfg.optim, "optim", OptimConfig),
        normalizer=probed.normalizer,
        latent_shape=probed.latent_shape,
        seed=cfg.seed,
    )
    module.spec = build_spec(
        parts=parts,
        diffusion=diffusion,
        normalizer=probed.normalizer,
        latent_shape=probed.latent_shape,
    )
    stream = partial(
        LatentStream,
        probed.shard_set,
        data,
        parts.tokenizer,
        latent_channels=channels,
        normalizer=probed.normalizer,
        seed=cfg.seed,
        inpainting=diffusion.inpainting,
        masked_loss=diffusion.masked_loss,
    )
    return module, LatentDataModule(stream), probed.shard_set


def latent_channels(parts: ModelParts, diffusion: DiffusionConfig) -> int:
    """The data's latent channels for this U-Net: its input channels, or C of the inpainting layout's 2C + 1."""
    unet_in, vae_channels = parts.unet.config.in_channels, parts.vae.config.latent_channels
    if not diffusion.inpainting:
        return unet_in
    if unet_in != 2 * vae_channels + 1:
        raise ConfigError(
            f"diffusion.inpainting=true needs a U-Net with {2 * vae_channels + 1} input channels (latents + mask + "
            f"masked-image latents: model.unet.config.in_channels={2 * vae_channels + 1}); this one has {unet_in}"
        )
    return vae_channels


def run(cfg: DictConfig, run_dir: str) -> L.Trainer:
    seed_everything(cfg.seed)
    data: LatentDataConfig = to_object(cfg.data, "data", LatentDataConfig)
    module, datamodule, shard_set = build_module(cfg, data)
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
    callbacks_cfg = to_object(cfg.callbacks, "callbacks", CallbacksConfig)
    if not callbacks_cfg.progress.bar():  # lines instead (job logs): no bar drawing into a file
        trainer_kwargs["enable_progress_bar"] = False
    trainer_kwargs.setdefault("enable_model_summary", False)  # the start header below says it in five lines
    callbacks = build_callbacks(
        callbacks_cfg,
        run_dir,
        val_shards=data.val_shards,
        latent_key=data.latent_key,
        progress_bar=trainer_kwargs.get("enable_progress_bar", True),
    )
    strategy = build_strategy(to_object(cfg.strategy, "strategy"), trainer_kwargs, data.batch_size)
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
    start_header(
        module=module,
        shard_set=shard_set,
        data=data,
        trainer=trainer,
        strategy=str(cfg.strategy.get("kind", "auto")),
        ckpt_path=resume_line(ckpt_path, resumed),
        run_dir=run_dir,
    )
    for logger in loggers:  # the resolved config: runs compared by their settings (secrets were refused above)
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except RuntimeError as exc:
        if "Error(s) in loading state_dict" in str(exc):
            mismatch = state_dict_mismatch(exc)
            raise CheckpointError(f"checkpoint {ckpt_path} does not fit this model: {mismatch}") from None
        raise
    return trainer


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="train")
def hydra_main(cfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        run(cfg, run_dir)
    except SdtrainError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)


def resume_line(ckpt_path: str | None, meta: dict[str, Any] | None) -> str | None:
    """Which checkpoint a resumed run continues, at which step and data position (the stream's batches)."""
    if not ckpt_path or meta is None:
        return None
    step = int(meta.get("global_step", 0))
    return f"{ckpt_path} at step {step} (each rank's stream resumes after {step} batches)"


def main() -> None:
    quiet_known_noise()
    sys.argv[1:] = quote_brace_patterns(sys.argv[1:])
    register_configs()
    one_line_config_errors()
    hydra_main()


if __name__ == "__main__":
    main()
