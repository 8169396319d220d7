"""Raw image bytes -> a cropped, [-1, 1] float tensor at the target (or bucket) resolution, or a counted skip.

Every way an input image can be bad maps to a reason code (`bad_image`, `too_small`); CMYK, greyscale, palette
and alpha images are converted (alpha composited on white), never fatal.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from sdtrain.data.samples import SampleError
from sdtrain.seeding import crop_rng

Image.MAX_IMAGE_PIXELS = 16384 * 16384  # refuse decompression bombs above 268 MP, not LAION's large photos


@dataclass(frozen=True, slots=True)
class Crop:
    """Where the encoded pixels came from: the spec's json fields."""

    width: int
    height: int
    original_width: int
    original_height: int
    crop_top: int
    crop_left: int

    def meta(self) -> dict[str, int]:
        return {
            "width": self.width,
            "height": self.height,
            "original_width": self.original_width,
            "original_height": self.original_height,
            "crop_top": self.crop_top,
            "crop_left": self.crop_left,
        }


def decode_mask(data: bytes, size: tuple[int, int]) -> Image.Image:
    """A loss mask as a grey image of `size` (the image's); SampleError('bad_loss_mask') otherwise."""
    try:
        with Image.open(io.BytesIO(data)) as mask:
            grey = mask.convert("L")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise SampleError("bad_loss_mask", f"mask is not a readable image: {exc}") from None
    if grey.size != size:
        raise SampleError("bad_loss_mask", f"mask is {grey.size[0]}x{grey.size[1]} px, its image {size[0]}x{size[1]}")
    return grey


def decode_image(data: bytes) -> Image.Image:
    """RGB image from file bytes; SampleError('bad_image') for anything PIL cannot fully decode."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return to_rgb(image)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise SampleError("bad_image", f"cannot decode image: {exc}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB on a white background for images with alpha or a transparent palette; CMYK/greyscale converted."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The (w, h) bucket whose aspect ratio is closest to the image's, in log space (SDXL style)."""
    ratio = np.log(width / height)
    return min(buckets, key=lambda b: (abs(np.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def resize_and_crop(
    image: Image.Image,
    size: tuple[int, int],
    *,
    random_crop: bool = False,
    rng: random.Random | None = None,
    mask: Image.Image | None = None,
) -> tuple[np.ndarray, Crop, np.ndarray | None]:
    """Resize so the image covers `size` (w, h), then crop: (3, h, w) float32 in [-1, 1], where it came from and,
    given a grey `mask` the image's size, the mask through the same resize and crop, (h, w) float32 in [0, 1]."""
    target_w, target_h = size
    scale = max(target_w / image.width, target_h / image.height)
    resized_w, resized_h = max(target_w, round(image.width * scale)), max(target_h, round(image.height * scale))
    resized = image.resize((resized_w, resized_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    if random_crop:
        rng = rng or crop_rng(0, "")
        left, top = rng.randint(0, resized_w - target_w), rng.randint(0, resized_h - target_h)
    else:
        left, top = (resized_w - target_w) // 2, (resized_h - target_h) // 2
    cropped = resized.crop((left, top, left + target_w, top + target_h))
    pixels = np.asarray(cropped, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    box = (left, top, left + target_w, top + target_h)
    mask_pixels = None
    if mask is not None:  # bilinear: an edge pixel keeps the share of its area the mask covers
        mask_pixels = np.asarray(mask.resize((resized_w, resized_h), Image.Resampling.BILINEAR).crop(box))
        mask_pixels = mask_pixels.astype(np.float32) / 255.0
    # crop offsets in original-image pixels, as SDXL's micro-conditioning expects them
    crop = Crop(target_w, target_h, image.width, image.height, round(top / scale), round(left / scale))
    return pixels, crop, mask_pixels
