"""What a checkpoint needs to rebuild its model without the run's config: saved as checkpoint["sdtrain"]["spec"].

The U-Net and VAE configs are the diffusers configs actually built (so a `pretrained` folder is not needed
again); the text encoder config is the architecture only (its weights are in the state dict, like the VAE's).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from sdtrain.data.loader import LatentNormalizer
from sdtrain.diffusion.objective import DiffusionConfig
from sdtrain.models.text_encoder import TextEncoderConfig


def diffusers_config(model: nn.Module) -> dict[str, Any]:
    """A diffusers model's config as plain data (no private `_` keys, tuples as lists)."""
    plain = {}
    for key, value in dict(model.config).items():
        if not key.startswith("_"):
            plain[key] = list(value) if isinstance(value, tuple) else value
    return plain


def build_spec(
    *,
    unet: nn.Module,
    vae: nn.Module,
    text_encoder: TextEncoderConfig,
    diffusion: DiffusionConfig,
    normalizer: LatentNormalizer,
    latent_shape: tuple[int, ...],
) -> dict[str, Any]:
    return {
        "unet": diffusers_config(unet),
        "vae": diffusers_config(vae),
        "text_encoder": {**dataclasses.asdict(text_encoder), "pretrained": None},
        "diffusion": dataclasses.asdict(diffusion),
        "normalizer": {"scale": normalizer.scale, "shift": list(normalizer.shift)},
        "latent_shape": list(latent_shape),
    }
