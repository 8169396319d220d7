"""The U-Net training entry point: `python -m sdtrain.train` / `sdtrain-train` (the VAE job's is train_vae.py).

Config meets code here: each conf group becomes its typed dataclass (launch/config.py), the model is built
(models/builder.py), the data probed (data/probe.py), the callbacks made (training/callbacks/build.py), and
Lightning runs. Any SdtrainError (bad data, bad config, missing file) ends the run with one line on stderr.
"""

from __future__ import annotations

import logging
from functools import partial

import lightning as L
from omegaconf import DictConfig

from sdtrain.checkpoint.spec import build_spec
from sdtrain.checkpoint.weights import read_weights
from sdtrain.config import to_object
from sdtrain.data.datamodule import LatentDataModule
from sdtrain.data.loader import LatentDataConfig, LatentStream
from sdtrain.data.probe import ProbedData, probe
from sdtrain.diffusion.objective import DiffusionConfig, DiffusionObjective
from sdtrain.errors import ConfigError
from sdtrain.launch.entry import hydra_entry
from sdtrain.launch.fit import fit, prepare_trainer
from sdtrain.launch.startup import unet_lines
from sdtrain.models.builder import ModelConfig, ModelParts, build_model
from sdtrain.models.conditioning import needs_micro_conditioning
from sdtrain.models.diffusers_parts import encoder_fingerprint, vae_scale_factor
from sdtrain.models.pipeline_folder import is_inpainting_folder, scheduler_config
from sdtrain.models.single_file import pipeline_folder
from sdtrain.seeding import seed_everything
from sdtrain.training.callbacks.build import CallbacksConfig, build_callbacks
from sdtrain.training.module import LatentDiffusionModule
from sdtrain.training.optim import OptimConfig

log = logging.getLogger("sdtrain")


def build_module(cfg: DictConfig, data: LatentDataConfig) -> tuple[LatentDiffusionModule, LatentDataModule, ProbedData]:
    """The LightningModule (model + objective + optimizer settings), the data stream and its shards for `cfg`."""
    model: ModelConfig = to_object(cfg.model, "model", ModelConfig)
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
        text_config_2=parts.text_config_2,
        # a VAE from weights must be the one that made the latents; a random one (tests) only decodes grids
        vae_encoder_sha256=encoder_fingerprint(parts.vae) if model.pretrained or model.vae.pretrained else None,
        inpainting=diffusion.inpainting,
        masked_loss=diffusion.masked_loss,
        vae_scaling_factor=float(parts.vae.config.scaling_factor),
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
    module.sample_shapes = bucket_shapes(probed)
    module.spec = build_spec(
        parts=parts,
        diffusion=diffusion,
        normalizer=probed.normalizer,
        latent_shape=probed.latent_shape,
        base_model=model if model.lora.enabled else None,
    )
    # LoRA checkpoints hold the adapters only (the base comes back from model.pretrained): loading must not
    # ask for the rest; strategies read this before the module's own hooks run
    module.strict_loading = not model.lora.enabled
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
        mixture=probed.mixture,
        micro_conditioning=vae_scale_factor(parts.vae) if needs_micro_conditioning(parts.unet) else 0,
    )
    return module, LatentDataModule(stream), probed


def bucket_shapes(probed: ProbedData) -> list[tuple[int, ...]]:
    """The latent shapes of the data's aspect buckets (the manifest's count per shape, most samples first;
    the probed shape first): the training grids render one per shape."""
    channels = probed.latent_shape[0]
    counts = (probed.shard_set.manifest.get("encode") or {}).get("latent_shapes") or {}
    shapes = [tuple(probed.latent_shape)]
    for key, _ in sorted(counts.items(), key=lambda kv: -kv[1]):
        parts = key.split("x")
        shape = (
            (channels, int(parts[-2]), int(parts[-1])) if len(parts) == 3 and key.replace("x", "").isdigit() else None
        )
        if shape is not None and shape not in shapes:
            shapes.append(shape)
    return shapes


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
    module, datamodule, probed = build_module(cfg, data)
    callbacks_cfg = to_object(cfg.callbacks, "callbacks", CallbacksConfig)
    run = prepare_trainer(
        cfg,
        run_dir,
        module,
        progress=callbacks_cfg.progress,
        batch_size=data.batch_size,
        make_callbacks=lambda bar: build_callbacks(
            callbacks_cfg, run_dir, val_shards=data.val_shards, latent_key=data.latent_key, progress_bar=bar
        ),
    )
    return fit(run, cfg, module, datamodule, header=unet_lines(module, probed.shard_set, data, probed.mixture))


main = hydra_entry("train", run)
