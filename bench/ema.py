"""EMA update cost per step: one fused `_foreach_lerp_` over all tensors (sdtrain) vs a per-parameter loop.

    .venv/bin/python bench/ema.py

Measured on the demo U-Net (12.6M) and an SD-width U-Net slice (318M), CPU, median of 20 updates.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _util import median, step_times, table  # noqa: E402
from overhead import UNET  # noqa: E402

from sdtrain.models.diffusers_parts import UNetConfig, build_unet  # noqa: E402
from sdtrain.models.ema import EMAWeights  # noqa: E402

SD_SLICE = dict(
    UNET,
    block_out_channels=[320, 640, 1280],
    cross_attention_dim=1024,
    norm_num_groups=32,
    attention_head_dim=[5, 10, 20],
    use_linear_projection=True,
)


def per_parameter_update(shadow, params, decay):
    with torch.no_grad():
        for s, p in zip(shadow, params, strict=True):
            s.mul_(decay).add_(p.detach(), alpha=1 - decay)


def main():
    rows = []
    for name, config in (("demo U-Net", UNET), ("SD-width U-Net slice", SD_SLICE)):
        torch.manual_seed(0)
        unet = build_unet(UNetConfig(config=config))
        n = sum(p.numel() for p in unet.parameters())
        ema = EMAWeights(unet)
        params = [p for p in unet.parameters()]
        fused = median(step_times(lambda: ema.update(0.999), 20))  # noqa: B023
        loop = median(step_times(lambda: per_parameter_update(ema.shadow, params, 0.999), 20))  # noqa: B023
        rows.append([name, f"{n / 1e6:.1f}M", len(params), fused * 1e3, loop * 1e3, loop / fused])
    print(table(["model", "params", "tensors", "foreach ms", "per-param ms", "per-param / foreach"], rows))


if __name__ == "__main__":
    main()
