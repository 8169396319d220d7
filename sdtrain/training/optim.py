"""AdamW over the U-Net with linear warmup, then cosine decay or a constant rate."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_steps: int = 500
    schedule: str = "constant"
    """constant | cosine (to min_lr_ratio * lr at trainer.max_steps)."""
    min_lr_ratio: float = 0.0
    on_nonfinite_loss: str = "skip"
    """skip: a NaN/Inf loss skips that step (counted, logged); stop: end the run with a clear message."""
    max_nonfinite_skips: int = 100
    """Stop anyway after this many skipped steps: a run that keeps diverging is not worth continuing."""
    fused: bool | None = None
    """torch's fused AdamW (one kernel per step, and it skips non-finite steps on the device: training/nonfinite.py);
    null = wherever torch has the kernel for the parameters' device and dtype (CUDA and CPU today)."""

    def __post_init__(self) -> None:
        if self.on_nonfinite_loss not in ("skip", "stop"):
            raise ValueError(f"on_nonfinite_loss must be skip or stop, got {self.on_nonfinite_loss!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be constant or cosine, got {self.schedule!r}")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError("lr must be > 0 and warmup_steps >= 0")


def lr_multiplier(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or max_steps <= cfg.warmup_steps:
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / (max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def fused_supported(params: list[torch.nn.Parameter]) -> bool:
    """Whether torch has a fused AdamW kernel for every parameter (device type and floating dtype)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = _get_fused_kernels_supported_devices()
    return bool(params) and all(p.device.type in devices and p.is_floating_point() for p in params)


def build_optimizer(
    params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
    cfg: OptimConfig,
    max_steps: int,
    cpu_adam: bool = False,
) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """AdamW and its schedule. `cpu_adam`: DeepSpeed's vectorised CPU AdamW (same math) for a ZeRO-Offload step."""
    groups = list(params)
    if groups and isinstance(groups[0], dict):  # parameter groups (e.g. the VAE job's discriminator at its own lr)
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
        params = [p for g in groups for p in g["params"]]
    else:
        params = [p for p in groups if p.requires_grad]
        groups = params
    hyper = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.eps)
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer: torch.optim.Optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True, **hyper)
    else:
        fused = fused_supported(params) if cfg.fused is None else cfg.fused
        optimizer = torch.optim.AdamW(groups, fused=fused or None, **hyper)
    scheduler = LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg, max_steps))
    return optimizer, scheduler
