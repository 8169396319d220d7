"""What the first stage hands to the second: DIR/vae/, a diffusers AutoencoderKL folder, and its latents'
statistics, so `sdtrain-encode --vae DIR/vae` writes manifests whose scaling/shift make the U-Net's latents
zero-mean and unit-variance.

- `config.json`'s `scaling_factor` is 1 / std of the posterior means over all channels (what SD's 0.18215 is
  for its VAE, and what diffusers' pipelines read); `shift_factor` stays null there, since SD pipelines ignore
  it and SD3's expect a single number;
- `latent_statistics.json` beside it holds the measurement: per-channel mean and std, the overall std, the
  image count, and `shift_factor` (the per-channel means), which sdtrain-encode copies into the manifest.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from diffusers import AutoencoderKL

from sdtrain.models.diffusers_parts import LATENT_STATISTICS
from sdtrain.vae.metrics import encode_moments

log = logging.getLogger(__name__)


def latent_statistics(moments: torch.Tensor) -> dict[str, Any]:
    """Per-channel statistics of posterior means (moments (N, 2C, h, w)) and the scale/shift they imply."""
    means = moments[:, : moments.shape[1] // 2].double()
    per_channel_mean = means.mean(dim=(0, 2, 3))
    centred = means - per_channel_mean[None, :, None, None]
    overall_std = float(centred.std())
    return {
        "images": int(moments.shape[0]),
        "mean": [float(v) for v in per_channel_mean],
        "std": [float(v) for v in means.std(dim=(0, 2, 3))],
        "std_overall": overall_std,
        "scaling_factor": 1.0 / max(overall_std, 1e-12),
        "shift_factor": [float(v) for v in per_channel_mean],
    }


def write_vae_folder(vae: AutoencoderKL, folder: str, images: torch.Tensor) -> dict[str, Any]:
    """Measure the latent statistics on `images` ((N, 3, H, W) in [-1, 1]), then save the VAE with them."""
    stats = latent_statistics(encode_moments(vae, images))
    vae.register_to_config(scaling_factor=stats["scaling_factor"], shift_factor=None)
    vae.save_pretrained(folder, safe_serialization=True)
    with open(os.path.join(folder, LATENT_STATISTICS), "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2)
    log.info(
        "wrote %s: scaling_factor %.4f, shift %s (measured on %d images)",
        folder,
        stats["scaling_factor"],
        [round(v, 3) for v in stats["shift_factor"]],
        stats["images"],
    )
    return stats
