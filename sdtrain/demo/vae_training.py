"""Train a small diffusers AutoencoderKL (L1 reconstruction + a light KL term) so latents decode to pictures.

Only for the CPU demo and tests: real runs use SD's VAE from a local folder.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL

from sdtrain.seeding import numpy_rng, seed_everything

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class VAETrainConfig:
    block_out_channels: tuple[int, ...] = (16, 32, 64)  # 3 levels: 4x downsampling
    latent_channels: int = 4
    batch_size: int = 16
    lr: float = 1.5e-3
    kl_weight: float = 1e-6
    max_seconds: float = 150.0
    max_steps: int = 100_000
    seed: int = 0


def build_small_vae(cfg: VAETrainConfig, image_size: int) -> AutoencoderKL:
    levels = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=cfg.latent_channels,
        block_out_channels=cfg.block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=image_size,
        mid_block_add_attention=False,
    )


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = torch.mean((reconstruction.clamp(-1, 1) - target) ** 2).item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def train_vae(pixels: np.ndarray, cfg: VAETrainConfig) -> tuple[AutoencoderKL, list[float]]:
    """Train on `pixels` (N, 3, H, W) in [-1, 1] until max_seconds or max_steps; returns (vae, losses)."""
    seed_everything(cfg.seed)
    vae = build_small_vae(cfg, pixels.shape[-1])
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr)
    data = torch.from_numpy(pixels)
    rng = numpy_rng(cfg.seed)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(cfg.max_steps):
        if time.perf_counter() - start > cfg.max_seconds:
            break
        x = data[rng.integers(0, len(data), cfg.batch_size)]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = (reconstruction - x).abs().mean() + cfg.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 100 == 0:
            log.info("vae step %d loss %.4f", step, loss.item())
    return vae.eval().requires_grad_(False), losses


@torch.no_grad()
def encode_moments(vae: AutoencoderKL, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Posterior moments (N, 2C, h, w): mean ++ logvar, the shard format's `moments.npy`."""
    out = []
    for i in range(0, len(pixels), batch_size):
        out.append(vae.encode(torch.from_numpy(pixels[i : i + batch_size])).latent_dist.parameters.numpy())
    return np.concatenate(out)


def latent_statistics(moments: np.ndarray) -> tuple[float, list[float]]:
    """(scaling_factor, per-channel shift) that make the posterior means roughly zero-mean, unit-variance."""
    channels = moments.shape[1] // 2
    means = moments[:, :channels]
    shift = means.mean(axis=(0, 2, 3))
    std = (means - shift[None, :, None, None]).std()
    return float(1.0 / std), [float(s) for s in shift]
