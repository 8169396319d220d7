"""`sdtrain-plan`: what a run will cost before it is queued, from the same Hydra overrides as training.

    sdtrain-plan --gpu H100 --gpus 8 --sharding zero2 --images 1e9 --mfu 0.40 -- model=sd2 trainer=gpu

Parameters and FLOPs are counted on the meta device (nothing is allocated). Memory per rank follows the ZeRO
paper's accounting (Rajbhandari et al. 2020) for Adam with mixed precision; activations are counted as the bytes
of tensors the U-Net saves for backward at batch 1 (fp32 on the meta device, halved for 16-bit autocast: an
estimate, since autocast keeps some tensors in fp32). Time assumes the given MFU.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from sdtrain.config import config_error_line, to_object
from sdtrain.errors import SdtrainError, one_line
from sdtrain.launch.config import CONFIG_ERRORS, compose_config
from sdtrain.models.builder import ModelConfig, build_model
from sdtrain.models.conditioning import example_inputs
from sdtrain.models.pipeline_folder import architecture, describe_text_model
from sdtrain.training.metrics import PEAK_FLOPS, precision_key, training_flops_per_image

GIB = 2**30
SHARDINGS = ("ddp", "zero1", "zero2", "zero3", "fsdp")


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    weights: float
    grads: float
    optimizer: float
    ema: float
    frozen: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.ema + self.frozen + self.activations


def per_rank_memory(
    trainable: int, frozen: int, activation_bytes: float, *, sharding: str, ranks: int, half: bool
) -> MemoryPlan:
    """Bytes per rank. DDP under Lightning's mixed precision keeps fp32 weights and grads; DeepSpeed/FSDP keep
    16-bit weights/grads plus fp32 master weights inside the optimizer state (12 bytes/param with Adam)."""
    p, n = trainable, ranks
    if sharding == "ddp" or not half:
        weights, grads, optimizer = 4 * p, 4 * p, 8 * p
        if sharding != "ddp":  # fp32 everywhere, sharded as the stage says
            optimizer /= n
            grads = grads / n if sharding in ("zero2", "zero3", "fsdp") else grads
            weights = weights / n if sharding in ("zero3", "fsdp") else weights
    else:
        weights = 2 * p / n if sharding in ("zero3", "fsdp") else 2 * p
        grads = 2 * p / n if sharding in ("zero2", "zero3", "fsdp") else 2 * p
        optimizer = 12 * p / n
    ema = 4 * p / n if sharding in ("zero3", "fsdp") else 4 * p
    return MemoryPlan(weights, grads, optimizer, ema, (2 if half else 4) * frozen, activation_bytes)


def saved_activation_bytes(
    unet: torch.nn.Module, latent_shape: tuple[int, ...], context_dim: int, context_length: int = 77
) -> tuple[int, int]:
    """Bytes of tensors autograd keeps for backward in one U-Net forward at batch 1 (on the meta device), as
    (everything but self-attention matrices, self-attention matrices). The meta device runs SDPA's math path,
    which saves the (tokens x tokens) probabilities; flash/memory-efficient kernels on GPU do not."""
    total, attention = 0, 0
    tokens = latent_shape[-1] * latent_shape[-2]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total, attention
        size = tensor.numel() * tensor.element_size()
        if tensor.dim() >= 3 and tensor.shape[-1] == tensor.shape[-2] and tensor.shape[-1] * 4 >= tokens // 16:
            attention += size
        else:
            total += size
        return tensor

    with torch.device("meta"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        conditioning = example_inputs(dict(unet.config), context_length, context_dim)
        unet(torch.randn(1, *latent_shape), torch.tensor([500]), **conditioning)
    return total, attention


def plan(cfg: DictConfig, *, gpu: str, gpus: int, sharding: str, images: float, assumed_mfu: float) -> str:
    model_cfg: ModelConfig = to_object(cfg.model, "model", ModelConfig)
    model_cfg, text_model = architecture(model_cfg)  # a pretrained folder's configs, no weights read
    text_model_2 = describe_text_model(model_cfg.text_encoder_2)
    precision = str(cfg.trainer.precision)
    half = precision.startswith(("bf16", "16"))
    with torch.device("meta"):  # the training builder, random init, nothing allocated
        parts = build_model(
            model_cfg, pretrained=False, runtime=False, text_model=text_model, text_model_2=text_model_2
        )
    unet, text, vae = parts.unet, parts.text_encoder, parts.vae
    trainable = sum(p.numel() for p in unet.parameters())
    frozen = sum(p.numel() for p in text.parameters()) + sum(p.numel() for p in vae.parameters())
    size = unet.config.sample_size
    latent_shape = (unet.config.in_channels, size, size)
    context = unet.config.cross_attention_dim
    flops = training_flops_per_image(unet, latent_shape, text, parts.tokenizer.context_length)
    saved = saved_activation_bytes(unet, latent_shape, context, parts.tokenizer.context_length)
    activations, attention = (b * (0.5 if half else 1.0) for b in saved)
    batch = int(cfg.data.batch_size)
    memory = per_rank_memory(trainable, frozen, activations * batch, sharding=sharding, ranks=gpus, half=half)
    if gpu not in PEAK_FLOPS:
        raise SdtrainError(f"--gpu {gpu!r} is not in the peak-FLOPs table ({', '.join(PEAK_FLOPS)})")
    peak = PEAK_FLOPS[gpu][precision_key(precision)]
    seconds = images * flops / (gpus * peak * assumed_mfu)
    rows = [
        ("U-Net parameters (trainable)", f"{trainable / 1e6:,.1f} M"),
        ("frozen parameters (text encoder + VAE)", f"{frozen / 1e6:,.1f} M"),
        ("latents / image size", f"{latent_shape} / {size * 8} px"),
        ("training FLOPs per image (U-Net fwd+bwd + text fwd)", f"{flops / 1e12:.3f} TFLOP"),
        (f"memory per rank, {sharding}, {precision}, batch {batch}/rank", f"{memory.total / GIB:,.1f} GiB"),
        (
            "  weights / grads / optimizer",
            f"{memory.weights / GIB:.1f} / {memory.grads / GIB:.1f} / {memory.optimizer / GIB:.1f} GiB",
        ),
        (
            "  EMA / frozen parts / activations (est.)",
            f"{memory.ema / GIB:.1f} / {memory.frozen / GIB:.1f} / {memory.activations / GIB:.1f} GiB",
        ),
        ("  + math (non-flash) attention would add", f"{attention * batch / GIB:,.1f} GiB"),
        (f"throughput at {assumed_mfu:.0%} MFU on {gpus}x {gpu}", f"{gpus * peak * assumed_mfu / flops:,.0f} img/s"),
        (f"time for {images:,.0f} images", f"{seconds / 3600:,.1f} h ({seconds / 86400:,.2f} days)"),
        ("GPU-hours", f"{seconds * gpus / 3600:,.0f}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sdtrain-plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpu", default="H100", help=f"one of {', '.join(PEAK_FLOPS)}")
    parser.add_argument("--gpus", type=int, default=8, help="total GPUs (ranks)")
    parser.add_argument("--sharding", choices=SHARDINGS, default="ddp")
    parser.add_argument("--images", type=float, default=1e9, help="images to train on (steps x global batch)")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation")
    parser.add_argument("overrides", nargs="*", help="training overrides (after --)")
    args = parser.parse_args(argv)
    try:
        cfg = compose_config(args.overrides)
        print(plan(cfg, gpu=args.gpu, gpus=args.gpus, sharding=args.sharding, images=args.images, assumed_mfu=args.mfu))
    except SdtrainError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except CONFIG_ERRORS as exc:
        print(f"error: {config_error_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
