"""Resume cost: the time to the first batch after resuming at 5% and at 95% of an epoch, 2 workers.

    .venv/bin/python bench/resume.py [--samples 100000] [--latent 32] [--quick]

Shards of SD-256-size moments ((8, 32, 32) float16, 16 KiB) and captions are written first, then one
uninterrupted stream runs to 95% of the epoch and keeps what the training process would checkpoint (each worker's
StreamPosition) at both points, and the batch that follows each. Each resume is timed three times (median) from
building the stream to holding its first batch, which must equal the uninterrupted one. For comparison, the
replay a checkpoint without positions falls back to (read and check the epoch so far again) at the same points.
The last line is the ratio 95%/5% of the flat-cost resume (goal <= 1.5x).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from itertools import islice

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _util import table  # noqa: E402

from sdtrain.data.loader import LatentDataConfig, LatentStream, build_dataloader  # noqa: E402
from sdtrain.data.normalizer import LatentNormalizer  # noqa: E402
from sdtrain.data.shards import resolve_shards  # noqa: E402
from sdtrain.models.text_encoder import build_tokenizer  # noqa: E402
from sdtrain.prep.shard_writer import LatentSample, write_shards  # noqa: E402

WORKERS, BATCH, BUFFER = 2, 32, 1000


def make_shards(folder: str, n: int, size: int) -> str:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(64, 8, size, size)).astype(np.float32)
    samples = (LatentSample(f"{i:08d}", base[i % 64] + i * 1e-3, f"caption {i}") for i in range(n))
    write_shards(samples, folder, samples_per_shard=1000)
    return os.path.join(folder, "manifest.json")


def make_stream(manifest: str, start_batch: int = 0, positions: dict | None = None) -> LatentStream:
    cfg = LatentDataConfig(shards=manifest, batch_size=BATCH, num_workers=WORKERS, shuffle_buffer=BUFFER)
    return LatentStream(
        resolve_shards(manifest),
        cfg,
        build_tokenizer(),
        latent_channels=4,
        normalizer=LatentNormalizer(),
        start_batch=start_batch,
        resume_positions=positions,
    )


def checkpoints_at(manifest: str, points: list[int]) -> dict[int, tuple[dict, dict]]:
    """{k: (positions after k batches, batch k)} from one uninterrupted stream (what LatentDataModule keeps)."""
    positions: dict[int, dict] = {}
    out = {}
    for k, batch in enumerate(islice(iter(build_dataloader(make_stream(manifest))), max(points) + 1)):
        if k in points:
            out[k] = ({w: dict(p) for w, p in positions.items()}, batch)
        position = batch.pop("position").position
        positions[position.worker] = position.to_dict()
    return out


def first_batch_seconds(manifest: str, k: int, positions: dict | None, expected: dict) -> float:
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        loader = iter(build_dataloader(make_stream(manifest, start_batch=k, positions=positions)))
        batch = next(loader)
        times.append(time.perf_counter() - t0)
        same = batch["keys"] == expected["keys"] and torch.equal(batch["latents"], expected["latents"])
        if not same:
            raise SystemExit(f"resumed batch {k} differs from the uninterrupted stream's")
        del loader
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="20,000 samples (the goal's 100k take ~2 min)")
    args = parser.parse_args()
    samples = 20_000 if args.quick else args.samples
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        manifest = make_shards(tmp, samples, args.latent)
        per_epoch = make_stream(manifest).plan(0).batches_per_slot * WORKERS
        points = {5: round(0.05 * per_epoch), 95: round(0.95 * per_epoch)}
        saved = checkpoints_at(manifest, list(points.values()))
        print(f"{samples} samples written and streamed to 95% in {time.perf_counter() - t0:.0f} s", flush=True)
        flat = {pct: first_batch_seconds(manifest, k, saved[k][0], saved[k][1]) for pct, k in points.items()}
        rows = [[f"{pct}% ({k} of {per_epoch} batches)", flat[pct]] for pct, k in points.items()]
        replay = {pct: first_batch_seconds(manifest, k, None, saved[k][1]) for pct, k in points.items()}
        for row, pct in zip(rows, points, strict=True):
            row.append(replay[pct])
    shape = f"(8, {args.latent}, {args.latent}) float16 moments"
    print(f"{samples} samples of {shape}, {WORKERS} workers, batch {BATCH}, shuffle buffer {BUFFER}")
    print(table(["resume at", "first batch s (positions)", "first batch s (replay)"], rows))
    print(f"replay (checkpoints without positions) first-batch time 95%/5%: {replay[95] / replay[5]:.2f}x")
    print(f"resume first-batch time 95%/5%: {flat[95] / flat[5]:.2f}x")


if __name__ == "__main__":
    main()
