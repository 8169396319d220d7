"""GPU training throughput of the SD2 U-Net: img/s, TFLOP/s, MFU and peak memory per setting (bf16 autocast,
SDPA, channels_last on/off, torch.compile off/default/max-autotune/reduce-overhead, a batch sweep). One case per
child process, so a compile that runs long or a batch that does not fit (OOM) ends only that case:

    .venv/bin/python bench/gpu_throughput.py                      # the sweep, on a CUDA machine (bench/gpu_check.sh)
    .venv/bin/python bench/gpu_throughput.py --tiny               # a tiny U-Net on CPU, fp32 (what the tests run)
    .venv/bin/python bench/gpu_throughput.py --case '{"pixels": 512, "batch": 32, "channels_last": true,
                                                      "compile": "default"}'   # one case, one JSON line out

A step is forward + backward + fused AdamW on random latents and text states (the loader and text encoder have
their own benchmarks), with no host sync inside the timed steps. MFU uses the FLOPs counted by
sdtrain.training.metrics and the device's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
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
COMPILE_MODES = {
    "off": None,
    "default": "default",
    "max-autotune": "max-autotune",
    "reduce-overhead": "reduce-overhead",
}


def sd2_config() -> dict:
    return OmegaConf.to_container(compose_config(["model=sd2"]).model.unet.config)


def run_case(case: dict) -> dict:
    """One setting: {pixels, batch, channels_last, compile, tiny, steps, warmup} -> the case + its measurements."""
    tiny = case.get("tiny", False)
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    config = TINY if tiny else sd2_config()
    dtype = torch.float32 if tiny else torch.bfloat16
    latent = case["pixels"] // 8 // (4 if tiny else 1)
    batch, steps, warmup = case["batch"], case.get("steps", 20), case.get("warmup", 5)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config).to(device)
    memory_format = torch.channels_last if case["channels_last"] else torch.contiguous_format
    unet = unet.to(memory_format=memory_format)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=True)
    mode = COMPILE_MODES[case["compile"]]
    forward = unet if mode is None else torch.compile(unet, mode=mode)
    x = torch.randn(batch, 4, latent, latent, device=device).to(memory_format=memory_format)
    t = torch.randint(0, 1000, (batch,), device=device)
    c = torch.randn(batch, 77, config["cross_attention_dim"], device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = forward(x, t, encoder_hidden_states=c).sample.float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    started = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warm_s = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    rate = batch * steps / (time.perf_counter() - start)
    flops = unet_training_flops(
        lambda: UNet2DConditionModel.from_config(config), (4, latent, latent), config["cross_attention_dim"]
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    utilisation = mfu(flops, rate, peak_flops(name, "32-true" if tiny else "bf16-mixed"))
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {
        **case,
        "device": name,
        "img_s": rate,
        "tflops_s": flops * rate / 1e12,
        "mfu": utilisation,
        "peak_gib": peak_gib,
        "warmup_s": warm_s,
    }


def run_in_child(case: dict, timeout_s: float) -> dict:
    """The case in a fresh process (its own compile caches and CUDA memory); OOM, errors, timeouts are results."""
    if timeout_s < 5:
        return {**case, "status": "skipped: time budget spent"}
    if case.get("tiny"):  # the CPU smoke run: in this process (a child's imports would cost more than the case)
        return {**run_case(case), "status": "ok"}
    cmd = [sys.executable, __file__, "--case", json.dumps(case)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**case, "status": f"stopped after {timeout_s:.0f} s (time budget)"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        return {**json.loads(lines[-1]), "status": "ok"}
    oom = "OutOfMemoryError" in done.stderr or "out of memory" in done.stderr
    last = (done.stderr.strip().splitlines() or ["no output"])[-1][:160]
    return {**case, "status": "out of memory" if oom else f"failed: {last}"}


def sweep(tiny: bool, budget_s: float, base_batch: int | None = None) -> list[dict]:
    """Layout x size (eager), then compile modes and a batch sweep on the faster layout at the larger size."""
    deadline = time.monotonic() + budget_s
    left = lambda: deadline - time.monotonic()  # noqa: E731
    common = {"tiny": tiny, "steps": 2 if tiny else 20, "warmup": 1 if tiny else 5}
    batch = base_batch or (2 if tiny else 32)
    results = [
        run_in_child({**common, "pixels": px, "batch": batch, "channels_last": cl, "compile": "off"}, left())
        for px in (256, 512)
        for cl in (False, True)
    ]
    at_512 = [r for r in results if r["pixels"] == 512 and r["status"] == "ok"]
    channels_last = max(at_512, key=lambda r: r["img_s"])["channels_last"] if at_512 else True
    modes = ["default", "max-autotune", "reduce-overhead"] if not tiny else []  # CPU compile: test_compile.py
    for mode in modes:  # compiling the SD2 U-Net takes minutes: each case gets what the budget has left
        case = {**common, "pixels": 512, "batch": batch, "channels_last": channels_last, "compile": mode}
        results.append(run_in_child(case, left()))
    for b in (batch // 4, batch // 2, batch * 2, batch * 4, batch * 8):
        if b < 1:
            continue
        result = run_in_child(
            {**common, "pixels": 512, "batch": b, "channels_last": channels_last, "compile": "off"}, left()
        )
        results.append(result)
        if result["status"] == "out of memory":
            break
    return results


def results_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        ok = r.get("status") == "ok"
        rows.append(
            [
                r["pixels"],
                r["channels_last"],
                r["compile"],
                r["batch"],
                f"{r['img_s']:.1f}" if ok else "-",
                f"{r['tflops_s']:.3g}" if ok else "-",
                f"{r['mfu']:.1%}" if ok and r.get("mfu") else "n/a" if ok else "-",
                f"{r['peak_gib']:.1f}" if ok and r.get("peak_gib") is not None else "-",
                r.get("status", "ok"),
            ]
        )
    return table(["px", "channels_last", "compile", "batch", "img/s", "TFLOP/s", "MFU", "peak GiB", "status"], rows)


def fastest(results: list[dict]) -> dict | None:
    ok = [r for r in results if r.get("status") == "ok" and r["pixels"] == 512]
    return max(ok, key=lambda r: r["img_s"]) if ok else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="tiny U-Net on CPU, fp32 (keeps the script tested)")
    parser.add_argument("--case", help="run one case (JSON) and print its result as one JSON line")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=300.0, help="wall-clock budget of the whole sweep")
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    results = sweep(args.tiny, args.budget_s, args.batch)
    print(f"{'tiny U-Net' if args.tiny else 'SD2 U-Net (865.9M)'}, {'fp32' if args.tiny else 'bf16'}, SDPA")
    print(results_table(results))
    best = fastest(results)
    if best:
        print(
            f"fastest at 512 px: channels_last={best['channels_last']} compile={best['compile']} batch={best['batch']}"
        )


if __name__ == "__main__":
    main()
