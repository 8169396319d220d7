"""How good an autoencoder is on held-out images: PSNR and rFID (FID of reconstructions vs originals)."""

from __future__ import annotations

import math

import torch
from diffusers import AutoencoderKL

from sdtrain.models.inception import InceptionFeatures, fid


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = torch.mean((reconstruction.clamp(-1, 1).float() - target.float()) ** 2).item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Decode(posterior mean) of images (N, 3, H, W) in [-1, 1], batched, on the VAE's device; returned on CPU."""
    device, dtype = vae.device, vae.dtype
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device, dtype)
        out.append(vae.decode(vae.encode(x).latent_dist.mode()).sample.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_moments(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Posterior moments (N, 2C, h, w), mean ++ logvar (the shard format's `moments.npy`), on CPU."""
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(vae.device, vae.dtype)
        out.append(vae.encode(x).latent_dist.parameters.float().cpu())
    return torch.cat(out)


def reconstruction_fid(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """rFID: FID between reconstructions and their originals (TF-Inception features, as sdtrain-eval's FID)."""
    features = InceptionFeatures(device=reconstruction.device)
    return fid(features((reconstruction.clamp(-1, 1) + 1) / 2), features((target + 1) / 2))
