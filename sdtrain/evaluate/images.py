"""Reference image sets on disk: a folder of images with optional same-name .txt captions (the demo's layout,
and Tux Paint's). Unreadable images and non-UTF-8 captions are skipped and counted, never fatal."""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from sdtrain.errors import DataError
from sdtrain.prep.images import to_rgb

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(kw_only=True)
class ImageSet:
    images: torch.Tensor
    """(N, 3, size, size) in [0, 1]."""
    captions: list[str | None]
    names: list[str]
    skipped: Counter[str] = field(default_factory=Counter)


def read_image_folder(folder: str, size: int, limit: int | None = None) -> ImageSet:
    if not os.path.isdir(folder):
        raise DataError(f"image folder not found: {folder}")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    images, captions, kept = [], [], []
    skipped: Counter[str] = Counter()
    for name in names:
        if limit is not None and len(images) >= limit:
            break
        try:
            with Image.open(os.path.join(folder, name)) as image:
                rgb = to_rgb(image).resize((size, size), Image.Resampling.BICUBIC)
        except (UnidentifiedImageError, OSError):
            skipped["bad_image"] += 1
            continue
        caption_path = os.path.join(folder, os.path.splitext(name)[0] + ".txt")
        caption = None
        if os.path.isfile(caption_path):
            try:
                with open(caption_path, encoding="utf-8") as f:
                    caption = f.read().strip() or None
            except UnicodeDecodeError:
                skipped["bad_caption"] += 1
        images.append(torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1))
        captions.append(caption)
        kept.append(name)
    if not images:
        raise DataError(f"no readable image in {folder} (skipped: {dict(skipped) or 'none found'})")
    if skipped:
        log.warning("%s: skipped %s", folder, dict(skipped))
    return ImageSet(images=torch.stack(images), captions=captions, names=kept, skipped=skipped)


def mean_colour_images(images: torch.Tensor) -> torch.Tensor:
    """The baseline: each image replaced by a flat fill of its own mean colour."""
    return images.mean(dim=(2, 3), keepdim=True).expand_as(images).contiguous()
