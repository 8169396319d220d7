"""GPU training throughput of the SD2 U-Net: images/s and MFU at 256 and 512 px, bf16 autocast, SDPA, with
channels_last and torch.compile switched on and off. One command for the day a GPU is available:

    .venv/bin/python bench/gpu_throughput.py                 # on a CUDA machine
    .venv/bin/python bench/gpu_throughput.py --tiny          # a tiny U-Net on CPU (what the tests run)

A step is forward + backward + fused AdamW on random latents and text states (the loader and text encoder have
their own benchmarks). MFU uses the FLOPs counted by sdtrain.training.metrics and the device's peak.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch
from diffusers import UNet2DConditionModel
from omegaconf import OmegaConf

sys.path.insert(0, os.path.dirname(__file__))
from _util import table  # noqa: E402
from attention import UNET  # noqa: E402

from sdtrain.launch.config import compose_config  # noqa: E402
from sdtrain.training.metrics import mfu, peak_flops, unet_training_flops  # noqa: E402

TINY = UNET  # self-attention at full latent resolution, as in the attention benchmark


def sd2_config() -> dict:
    return OmegaConf.to_container(compose_config(["model=sd2"]).model.unet.config)


def run_case(config, latent, batch, device, dtype, channels_last, compiled, steps, warmup):
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config).to(device)
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=device.type == "cuda")
    forward = torch.compile(unet) if compiled else unet
    x = torch.randn(batch, 4, latent, latent, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (batch,), device=device)
    c = torch.randn(batch, 77, config["cross_attention_dim"], device=device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = forward(x, t, encoder_hidden_states=c).sample.float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="tiny U-Net on CPU, fp32 (keeps the script tested)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    config = TINY if args.tiny else sd2_config()
    dtype = torch.float32 if args.tiny else torch.bfloat16
    batch = args.batch or (2 if args.tiny else 32)
    steps = args.steps or (2 if args.tiny else 20)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(name, "32-true" if args.tiny else "bf16-mixed")
    compile_options = (False,) if (args.no_compile or args.tiny) else (False, True)
    rows = []
    for pixels, channels_last, compiled in itertools.product((256, 512), (False, True), compile_options):
        latent = pixels // 8 // (4 if args.tiny else 1)
        flops = unet_training_flops(
            lambda: UNet2DConditionModel.from_config(config), (4, latent, latent), config["cross_attention_dim"]
        )
        rate = run_case(config, latent, batch, device, dtype, channels_last, compiled, steps, 1 if args.tiny else 5)
        utilisation = mfu(flops, rate, peak)
        rows.append([pixels, channels_last, compiled, batch, rate, f"{utilisation:.1%}" if utilisation else "n/a"])
    print(f"{'tiny U-Net' if args.tiny else 'SD2 U-Net (865.9M)'} on {name}, {str(dtype).split('.')[-1]}, SDPA")
    print(table(["px", "channels_last", "compile", "batch", "img/s", "MFU"], rows))


if __name__ == "__main__":
    main()
