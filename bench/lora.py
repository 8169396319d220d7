"""LoRA vs full fine-tuning on the same U-Net, side by side: trainable parameters, optimizer-state memory, and
the time of one training step (forward + backward + AdamW step), CPU, median of N steps.

    .venv/bin/python bench/lora.py            # the demo U-Net (12.6M) and an SD-width U-Net slice (318M)
    .venv/bin/python bench/lora.py --quick    # the demo U-Net only

LoRA at rank 8 on every attention projection (model.lora's default targets), as sdtrain-train builds it
(models/lora.py); the optimizer is sdtrain's AdamW over what trains (training/optim.py).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _util import median, step_times, table  # noqa: E402
from ema import SD_SLICE  # noqa: E402
from overhead import UNET  # noqa: E402

from sdtrain.models.diffusers_parts import UNetConfig, build_unet  # noqa: E402
from sdtrain.models.lora import LoraConfig, apply_lora  # noqa: E402

BATCH, RANK = 4, 8


def measure(config: dict, lora: bool, steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    unet = build_unet(UNetConfig(config=config))
    if lora:
        apply_lora(unet, LoraConfig(rank=RANK))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    size = config["sample_size"]
    latents = torch.randn(BATCH, 4, size, size)
    context = torch.randn(BATCH, 77, config["cross_attention_dim"])
    timesteps = torch.randint(0, 1000, (BATCH,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        unet(latents, timesteps, encoder_hidden_states=context).sample.square().mean().backward()
        optimizer.step()

    seconds = median(step_times(step, steps, warmup=2))
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim())
    return {"trainable": sum(p.numel() for p in params), "total": sum(p.numel() for p in unet.parameters()),
            "optimizer_bytes": state, "step_s": seconds}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    cases = [("demo U-Net", UNET, 10)] + ([] if args.quick else [("SD-width U-Net slice", SD_SLICE, 4)])
    rows = []
    for name, config, steps in cases:
        full, lora = measure(config, False, steps), measure(config, True, steps)
        rows.append([
            name, f"{full['total'] / 1e6:.1f}M", f"{lora['trainable'] / 1e6:.3f}M",
            f"{lora['trainable'] / full['trainable']:.2%}",
            f"{full['optimizer_bytes'] / 2**20:.1f} / {lora['optimizer_bytes'] / 2**20:.2f} MiB",
            f"{lora['optimizer_bytes'] / full['optimizer_bytes']:.2%}",
            f"{full['step_s']:.3f} / {lora['step_s']:.3f} s", f"{lora['step_s'] / full['step_s']:.2f}x",
        ])  # fmt: skip
    header = ["U-Net", "params", "LoRA trainable", "trainable ratio", "AdamW state full / LoRA", "ratio",
              "step full / LoRA", "step ratio"]  # fmt: skip
    print(f"batch {BATCH}, LoRA rank {RANK} on to_q/to_k/to_v/to_out.0, CPU, {torch.get_num_threads()} threads")
    print(table(header, rows))


if __name__ == "__main__":
    main()
