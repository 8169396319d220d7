"""Sample grids a person can read: one row per prompt (its seeds side by side), the prompt written beside the
row, and small images (the CPU demo's 32 px) upscaled with nearest-neighbour so pixels stay pixels."""

from __future__ import annotations

import math
import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

MIN_CELL = 128  # px: images smaller than this are upscaled by a whole factor
LABEL_WIDTH = 220  # px of prompt text left of each row
PAD = 4


def labelled_grid(images: torch.Tensor, prompts: list[str], per_row: int) -> Image.Image:
    """images (N, 3, H, W) in [0, 1], N = len(prompts) * per_row, row-major -> one RGB image."""
    if images.shape[0] != len(prompts) * per_row:
        raise ValueError(f"{images.shape[0]} images for {len(prompts)} prompts x {per_row} seeds")
    height, width = images.shape[-2:]
    scale = max(1, math.ceil(MIN_CELL / max(height, width)))
    cell_h, cell_w = height * scale, width * scale
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    canvas = Image.new(
        "RGB",
        (LABEL_WIDTH + per_row * (cell_w + PAD) + PAD, len(prompts) * (cell_h + PAD) + PAD),
        "white",
    )
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for row, prompt in enumerate(prompts):
        top = PAD + row * (cell_h + PAD)
        lines = textwrap.wrap(prompt, width=30)[: max(1, cell_h // 14)] or ['""']
        draw.multiline_text((PAD, top + 4), "\n".join(lines), fill="black", font=font, spacing=2)
        for col in range(per_row):
            image = Image.fromarray(np.ascontiguousarray(pixels[row * per_row + col]))
            image = image.resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(image, (LABEL_WIDTH + PAD + col * (cell_w + PAD), top))
    return canvas
