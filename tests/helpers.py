"""Shared test helpers: synthetic latent shards and running the training CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from sdtrain.prep.shard_writer import LatentSample, write_shards

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = ["grinning face", "red apple", "blue car", "green tree", "yellow sun", "black cat", "white cloud"]


def synthetic_samples(n: int, channels: int = 4, size: int = 8, seed: int = 0, start: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(start, start + n):
        mean = rng.normal(size=(channels, size, size)).astype(np.float32) * 5
        logvar = np.full((channels, size, size), -6.0, dtype=np.float32)
        yield LatentSample(f"{i:06d}", np.concatenate([mean, logvar]), f"{CAPTIONS[i % len(CAPTIONS)]} {i}")


def make_dataset(out_dir: Path, n: int = 64, per_shard: int = 16, **kw) -> Path:
    write_shards(synthetic_samples(n, **kw), str(out_dir), samples_per_shard=per_shard)
    return out_dir / "manifest.json"


def run_train(run_dir: Path, *overrides: str, timeout: int = 600, env: dict | None = None):
    cmd = [sys.executable, "-m", "sdtrain.train", "experiment=tiny", f"hydra.run.dir={run_dir}", *overrides]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)
