"""Attention backends: U-Net forward+backward time and peak memory with SDPA (torch's fused kernels: flash /
memory-efficient) vs `math` (the reference: materialises the tokens x tokens matrix), at 32x32 and 64x64 latents.

    .venv/bin/python bench/attention.py

Each (backend, size) runs in its own process so its peak resident memory is its own (CPU: ru_maxrss).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _util import median, step_times, table  # noqa: E402

# self-attention at full latent resolution (4 heads of 8), where the backends differ most
UNET = dict(
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=[32, 64],
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=8,
)
BATCH = 2


def measure(backend: str, size: int) -> dict:
    import psutil
    import torch

    from sdtrain.models.diffusers_parts import UNetConfig, build_unet
    from sdtrain.models.unet_runtime import UNetRuntimeConfig, apply_runtime

    torch.manual_seed(0)
    unet = apply_runtime(
        build_unet(UNetConfig(config=dict(UNET, sample_size=size))), UNetRuntimeConfig(attention=backend)
    )
    x, t, c = torch.randn(BATCH, 4, size, size), torch.tensor([500] * BATCH), torch.randn(BATCH, 77, 64)

    def step():
        unet(x, t, encoder_hidden_states=c).sample.square().mean().backward()

    step()  # warm-up allocations
    base = psutil.Process().memory_info().rss
    times = step_times(step, 3, warmup=0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": median(times), "peak_mib": (peak - base) / 2**20}


def main():
    if len(sys.argv) == 3:  # child: one measurement
        print(json.dumps(measure(sys.argv[1], int(sys.argv[2]))))
        return
    rows = []
    for size in (32, 64):
        result = {}
        for backend in ("sdpa", "math"):
            out = subprocess.run(
                [sys.executable, __file__, backend, str(size)], capture_output=True, text=True, check=True
            )
            result[backend] = json.loads(out.stdout.strip().splitlines()[-1])
        s, m = result["sdpa"], result["math"]
        rows.append(
            [
                f"{size}x{size} ({size * size} tokens)",
                s["seconds"],
                m["seconds"],
                s["seconds"] / m["seconds"],
                s["peak_mib"],
                m["peak_mib"],
                s["peak_mib"] / max(m["peak_mib"], 1e-9),
            ]
        )
    print(f"U-Net forward+backward, batch {BATCH}, self-attention at full latent resolution, CPU")
    print(
        table(
            ["latents", "sdpa s", "math s", "time sdpa/math", "sdpa peak MiB", "math peak MiB", "memory sdpa/math"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
