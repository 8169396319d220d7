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
from sdtrain.models.conditioning import needs_micro_conditioning, pooled_width
from sdtrain.models.diffusers_parts import UNetConfig, VAEConfig, build_unet, build_vae
from sdtrain.models.lora import LoraConfig, apply_lora
from sdtrain.models.pipeline_folder import from_pipeline
from sdtrain.models.pretrained import WeightsReader, read_weights
from sdtrain.models.sdxl_text import SDXLTextEncoders, TokenizerPair
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
    lora: LoraConfig = field(default_factory=LoraConfig)
    """model.lora.rank=R: train peft LoRA adapters on the U-Net instead of all of it (models/lora.py)."""
    text_encoder_2: TextEncoderConfig | None = None
    """SDXL's second text encoder (OpenCLIP-bigG: its penultimate states join the first's, its pooled projection
    is `text_embeds`; models/sdxl_text.py); None for SD 1.x / 2.x. Filled from an SDXL `pretrained` folder."""


@dataclass(kw_only=True)
class ModelParts:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: nn.Module
    """FrozenOpenCLIPText or FrozenHFText: tokens (B, L) -> hidden states (B, L, width)."""
    tokenizer: Tokenizer
    text_config: TextEncoderConfig
    """The text encoder as built (after model.pretrained filled it in)."""
    text_config_2: TextEncoderConfig | None = None
    """SDXL's second text encoder as built; None for SD 1.x / 2.x."""


def build_model(
    cfg: ModelConfig,
    *,
    pretrained: bool = True,
    runtime: bool = True,
    read: WeightsReader = read_weights,
    text_model: dict[str, Any] | None = None,
    text_model_2: dict[str, Any] | None = None,
) -> ModelParts:
    """All parts of `cfg`. `pretrained=False` ignores the `pretrained` weights (random init from the configs:
    the planner, or sampling before a checkpoint's state dict is loaded; `text_model` / `text_model_2` then
    describe transformers text encoders: architecture and tokenizer files, as a checkpoint keeps them);
    `runtime=False` leaves the U-Net's attention/checkpointing/compile settings alone; `read` reads single
    weights files (sdtrain's own formats come from sdtrain.checkpoint.weights)."""
    if cfg.pretrained and pretrained:
        cfg = from_pipeline(cfg)
    unet_cfg, vae_cfg, text_cfg, text_cfg_2 = cfg.unet, cfg.vae, cfg.text_encoder, cfg.text_encoder_2
    if not pretrained:
        unet_cfg, vae_cfg = UNetConfig(config=unet_cfg.config), VAEConfig(config=vae_cfg.config)
        text_cfg, text_cfg_2 = _without_open_clip_weights(text_cfg), _without_open_clip_weights(text_cfg_2)
    unet = build_unet(unet_cfg, read)
    tokenizer, text_encoder = build_text(text_cfg, text_cfg_2, text_model, text_model_2)
    check_conditioning(unet, text_encoder, text_cfg_2 is not None)
    if cfg.lora.enabled:
        apply_lora(unet, cfg.lora)
    if runtime:
        apply_runtime(unet, cfg)
    return ModelParts(
        unet=unet,
        vae=build_vae(vae_cfg, read),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_config=text_cfg,
        text_config_2=text_cfg_2,
    )


def _without_open_clip_weights(text: TextEncoderConfig | None) -> TextEncoderConfig | None:
    return replace(text, pretrained=None) if text is not None and text.kind == "open_clip" else text


def build_text(
    text: TextEncoderConfig,
    text_2: TextEncoderConfig | None = None,
    described: dict[str, Any] | None = None,
    described_2: dict[str, Any] | None = None,
) -> tuple[Tokenizer, nn.Module]:
    """(tokenizer, frozen text encoder): one encoder, or SDXL's two as one (`text_2`; models/sdxl_text.py).
    Training and sdtrain-encode's pre-encoded text.npy both encode through this."""
    tokenizer, encoder = _text_part(text, described)
    if text_2 is None:
        return tokenizer, encoder
    second_tokenizer, second = _text_part(text_2, described_2)
    return TokenizerPair(tokenizer, second_tokenizer), SDXLTextEncoders(encoder, second)


def _text_part(text: TextEncoderConfig, described: dict[str, Any] | None) -> tuple[Tokenizer, nn.Module]:
    """(tokenizer, frozen encoder) of one text encoder config; `described` = a checkpoint's transformers model."""
    architecture, files = (described or {}).get("config"), (described or {}).get("tokenizer_files")
    tokenizer = build_tokenizer(text, files)
    return tokenizer, build_text_encoder(text, architecture, getattr(tokenizer, "pad_token_id", None))


def check_conditioning(unet: UNet2DConditionModel, text_encoder: nn.Module, sdxl: bool) -> None:
    """The text encoder(s) give what the U-Net takes: its cross-attention width, and SDXL's pooled width."""
    config = unet.config
    if needs_micro_conditioning(unet) != sdxl:
        raise ConfigError(
            "this U-Net takes SDXL's pooled text + size conditioning (addition_embed_type=text_time): it needs "
            "model.text_encoder_2 (an SDXL pipeline folder has text_encoder_2/)"
            if not sdxl
            else "model.text_encoder_2 is set but the U-Net has no SDXL added conditioning (addition_embed_type)"
        )
    if config.cross_attention_dim != text_encoder.width:
        raise ConfigError(
            f"model.unet.config.cross_attention_dim={config.cross_attention_dim} but the text encoder "
            f"width is {text_encoder.width}"
        )
    if sdxl and pooled_width(dict(config)) != text_encoder.pooled_width:
        raise ConfigError(
            f"the U-Net's added embedding expects a pooled text width of {pooled_width(dict(config))} "
            f"(projection_class_embeddings_input_dim - 6 x addition_time_embed_dim), text_encoder_2 gives "
            f"{text_encoder.pooled_width}"
        )
