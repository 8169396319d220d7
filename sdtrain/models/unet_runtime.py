"""How the U-Net runs, apart from what it is: attention backend, gradient checkpointing, channels_last, compile.

`model.attention`:
- sdpa (default): torch's scaled_dot_product_attention, which picks flash / memory-efficient kernels on GPU;
- xformers: xformers' memory_efficient_attention, only where it imports and runs (CUDA); else a one-line error;
- math: the reference implementation that materialises the tokens x tokens matrix;
- auto: xformers when it works here, otherwise sdpa (and the log says why).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor
from torch import nn

from sdtrain.errors import ConfigError

log = logging.getLogger(__name__)
ATTENTION = ("sdpa", "xformers", "math", "auto")
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MAX_SHAPES = 64  # graphs per compiled U-Net (torch's default of 8 recompiles would fall back to eager with buckets)


@dataclass(kw_only=True, slots=True)
class UNetRuntimeConfig:
    attention: str = "sdpa"
    """sdpa | xformers | math | auto (see the module docstring)."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in backward: less memory, ~30% more compute."""
    channels_last: bool = False
    """NHWC memory format: faster convolutions on tensor-core GPUs."""
    compile: bool = False
    """torch.compile the U-Net (in place: parameter names do not change). Static shapes: each aspect-ratio bucket
    (and the validation/sampling shapes) gets its own graph, up to MAX_SHAPES, rather than one dynamic graph."""
    compile_mode: str | None = None
    """torch.compile mode: null (default) | reduce-overhead (CUDA graphs: one per shape) | max-autotune
    (autotuned kernels + CUDA graphs) | max-autotune-no-cudagraphs."""

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {self.attention!r}")
        if self.compile_mode not in COMPILE_MODES:
            modes = ", ".join(str(m).replace("None", "null") for m in COMPILE_MODES)
            raise ValueError(f"compile_mode must be one of {modes}, got {self.compile_mode!r}")


@functools.cache
def xformers_problem() -> str | None:
    """Why xformers cannot run in this process (None when a real attention call on the GPU works)."""
    try:
        import xformers.ops
    except Exception as exc:  # noqa: BLE001 - ImportError, or a build for another torch failing in any way
        return f"xformers does not import ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:120]})"
    if not torch.cuda.is_available():
        return "xformers kernels need a CUDA GPU and none is visible"
    try:
        q = torch.randn(1, 8, 1, 8, device="cuda", dtype=torch.float16)
        xformers.ops.memory_efficient_attention(q, q, q)
    except Exception as exc:  # noqa: BLE001 - a probe: any failure means it cannot run here
        return f"xformers' kernels do not run on this GPU/torch ({type(exc).__name__}: {str(exc).strip()[:120]})"
    return None


def attention_processor(name: str) -> AttnProcessor | AttnProcessor2_0 | XFormersAttnProcessor:
    if name == "auto":
        problem = xformers_problem()
        if problem is None:
            return XFormersAttnProcessor()
        log.info("model.attention=auto: using sdpa (%s)", problem)
        return AttnProcessor2_0()
    if name == "xformers":
        problem = xformers_problem()
        if problem is not None:
            raise ConfigError(f"model.attention=xformers: {problem}; use model.attention=sdpa or auto")
        return XFormersAttnProcessor()
    return AttnProcessor() if name == "math" else AttnProcessor2_0()


def apply_runtime(unet: nn.Module, cfg: UNetRuntimeConfig) -> nn.Module:
    unet.set_attn_processor(attention_processor(cfg.attention))
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.channels_last:
        unet.to(memory_format=torch.channels_last)
    if cfg.compile:
        from torch._dynamo import config as dynamo

        dynamo.recompile_limit = max(dynamo.recompile_limit, MAX_SHAPES)
        unet.compile(mode=cfg.compile_mode, dynamic=False)
    return unet
