"""`python -m sdtrain.train_vae` / `sdtrain-train-vae`: the first stage (a diffusers AutoencoderKL) as a training
job with the U-Net's machinery: the same trainer/strategy/logger groups, checkpoints and resume (`resume=auto`),
EMA, progress lines, SLURM requeue. Config: conf/train_vae.yaml; code: sdtrain/vae/.

At the end the run writes DIR/vae/ (for `sdtrain-encode --vae DIR/vae`, with its latent statistics).
"""

from __future__ import annotations

import logging
from functools import partial

import lightning as L
from omegaconf import DictConfig

from sdtrain.config import to_object
from sdtrain.data.datamodule import LatentDataModule
from sdtrain.errors import ConfigError
from sdtrain.launch.entry import hydra_entry
from sdtrain.launch.fit import fit, prepare_trainer
from sdtrain.launch.fsdp import FSDPConfig
from sdtrain.launch.startup import millions
from sdtrain.launch.zero import ZeroConfig
from sdtrain.models.diffusers_parts import build_vae
from sdtrain.seeding import seed_everything
from sdtrain.training.optim import OptimConfig
from sdtrain.vae.callbacks import VAECallbacksConfig, build_vae_callbacks
from sdtrain.vae.data import ImageDataConfig, ImageSet, ImageStream
from sdtrain.vae.losses import VAELossConfig
from sdtrain.vae.module import AutoencoderModelConfig, AutoencoderModule

log = logging.getLogger("sdtrain")


def check_strategy(cfg: DictConfig) -> None:
    """The autoencoder's parameters must be whole on every rank (held-out reconstructions and DIR/vae/ are made by
    rank 0 alone); ZeRO-1/2 shard only optimizer states and gradients."""
    strategy = to_object(cfg.strategy, "strategy")
    if isinstance(strategy, FSDPConfig) or (isinstance(strategy, ZeroConfig) and strategy.stage == 3):
        name = "fsdp" if isinstance(strategy, FSDPConfig) else "deepspeed ZeRO-3"
        raise ConfigError(
            f"strategy {name} shards the parameters, which the VAE job does not support (a VAE fits on one "
            "device): use strategy=ddp or deepspeed_zero1/deepspeed_zero2[_offload]"
        )


def run(cfg: DictConfig, run_dir: str) -> L.Trainer:
    seed_everything(cfg.seed)
    check_strategy(cfg)
    data = to_object(cfg.data, "data", ImageDataConfig)
    model = to_object(cfg.model, "model", AutoencoderModelConfig)
    image_set = ImageSet.open(data.images, data.files_per_part)
    vae = build_vae(model)
    module = AutoencoderModule(
        vae=vae,
        loss=to_object(cfg.loss, "loss", VAELossConfig),
        optim=to_object(cfg.optim, "optim", OptimConfig),
        train=model.train,
        resolution=data.resolution,
        seed=cfg.seed,
    )
    datamodule = LatentDataModule(partial(ImageStream, image_set, data, seed=cfg.seed))
    callbacks_cfg = to_object(cfg.callbacks, "callbacks", VAECallbacksConfig)
    prepared = prepare_trainer(
        cfg,
        run_dir,
        module,
        progress=callbacks_cfg.progress,
        batch_size=data.batch_size,
        make_callbacks=lambda bar: build_vae_callbacks(
            callbacks_cfg,
            run_dir,
            val_images=data.val_images,
            train_images=data.images,
            resolution=data.resolution,
            progress_bar=bar,
        ),
    )
    trained = "all of it" if model.train == "all" else "the decoder (encoder frozen)"
    header = [
        f"model: AutoencoderKL {millions(vae)}, {vae.config.latent_channels}-channel latents, training {trained}"
        + (f", from {model.pretrained}" if model.pretrained else ", random init"),
        f"data: {len(image_set.parts)} parts, {image_set.total:,} images at {data.resolution}px, "
        f"batch {data.batch_size}/rank, {data.num_workers} workers/rank",
    ]
    return fit(prepared, cfg, module, datamodule, header=header)


main = hydra_entry("train_vae", run)
