"""FLOPs per image, peak FLOP/s per accelerator, and MFU: the one place these numbers are computed.

FLOPs are counted, not estimated: torch's FlopCounterMode runs the U-Net's forward + backward once on the meta
device (no memory, no compute), at the training latent size with a batch of one, plus the frozen text encoder's
forward. MFU = achieved FLOP/s / peak FLOP/s (PaLM, Chowdhery et al. 2022, appendix B), with achieved
FLOP/s = FLOPs per image x images/s. Attention FLOPs are included (torch counts SDPA).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sdtrain.models.conditioning import example_inputs

# Dense peak FLOP/s without sparsity, from the vendors' datasheets. Keys are matched against the device name.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12, "tf32": 494e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12, "tf32": 494e12},  # SXM
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12, "tf32": 156e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12, "tf32": 183e12},
    "A10G": {"bf16": 70e12, "fp16": 70e12, "fp32": 35e12, "tf32": 35e12},
    "V100": {"bf16": 0.0, "fp16": 125e12, "fp32": 15.7e12, "tf32": 0.0},
}


def precision_key(precision: str) -> str:
    """Lightning precision string -> PEAK_FLOPS column ('bf16-mixed' -> 'bf16', '32-true' -> 'fp32')."""
    if precision.startswith("bf16"):
        return "bf16"
    if precision.startswith("16"):
        return "fp16"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def peak_flops(device_name: str, precision: str, override: float | None = None) -> float | None:
    """Peak FLOP/s for a device name ('NVIDIA H100 80GB HBM3', 'H100', ...); None when unknown (e.g. CPU)."""
    if override:
        return override
    for key, table in PEAK_FLOPS.items():
        if key.lower() in device_name.lower():
            return table[precision_key(precision)] or None
    return None


def count_flops(fn: Callable[[], torch.Tensor], backward: bool = True) -> int:
    """FLOPs of fn() (+ the backward of its sum), as counted by torch."""
    with FlopCounterMode(display=False) as counter:
        out = fn()
        if backward:
            out.float().sum().backward()
    return counter.get_total_flops()


def unet_training_flops(
    unet_factory: Callable[[], nn.Module], latent_shape: tuple[int, ...], context_dim: int, context_length: int = 77
) -> int:
    """U-Net forward + backward for one image, counted on the meta device (nothing allocated or computed)."""
    with torch.device("meta"):
        unet = unet_factory()
        latents = torch.randn(1, *latent_shape)
        conditioning = example_inputs(dict(unet.config), context_length, context_dim)  # SDXL's added inputs too
        timesteps = torch.tensor([500])
        return count_flops(lambda: unet(latents, timesteps, **conditioning).sample)


def text_encoder_flops(text_encoder: nn.Module, context_length: int) -> int:
    """Forward FLOPs of the frozen text encoder for one caption, on whatever device it is (meta included)."""
    device = next(text_encoder.parameters()).device
    second = getattr(text_encoder, "second", None)
    if second is not None:  # SDXL's pair: each encoder on its own tokens
        return text_encoder_flops(text_encoder.first, context_length) + text_encoder_flops(second, context_length)
    tokens = torch.zeros(1, context_length, dtype=torch.long, device=device)
    # a transformers model is counted unmasked: the same FLOPs, and BERT's padding-mask checks read tensor values,
    # which the planner's meta tensors do not have
    hf_model = getattr(text_encoder, "model", None)
    forward = (lambda: hf_model(input_ids=tokens)) if hf_model is not None else (lambda: text_encoder(tokens))
    return count_flops(forward, backward=False)


def training_flops_per_image(
    unet: nn.Module, latent_shape: tuple[int, ...], text_encoder: nn.Module, context_length: int
) -> int:
    """What one training image costs: U-Net forward + backward and the frozen text encoder's forward. The one
    count behind MFU in training (callbacks/throughput.py) and in the planner (sdtrain-plan)."""
    from diffusers import UNet2DConditionModel

    config = dict(unet.config)
    unet_flops = unet_training_flops(
        lambda: UNet2DConditionModel.from_config(config),
        (config["in_channels"], *latent_shape[1:]),  # an inpainting U-Net also takes mask + masked-image latents
        config["cross_attention_dim"],
        context_length,
    )
    return unet_flops + text_encoder_flops(text_encoder, context_length)


def autoencoder_training_flops(config: dict[str, Any], size: int | tuple[int, int], train_encoder: bool = True) -> int:
    """A diffusers AutoencoderKL's encode + decode for one image of `size` (square if an int), with the backward
    of what is trained (decoder-only fine-tuning runs the encoder forward only), counted on the meta device."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
        height, width = (size, size) if isinstance(size, int) else size
        images = torch.randn(1, config.get("in_channels", 3), height, width)
        if train_encoder:
            return count_flops(lambda: vae.decode(vae.encode(images).latent_dist.mode()).sample)
        encode = count_flops(lambda: vae.encode(images).latent_dist.mode(), backward=False)
        latents = torch.randn(1, config["latent_channels"], *vae.encode(images).latent_dist.mode().shape[-2:])
        return encode + count_flops(lambda: vae.decode(latents).sample)


def mfu(flops_per_image: float, images_per_second: float, peak: float | None) -> float | None:
    return flops_per_image * images_per_second / peak if peak else None
