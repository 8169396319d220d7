"""Loader throughput: sdtrain's stream (read, decode, posterior sample, scale, caption dropout, tokenise, collate)
vs a raw `tarfile` read of the same shards, and how it scales with worker processes.

    .venv/bin/python bench/loader.py [--samples 6000] [--latent 32]

Shards are written first: SD-256-sized moments (8, 32, 32) float16 and a caption per sample.
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import tempfile
import time
from itertools import islice

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _util import table  # noqa: E402

from sdtrain.data.loader import LatentDataConfig, LatentStream, build_dataloader  # noqa: E402
from sdtrain.data.normalizer import LatentNormalizer  # noqa: E402
from sdtrain.data.shards import resolve_shards  # noqa: E402
from sdtrain.models.text_encoder import build_tokenizer  # noqa: E402
from sdtrain.prep.shard_writer import LatentSample, write_shards  # noqa: E402

CAPTIONS = ["a photo of a cat sitting on a red sofa", "grinning face", "an oil painting of a lighthouse at dusk"]


def make_shards(folder, n, size):
    rng = np.random.default_rng(0)
    samples = (
        LatentSample(f"{i:07d}", rng.normal(size=(8, size, size)).astype(np.float32), CAPTIONS[i % 3]) for i in range(n)
    )
    write_shards(samples, folder, samples_per_shard=500)
    return os.path.join(folder, "manifest.json")


def raw_read(shard_set):
    t0, n = time.perf_counter(), 0
    for shard in shard_set.shards:
        with tarfile.open(shard.url, "r|") as tar:
            for member in tar:
                if member.isreg():
                    tar.extractfile(member).read()
                    n += member.name.endswith(".txt")
    return n / (time.perf_counter() - t0)


def stream_read(shard_set, manifest, workers, batch):
    cfg = LatentDataConfig(shards=manifest, batch_size=batch, num_workers=workers, shuffle_buffer=256)
    stream = LatentStream(shard_set, cfg, build_tokenizer(), latent_channels=4, normalizer=LatentNormalizer())
    batches = stream.plan(0).batches_per_slot * max(1, workers)
    loader = iter(build_dataloader(stream))
    next(loader)  # worker start-up is not throughput
    t0 = time.perf_counter()
    n = sum(b["latents"].shape[0] for b in islice(loader, batches - 1))
    return n / (time.perf_counter() - t0)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=6000)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_shards(tmp, args.samples, args.latent)
        shard_set = resolve_shards(manifest)
        raw_read(shard_set)  # warm the page cache, as a training epoch after the first would be
        raw = raw_read(shard_set)
        rows = [["raw tarfile read (bytes only)", raw, 1.0]]
        for workers in (0, 1, 2):
            rate = stream_read(shard_set, manifest, workers, args.batch)
            rows.append([f"sdtrain stream, {workers} workers", rate, rate / raw])
    print(
        f"{args.samples} samples of ({8}, {args.latent}, {args.latent}) float16 moments + caption, "
        f"batch {args.batch}, {os.cpu_count()} CPUs"
    )
    print(table(["reader", "samples/s", "ratio vs raw"], rows))


if __name__ == "__main__":
    main()
