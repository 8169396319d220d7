"""A trained model back from its checkpoint alone: U-Net (EMA or raw weights), frozen text encoder, VAE, schedule.

Everything needed is inside the checkpoint (weights + checkpoint["sdtrain"]["spec"], see spec.py), so a
checkpoint copied to another machine samples and exports without the run folder or its config. The model is
rebuilt by models.builder, the same builder training used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from sdtrain.checkpoint.files import load_full_checkpoint
from sdtrain.checkpoint.format import PARTS, SPEC_KEY, WEIGHTS, find_ema_state, part_state, sdtrain_state
from sdtrain.checkpoint.spec import model_config
from sdtrain.data.normalizer import LatentNormalizer
from sdtrain.diffusion.objective import DiffusionConfig
from sdtrain.errors import CheckpointError, SdtrainError
from sdtrain.models.builder import ModelConfig, ModelParts, build_model
from sdtrain.models.lora import LoraConfig
from sdtrain.models.text_encoder import TextEncoderConfig, Tokenizer

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class TrainedModel:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: nn.Module
    text_config: TextEncoderConfig
    tokenizer: Tokenizer
    normalizer: LatentNormalizer
    diffusion: DiffusionConfig
    latent_shape: tuple[int, ...]
    step: int
    weights: str
    """Which U-Net weights were loaded: ema | raw."""
    text_config_2: TextEncoderConfig | None = None
    """SDXL's second text encoder (text_encoder is then the pair, models/sdxl_text.py)."""
    lora: LoraConfig | None = None
    """A LoRA run's adapters (the U-Net holds them on its base weights); None for full fine-tuning."""


def _base_parts(config: ModelConfig, path: str) -> ModelParts:
    """A LoRA run's base model, read from where training read it (its adapters then go in)."""
    from sdtrain.checkpoint.weights import read_weights

    try:
        return build_model(config, runtime=False, read=read_weights)
    except SdtrainError as exc:
        raise CheckpointError(
            f"checkpoint {path} holds LoRA adapters on base model {config.pretrained or config.unet.pretrained}, "
            f"which does not load here: {exc}"
        ) from None


def load_trained(path: str, weights: str = "ema", device: str | torch.device = "cpu") -> TrainedModel:
    """Rebuild the model in `path` (a training checkpoint); CheckpointError with one line if it cannot."""
    if weights not in WEIGHTS:
        raise CheckpointError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    checkpoint = load_full_checkpoint(path)
    spec = sdtrain_state(checkpoint).get(SPEC_KEY)
    if not spec:
        raise CheckpointError(f"checkpoint {path} has no model spec (checkpoint['sdtrain']['spec']); re-save it")
    config = model_config(spec)
    lora = bool(spec.get("lora"))
    parts = (
        _base_parts(config, path)
        if lora
        else build_model(
            config,
            pretrained=False,
            runtime=False,
            text_model=spec.get("text_model"),
            text_model_2=spec.get("text_model_2"),
        )
    )
    unet, vae, text_encoder = parts.unet, parts.vae, parts.text_encoder
    trainable = {name for name, p in unet.named_parameters() if p.requires_grad}
    for name in ("unet",) if lora else PARTS:  # a LoRA checkpoint holds the adapters, on the rebuilt base
        state = part_state(checkpoint, name)
        try:
            getattr(parts, name).load_state_dict(state, strict=not lora)
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {path}: {name} weights do not fit its spec: {str(exc)[:300]}") from None
        if lora and trainable - set(state):
            raise CheckpointError(f"checkpoint {path} lacks {len(trainable - set(state))} LoRA adapter tensors")
    if weights == "ema":
        ema = find_ema_state(checkpoint)
        if ema is None:
            raise CheckpointError(
                f"checkpoint {path} holds no EMA weights (trained with ema disabled); use raw weights"
            )
        params = {n: p for n, p in unet.named_parameters() if n in trainable}
        missing = sorted(set(params) - set(ema["shadow"]))
        if missing:
            raise CheckpointError(f"checkpoint {path}: EMA weights lack {len(missing)} U-Net parameters ({missing[0]})")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(ema["shadow"][name])
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    return TrainedModel(
        unet=unet.eval().to(device),
        vae=vae.eval().to(device),
        text_encoder=text_encoder.to(device),
        text_config=parts.text_config,
        text_config_2=parts.text_config_2,
        lora=config.lora if lora else None,
        tokenizer=parts.tokenizer,
        normalizer=LatentNormalizer.from_dict(spec["normalizer"]),
        diffusion=DiffusionConfig(**spec["diffusion"]),
        latent_shape=tuple(spec["latent_shape"]),
        step=int(checkpoint.get("global_step", 0)),
        weights=weights,
    )
