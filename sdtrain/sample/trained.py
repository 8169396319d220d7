"""A trained model back from its checkpoint alone: U-Net (EMA or raw weights), frozen text encoder, VAE, scheduler.

Everything needed is inside the checkpoint (weights + checkpoint["sdtrain"]["spec"], see training/spec.py), so a
checkpoint copied to another machine samples and exports without the run folder or its config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from sdtrain.data.loader import LatentNormalizer
from sdtrain.diffusion.objective import DiffusionConfig
from sdtrain.errors import CheckpointError
from sdtrain.models.ema import find_ema_state
from sdtrain.models.pretrained import under_prefix
from sdtrain.models.text_encoder import (
    CLIPTokenizer,
    FrozenOpenCLIPText,
    TextEncoderConfig,
    build_text_encoder,
    build_tokenizer,
)
from sdtrain.training.checkpoint import load_full_checkpoint

log = logging.getLogger(__name__)
WEIGHTS = ("ema", "raw")


@dataclass(kw_only=True)
class TrainedModel:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: FrozenOpenCLIPText
    text_config: TextEncoderConfig
    normalizer: LatentNormalizer
    diffusion: DiffusionConfig
    latent_shape: tuple[int, ...]
    step: int
    weights: str
    """Which U-Net weights were loaded: ema | raw."""

    def tokenizer(self) -> CLIPTokenizer:
        return build_tokenizer(self.text_config.context_length)


def load_trained(path: str, weights: str = "ema", device: str | torch.device = "cpu") -> TrainedModel:
    """Rebuild the model in `path` (a training checkpoint); CheckpointError with one line if it cannot."""
    if weights not in WEIGHTS:
        raise CheckpointError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    checkpoint = load_full_checkpoint(path)
    spec = (checkpoint.get("sdtrain") or {}).get("spec")
    if not spec:
        raise CheckpointError(f"checkpoint {path} has no model spec (checkpoint['sdtrain']['spec']); re-save it")
    state = checkpoint["state_dict"]
    unet = UNet2DConditionModel.from_config(spec["unet"])
    vae = AutoencoderKL.from_config(spec["vae"])
    text_config = TextEncoderConfig(**spec["text_encoder"])
    text_encoder = build_text_encoder(text_config)
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        try:
            module.load_state_dict(under_prefix(state, f"{name}."), strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {path}: {name} weights do not fit its spec: {str(exc)[:300]}") from None
    if weights == "ema":
        ema = find_ema_state(checkpoint)
        if ema is None:
            raise CheckpointError(
                f"checkpoint {path} holds no EMA weights (trained with ema disabled); use raw weights"
            )
        params = dict(unet.named_parameters())
        missing = sorted(set(params) - set(ema["shadow"]))
        if missing:
            raise CheckpointError(f"checkpoint {path}: EMA weights lack {len(missing)} U-Net parameters ({missing[0]})")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(ema["shadow"][name])
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    normalizer = spec["normalizer"]
    return TrainedModel(
        unet=unet.eval().to(device),
        vae=vae.eval().to(device),
        text_encoder=text_encoder.to(device),
        text_config=text_config,
        normalizer=LatentNormalizer(float(normalizer["scale"]), [float(s) for s in normalizer["shift"]]),
        diffusion=DiffusionConfig(**spec["diffusion"]),
        latent_shape=tuple(spec["latent_shape"]),
        step=int(checkpoint.get("global_step", 0)),
        weights=weights,
    )
