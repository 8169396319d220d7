"""The U-Net and VAE, taken whole from diffusers: built from a config dict or loaded from a local folder.
How the U-Net runs (attention backend, checkpointing, compile) is models/unet_runtime.py."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from sdtrain.errors import CheckpointError, ConfigError
from sdtrain.models.pretrained import WeightsReader, load_matching, model_folder, read_weights, unet_state

log = logging.getLogger(__name__)
LATENT_STATISTICS = "latent_statistics.json"  # beside a VAE folder's config.json: its latents' mean/std per channel


@dataclass(kw_only=True, slots=True)
class UNetConfig:
    config: dict[str, Any] = field(default_factory=dict)
    """diffusers UNet2DConditionModel config (block_out_channels, cross_attention_dim, ...)."""
    pretrained: str | None = None
    """Start from these weights instead of random init: a local diffusers folder (or an sdtrain export), or a
    single file (.safetensors/.ckpt: diffusers names, original SD/ldm names, or an sdtrain checkpoint) loaded into
    the U-Net built from `config`."""


@dataclass(kw_only=True, slots=True)
class VAEConfig:
    config: dict[str, Any] = field(default_factory=dict)
    """diffusers AutoencoderKL config; used for random init when `pretrained` is None."""
    pretrained: str | None = None
    """Local diffusers AutoencoderKL folder (the demo trains one; SD's VAE for real runs), an sdtrain export, or a
    diffusers-named .safetensors file loaded into the VAE built from `config`."""


def _folder(path: str, part: str, where: str) -> str | None:
    """The diffusers folder to load for `where`, None for a single weights file; errors for anything else."""
    if os.path.isdir(path):
        folder = model_folder(path, part)
        if folder is None:
            raise CheckpointError(f"{where} folder {path} has no config.json (expected a diffusers folder)")
        return folder
    if not os.path.isfile(path):
        raise CheckpointError(f"{where} not found: {path}")
    return None


def _from_config(cls: type, config: dict[str, Any], where: str) -> Any:
    try:
        return cls.from_config(config)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}.config: {exc}") from None


def build_unet(cfg: UNetConfig, read: WeightsReader = read_weights) -> UNet2DConditionModel:
    folder = _folder(cfg.pretrained, "unet", "model.unet.pretrained") if cfg.pretrained else None
    if folder:
        unet = UNet2DConditionModel.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
        log.info("model.unet: loaded %s", folder)
    else:
        unet = _from_config(UNet2DConditionModel, cfg.config, "model.unet")
        if cfg.pretrained:
            load_matching(unet, unet_state(cfg.pretrained, dict(unet.config), read), cfg.pretrained, "model.unet")
    return unet


def build_vae(cfg: VAEConfig, read: WeightsReader = read_weights) -> AutoencoderKL:
    folder = _folder(cfg.pretrained, "vae", "model.vae.pretrained") if cfg.pretrained else None
    if folder:
        vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
    else:
        vae = _from_config(AutoencoderKL, cfg.config, "model.vae")
        if cfg.pretrained:
            load_matching(vae, read(cfg.pretrained), cfg.pretrained, "model.vae")
    vae.requires_grad_(False)
    return vae.eval()


def read_latent_statistics(vae_dir: str) -> dict[str, Any] | None:
    """A VAE folder's `latent_statistics.json` (written by sdtrain-train-vae: sdtrain/vae/export.py), if any."""
    path = os.path.join(vae_dir, LATENT_STATISTICS)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent along a side (8 for SD's VAE): each block after the first halves the size."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def encoder_fingerprint(vae: AutoencoderKL) -> str:
    """sha256 of the VAE's encoder half (encoder.*, quant_conv.*) as float32: what decides the latents. Shards
    record it (sdtrain-encode) and a run checks its VAE against it; decoder-only fine-tunes (SD's ft-MSE/EMA VAEs)
    keep it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        if name.startswith(("encoder.", "quant_conv.")):
            digest.update(name.encode() + b"\0")
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
