"""The one model builder: conf/model/* -> U-Net, VAE, frozen text encoder and tokenizer.

Training, the planner (`sdtrain-plan`, on the meta device) and sampling (from a checkpoint's spec) all build
through `build_model`, so a model is assembled one way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from sdtrain.errors import ConfigError
from sdtrain.models.diffusers_parts import UNetConfig, VAEConfig, build_unet, build_vae
from sdtrain.models.pipeline_folder import from_pipeline
from sdtrain.models.pretrained import WeightsReader, read_weights
from sdtrain.models.text_encoder import TextEncoderConfig, Tokenizer, build_text_encoder, build_tokenizer
from sdtrain.models.unet_runtime import UNetRuntimeConfig, apply_runtime


@dataclass(kw_only=True, slots=True)
class ModelConfig(UNetRuntimeConfig):
    """conf/model/*: what the model is (unet, vae, text_encoder); how the U-Net runs is inherited from
    UNetRuntimeConfig (attention, gradient_checkpointing, channels_last, compile, compile_mode)."""

    pretrained: str | None = None
    """A released diffusers SD pipeline folder (models/pipeline_folder.py) or an original-layout single file
    (.safetensors/.ckpt, models/single_file.py): U-Net, VAE, text encoder, tokenizer and noise schedule all come
    from it; a part's own `pretrained` below takes that part's place."""
    pretrained_config: str | None = None
    """For a single-file `pretrained`: a diffusers folder with that model's configs (weights there are not read);
    None = the model= preset's U-Net/VAE configs and the text encoder's sizes read off the file."""
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)


@dataclass(kw_only=True)
class ModelParts:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: nn.Module
    """FrozenOpenCLIPText or FrozenHFText: tokens (B, L) -> hidden states (B, L, width)."""
    tokenizer: Tokenizer
    text_config: TextEncoderConfig
    """The text encoder as built (after model.pretrained filled it in)."""


def build_model(
    cfg: ModelConfig,
    *,
    pretrained: bool = True,
    runtime: bool = True,
    read: WeightsReader = read_weights,
    text_model: dict[str, Any] | None = None,
) -> ModelParts:
    """All parts of `cfg`. `pretrained=False` ignores the `pretrained` weights (random init from the configs:
    the planner, or sampling before a checkpoint's state dict is loaded; `text_model` then describes a
    transformers text encoder: its architecture and tokenizer files, as a checkpoint keeps them);
    `runtime=False` leaves the U-Net's attention/checkpointing/compile settings alone; `read` reads single
    weights files (sdtrain's own formats come from sdtrain.checkpoint.weights)."""
    if cfg.pretrained and pretrained:
        cfg = from_pipeline(cfg)
    unet_cfg, vae_cfg, text_cfg = cfg.unet, cfg.vae, cfg.text_encoder
    architecture, files = (text_model or {}).get("config"), (text_model or {}).get("tokenizer_files")
    if not pretrained:
        unet_cfg, vae_cfg = UNetConfig(config=unet_cfg.config), VAEConfig(config=vae_cfg.config)
        if text_cfg.kind == "open_clip":
            text_cfg = replace(text_cfg, pretrained=None)
    unet = build_unet(unet_cfg, read)
    tokenizer = build_tokenizer(text_cfg, files)
    text_encoder = build_text_encoder(text_cfg, architecture, getattr(tokenizer, "pad_token_id", None))
    if unet.config.cross_attention_dim != text_encoder.width:
        raise ConfigError(
            f"model.unet.config.cross_attention_dim={unet.config.cross_attention_dim} but the text encoder "
            f"width is {text_encoder.width}"
        )
    if runtime:
        apply_runtime(unet, cfg)
    return ModelParts(
        unet=unet,
        vae=build_vae(vae_cfg, read),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_config=text_cfg,
    )
