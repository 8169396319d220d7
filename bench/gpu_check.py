"""Everything a first GPU should tell us, in one command (`bash bench/gpu_check.sh`), in under 8 minutes:

1. the GPU-marked tests (`pytest -m gpu`);
2. the SD2 U-Net at 256 and 512 px, bf16, SDPA: channels_last on/off, compile off/default/max-autotune/
   reduce-overhead, a batch sweep up to the memory limit (bench/gpu_throughput.py; each case in its own process
   under what is left of the time budget);
3. 50 steps of the real CLI on the tiny model with strategy=ddp and deepspeed_zero2 on one GPU (NCCL, pinned
   memory, bf16-mixed), on synthetic shards;

and writes bench/RESULTS-gpu.md. No network, no weights (random-init U-Nets). `--cpu-smoke` runs the same stages
small on the CPU (what the test suite runs to keep this script working).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))
from gpu_throughput import fastest, results_table, sweep  # noqa: E402


def run_gpu_tests(timeout_s: float) -> str:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"]
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"stopped after {timeout_s:.0f} s"
    summary = (done.stdout.strip().splitlines() or ["no output"])[-1]
    return summary if done.returncode in (0, 5) else f"FAILED ({summary})\n\n```\n{done.stdout[-3000:]}\n```"


def last_metric(run: Path, key: str) -> float | None:
    rows = []
    for path in sorted(run.glob("logs/version_*/metrics.csv")):
        rows += [r for r in csv.DictReader(path.read_text().splitlines()) if r.get(key)]
    return float(rows[-1][key]) if rows else None


def run_cli(strategy: str, steps: int, shards: Path, work: Path, on_gpu: bool, timeout_s: float) -> list[object]:
    run = work / strategy
    trainer = ["trainer=gpu", "trainer.devices=1"] if on_gpu else ["trainer=cpu"]
    cmd = [
        sys.executable,
        "-m",
        "sdtrain.train",
        "experiment=tiny",
        f"hydra.run.dir={run}",
        f"data.shards={shards}",
        f"strategy={strategy}",
        *trainer,
        f"trainer.max_steps={steps}",
        f"trainer.log_every_n_steps={min(10, steps - 1)}",
        "trainer.enable_progress_bar=false",
        "callbacks.samples.every_n_steps=0",
        "callbacks.samples.at_end=false",
        "logger=csv",
    ]
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return [strategy, steps, f"stopped after {timeout_s:.0f} s", "-", "-"]
    wall = time.perf_counter() - started
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1][:160]
        return [strategy, steps, f"failed: {last}", f"{wall:.0f}", "-"]
    rate = last_metric(run, "perf/images_per_s")
    return [strategy, steps, "ok", f"{wall:.0f}", f"{rate:.1f}" if rate else "-"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "RESULTS-gpu.md"))
    parser.add_argument("--cpu-smoke", action="store_true", help="the same stages, tiny, on the CPU")
    parser.add_argument("--budget-s", type=float, default=420.0, help="the whole check's wall-clock budget")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available() and not args.cpu_smoke
    if not on_gpu and not args.cpu_smoke:
        print(
            "bench/gpu_check.sh: no CUDA GPU is visible (torch.cuda.is_available() is False); "
            "--cpu-smoke runs the stages on the CPU",
            file=sys.stderr,
        )
        return 2
    deadline = time.monotonic() + args.budget_s
    left = lambda: max(deadline - time.monotonic(), 0.0)  # noqa: E731
    device = torch.cuda.get_device_name(0) if on_gpu else "cpu (smoke run)"
    print(f"gpu_check on {device}: tests", flush=True)
    tests = run_gpu_tests(min(150.0, left()))
    with tempfile.TemporaryDirectory() as tmp:
        from helpers import make_dataset

        shards = make_dataset(Path(tmp) / "shards", n=256, per_shard=64)
        steps = 50 if on_gpu else 3
        print("gpu_check: real CLI runs", flush=True)
        cli = [run_cli(s, steps, shards, Path(tmp), on_gpu, min(150.0, left())) for s in ("ddp", "deepspeed_zero2")]
    print("gpu_check: U-Net sweep", flush=True)
    results = sweep(tiny=not on_gpu, budget_s=max(left() - 10.0, 0.0))
    best = fastest(results)
    lines = [
        "# GPU check",
        "",
        f"`bash bench/gpu_check.sh` on {device}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"{datetime.date.today().isoformat()}; random-init models, no network.",
        "",
        "## GPU-marked tests (`pytest -m gpu`)",
        "",
        tests,
        "",
        "## SD2 U-Net training step (bf16 autocast, SDPA, fused AdamW)" if on_gpu else "## Tiny U-Net (CPU smoke)",
        "",
        results_table(results),
        "",
        (
            f"Fastest at 512 px: channels_last={best['channels_last']}, compile={best['compile']}, "
            f"batch {best['batch']}: {best['img_s']:.1f} img/s"
            + (f", MFU {best['mfu']:.1%}" if best.get("mfu") else "")
            if best
            else "No 512 px case finished."
        ),
        "",
        f"## Real CLI, tiny model, {'1 GPU, bf16-mixed' if on_gpu else 'CPU'}",
        "",
    ]
    from _util import table

    lines += [table(["strategy", "steps", "status", "wall s", "img/s (last window)"], cli), ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
