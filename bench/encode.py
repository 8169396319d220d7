"""Data preparation throughput, one run: sdtrain-encode images/s (0, 1, 2 worker processes) on real emoji
images, then the training loader vs a raw `tarfile` read of the very shards it wrote.

    .venv/bin/python bench/encode.py [--images 1536] [--size 64]

The VAE is the tiny preset's (random init: speed does not depend on the weights), so the numbers show the
pipeline's own cost (decode, crop, filter, shard writing, process fan-out) around a cheap VAE; with SD's VAE on a
GPU the VAE dominates. Goal for the loader: >= 0.8x the raw read.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from _util import table  # noqa: E402
from helpers import emoji_raw_tars  # noqa: E402
from loader import raw_read, stream_read  # noqa: E402

from sdtrain.data.shards import resolve_shards  # noqa: E402
from sdtrain.prep.encode_cli import main as encode_main  # noqa: E402


def tiny_vae(folder: str) -> str:
    from diffusers import AutoencoderKL
    from omegaconf import OmegaConf

    from sdtrain.launch.config import compose_config

    config = OmegaConf.to_container(compose_config([]).model.vae.config)
    AutoencoderKL.from_config(config).save_pretrained(folder)
    return folder


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1536)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tars = emoji_raw_tars(Path(tmp) / "raw", count=args.images, per_tar=128, size=args.size)
        vae = tiny_vae(os.path.join(tmp, "vae"))
        rows = []
        for workers in (0, 1, 2):
            out = os.path.join(tmp, f"latents_{workers}")
            t0 = time.perf_counter()
            encode_main(
                [
                    *map(str, tars),
                    "--out",
                    out,
                    "--vae",
                    vae,
                    "--resolution",
                    str(args.size),
                    "--workers",
                    str(workers),
                    "--samples-per-shard",
                    "256",
                ]
            )
            seconds = time.perf_counter() - t0
            kept = resolve_shards(out).total_samples
            rows.append([f"sdtrain-encode, {workers} workers", kept / seconds, seconds])
        print(
            f"encode: {len(tars)} tars of real twemoji PNGs at {args.size}px -> {args.size // 4}x{args.size // 4}x4 "
            f"moments, tiny VAE, {os.cpu_count()} CPUs (times include process start-up and model loading)"
        )
        print(table(["encoder", "images/s", "seconds"], rows))
        shard_set = resolve_shards(out)
        manifest = os.path.join(out, "manifest.json")
        raw_read(shard_set)  # warm the page cache
        raw = raw_read(shard_set)
        read_rows = [["raw tarfile read (bytes only)", raw, 1.0]]
        for workers in (0, 1, 2):
            rate = stream_read(shard_set, manifest, workers, 32)
            read_rows.append([f"sdtrain loader, {workers} workers", rate, rate / raw])
        print(f"\nloader vs raw read of the encoded shards ({shard_set.total_samples} samples, batch 32)")
        print(table(["reader", "samples/s", "ratio vs raw"], read_rows))


if __name__ == "__main__":
    main()
