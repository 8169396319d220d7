"""Training masks for inpainting models, drawn as the SD inpainting recipe did, and what the shards store.

SD 1.5/2 inpainting trained on synthetic masks (LaMa-style random thick strokes and boxes) and, in 25% of the
samples, a mask of everything, so the model still does text-to-image. The U-Net needs the *masked image's* latents,
which only the pixels can give: `sdtrain-encode --inpainting-masks K` draws K masks per sample (seeded by the
sample key, so re-runs write the same bytes), VAE-encodes each masked image and stores, beside the sample's own
moments:

    KEY.inpaint_masks.npy     uint8 (K, h, w)    the masks at latent size (nearest), 1 = repaint
    KEY.inpaint_moments.npy   float (K, 2C, h, w) VAE moments of image * (mask < 0.5), unscaled

The loader picks one of the K per sample and epoch from its seeded batch generator. Exact (these are the latents
SD's recipe trained on, not the image latent with a hole cut in it: the VAE's receptive field spreads kept pixels
under the mask) at the cost of K more encodes at prep time and K more moments per sample on disk.
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw

from sdtrain.data.samples import MASKS_MEMBER, MOMENTS_MEMBER
from sdtrain.seeding import python_rng

__all__ = ["MASKS_MEMBER", "MOMENTS_MEMBER", "draw_mask", "latent_mask", "mask_rng"]
FULL_MASK_SHARE = 0.25  # the SD inpainting recipe: "in 25% mask everything"


def mask_rng(seed: int, key: str, index: int) -> random.Random:
    return python_rng("inpaint-mask", seed, key, index)


def draw_mask(width: int, height: int, rng: random.Random, full_share: float = FULL_MASK_SHARE) -> np.ndarray:
    """A (height, width) uint8 mask in {0, 1}: everything with probability `full_share`, else 1-4 thick random
    strokes and 0-2 boxes (never empty)."""
    if rng.random() < full_share:
        return np.ones((height, width), np.uint8)
    image = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    for _ in range(rng.randint(1, 4)):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        thickness = rng.randint(max(1, side // 16), max(2, side // 5))
        points = [(x, y)]
        for _ in range(rng.randint(1, 5)):
            angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(side / 8, side / 2.5)
            x = min(max(x + length * math.cos(angle), 0), width - 1)
            y = min(max(y + length * math.sin(angle), 0), height - 1)
            points.append((x, y))
        draw.line(points, fill=255, width=thickness, joint="curve")
        for px, py in points:  # round ends
            r = thickness / 2
            draw.ellipse((px - r, py - r, px + r, py + r), fill=255)
    for _ in range(rng.randint(0, 2)):
        bw, bh = rng.uniform(0.1, 0.5) * width, rng.uniform(0.1, 0.5) * height
        x0, y0 = rng.uniform(0, width - bw), rng.uniform(0, height - bh)
        draw.rectangle((x0, y0, x0 + bw, y0 + bh), fill=255)
    return (np.asarray(image) >= 128).astype(np.uint8)


def latent_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """A pixel mask at latent size, nearest-neighbour as torch's F.interpolate (what diffusers' pipeline does)."""
    h, w = mask.shape[0] // factor, mask.shape[1] // factor
    rows = np.floor(np.arange(h) * (mask.shape[0] / h)).astype(int)
    cols = np.floor(np.arange(w) * (mask.shape[1] / w)).astype(int)
    return mask[rows][:, cols]
