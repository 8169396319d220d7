"""The one model builder: conf/model/* -> U-Net, VAE, frozen text encoder and tokenizer.

Training, the planner (`sdtrain-plan`, on the meta device) and sampling (from a checkpoint's spec) all build
through `build_model`, so a model is assembled one way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from diffusers import AutoencoderKL, UNet2DConditionModel

from sdtrain.errors import ConfigError
from sdtrain.models.diffusers_parts import UNetConfig, VAEConfig, build_unet, build_vae
from sdtrain.models.pretrained import WeightsReader, read_weights
from sdtrain.models.text_encoder import CLIPTokenizer, FrozenOpenCLIPText, TextEncoderConfig, build_text_encoder
from sdtrain.models.text_encoder import build_tokenizer as tokenizer_for
from sdtrain.models.unet_runtime import UNetRuntimeConfig, apply_runtime


@dataclass(kw_only=True, slots=True)
class ModelConfig(UNetRuntimeConfig):
    """conf/model/*: what the model is (unet, vae, text_encoder); how the U-Net runs is inherited from
    UNetRuntimeConfig (attention, gradient_checkpointing, channels_last, compile, compile_mode)."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)


@dataclass(kw_only=True)
class ModelParts:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: FrozenOpenCLIPText
    tokenizer: CLIPTokenizer


def build_model(
    cfg: ModelConfig, *, pretrained: bool = True, runtime: bool = True, read: WeightsReader = read_weights
) -> ModelParts:
    """All parts of `cfg`. `pretrained=False` ignores the `pretrained` weights (random init from the configs:
    the planner, or sampling before a checkpoint's state dict is loaded); `runtime=False` leaves the U-Net's
    attention/checkpointing/compile settings alone; `read` reads single weights files (sdtrain's own formats
    come from sdtrain.checkpoint.weights)."""
    unet_cfg, vae_cfg = cfg.unet, cfg.vae
    if not pretrained:
        unet_cfg, vae_cfg = UNetConfig(config=unet_cfg.config), VAEConfig(config=vae_cfg.config)
    unet = build_unet(unet_cfg, read)
    text_encoder = build_text_encoder(cfg.text_encoder if pretrained else replace(cfg.text_encoder, pretrained=None))
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
        tokenizer=tokenizer_for(cfg.text_encoder.context_length),
    )
