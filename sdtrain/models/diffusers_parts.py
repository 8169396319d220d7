"""The U-Net and VAE, taken whole from diffusers: built from a config dict or loaded from a local folder."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from sdtrain.errors import CheckpointError, ConfigError

ATTENTION_PROCESSORS = {"sdpa": AttnProcessor2_0, "math": AttnProcessor}


@dataclass(kw_only=True, slots=True)
class UNetConfig:
    config: dict[str, Any] = field(default_factory=dict)
    """diffusers UNet2DConditionModel config (block_out_channels, cross_attention_dim, ...)."""
    pretrained: str | None = None
    """Local diffusers folder (with config.json + weights) to start from instead of random init."""
    attention: str = "sdpa"
    """sdpa (torch scaled_dot_product_attention: flash/mem-efficient on GPU) | math (reference)."""
    gradient_checkpointing: bool = False
    channels_last: bool = False


@dataclass(kw_only=True, slots=True)
class VAEConfig:
    config: dict[str, Any] = field(default_factory=dict)
    """diffusers AutoencoderKL config; used for random init when `pretrained` is None."""
    pretrained: str | None = None
    """Local diffusers AutoencoderKL folder (the demo trains one; SD's VAE for real runs)."""


def _check_folder(path: str, what: str) -> None:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"{what} folder {path} has no config.json (expected a diffusers save_pretrained folder)")


def build_unet(cfg: UNetConfig) -> UNet2DConditionModel:
    if cfg.pretrained:
        _check_folder(cfg.pretrained, "model.unet.pretrained")
        unet = UNet2DConditionModel.from_pretrained(cfg.pretrained, local_files_only=True)
    else:
        try:
            unet = UNet2DConditionModel.from_config(cfg.config)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model.unet.config: {exc}") from None
    if cfg.attention not in ATTENTION_PROCESSORS:
        raise ConfigError(f"model.unet.attention must be one of {sorted(ATTENTION_PROCESSORS)}, got {cfg.attention!r}")
    unet.set_attn_processor(ATTENTION_PROCESSORS[cfg.attention]())
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet


def build_vae(cfg: VAEConfig) -> AutoencoderKL:
    if cfg.pretrained:
        _check_folder(cfg.pretrained, "model.vae.pretrained")
        vae = AutoencoderKL.from_pretrained(cfg.pretrained, local_files_only=True)
    else:
        vae = AutoencoderKL.from_config(cfg.config)
    vae.requires_grad_(False)
    return vae.eval()
