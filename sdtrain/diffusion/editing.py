"""What an edit starts from: an init image (img2img, SDEdit) and, for an inpainting U-Net, a mask.

Conventions are diffusers' (StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline), so an exported
model edits the same way in plain diffusers: pixels in [-1, 1]; mask white (1) = repaint, black (0) = keep; the
masked image is `image * (mask < 0.5)`; the U-Net's mask channel is the pixel mask resized (nearest) to the latent
size. The init image is encoded to its posterior mean (deterministic: strength 0 gives back the VAE round trip).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn

from sdtrain.errors import ConfigError
from sdtrain.models.diffusers_parts import vae_scale_factor


@dataclass(frozen=True, slots=True)
class EditInputs:
    """Per image: pixels (N, 3, H, W) in [-1, 1] and, for inpainting, masks (N, 1, H, W) in {0, 1}."""

    pixels: torch.Tensor | None
    masks: torch.Tensor | None = None
    strength: float = 1.0


def read_image(path: str, what: str = "init image") -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ConfigError(f"{what} {path} is not a readable image ({exc})") from None


def to_pixels(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """(3, height, width) in [-1, 1], resized with Lanczos when the sizes differ."""
    rgb = image.convert("RGB")
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.LANCZOS)
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def to_mask(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """(1, height, width) in {0, 1}: grey level >= 128 is 1 (repaint); resized with nearest neighbour."""
    grey = image.convert("L")
    if grey.size != (width, height):
        grey = grey.resize((width, height), Image.NEAREST)
    return torch.from_numpy((np.asarray(grey) >= 128).astype(np.float32))[None]


def load_edit_inputs(
    images: Sequence[str], masks: Sequence[str], *, height: int, width: int, strength: float
) -> EditInputs:
    """Init images (and masks, the same number) as tensors at the sampling size; one-line ConfigErrors."""
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"strength must be in [0, 1], got {strength}")
    if masks and len(masks) != len(images):
        raise ConfigError(f"{len(masks)} masks for {len(images)} init images: give one mask per image")
    pixels, mask_tensors = [], []
    for i, path in enumerate(images):
        image = read_image(path)
        pixels.append(to_pixels(image, height, width))
        if masks:
            mask = read_image(masks[i], "mask")
            if mask.size != image.size:
                raise ConfigError(
                    f"mask {masks[i]} is {mask.size[0]}x{mask.size[1]} px, its init image {path} is "
                    f"{image.size[0]}x{image.size[1]}: they must be the same size"
                )
            mask_tensors.append(to_mask(mask, height, width))
    return EditInputs(torch.stack(pixels), torch.stack(mask_tensors) if masks else None, strength)


@torch.no_grad()
def encode_pixels(
    vae: nn.Module, pixels: torch.Tensor, normalize: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Normalised latents of `pixels` (N, 3, H, W): the VAE posterior's mean."""
    param = next(vae.parameters())
    mean = vae.encode(pixels.to(param.device, param.dtype)).latent_dist.mean
    return normalize(mean.float())


def inpainting_channels(
    vae: nn.Module,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    pixels: torch.Tensor | None,
    masks: torch.Tensor | None,
    latent_shape: Sequence[int],
    count: int,
) -> torch.Tensor:
    """The extra U-Net input of an inpainting model, (N, 1 + C, h, w): mask at latent size ++ masked-image
    latents. Without an image or mask (text-to-image from an inpainting model, e.g. the training grids)
    everything is masked, as the SD inpainting recipe trains a share of samples."""
    _, h, w = latent_shape
    factor = vae_scale_factor(vae)
    if pixels is None or masks is None:
        pixels = torch.zeros(count, 3, h * factor, w * factor)
        masks = torch.ones(count, 1, h * factor, w * factor)
    masked = pixels * (masks < 0.5)
    latents = encode_pixels(vae, masked, normalize)
    small = F.interpolate(masks.float(), size=(h, w)).to(latents.device)
    return torch.cat([small, latents], dim=1)
