"""Write latent samples as fixed-size WebDataset shards plus manifest.json (shared/spec/latent-shards.md).

A shard is written under a temporary name and renamed when complete, so a killed writer never leaves a half
shard that looks finished; the manifest is written last, the same way.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sdtrain.data.shards import MANIFEST_FORMAT, MANIFEST_NAME


@dataclass(slots=True)
class LatentSample:
    key: str
    array: np.ndarray  # moments (2C, h, w) or one latent (C, h, w), unscaled VAE units
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o444
    tar.addfile(info, io.BytesIO(data))


def write_json_atomic(path: str, payload: dict[str, Any]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _ShardFile:
    """One output shard: written as NAME.tmp, fsynced, then renamed to NAME."""

    def __init__(self, path: str) -> None:
        self.path, self.tmp = path, path + ".tmp"
        self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed in finish()
        # Plain USTAR headers with integer mtimes: a PAX header per member (tarfile's default, which webdataset's
        # TarWriter keeps) makes every reader parse twice as many headers.
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self.count = 0

    def finish(self) -> dict[str, Any]:
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return {"url": os.path.basename(self.path), "num_samples": self.count}


def write_shards(
    samples: Iterable[LatentSample],
    out_dir: str,
    *,
    samples_per_shard: int,
    stores: str = "moments",
    vae: dict[str, Any] | None = None,
    dtype: str = "float16",
) -> dict[str, Any]:
    """Write `samples` to out_dir/NNNNNN.tar and out_dir/manifest.json; returns the manifest."""
    if stores not in ("moments", "latent"):
        raise ValueError(f"stores must be moments or latent, got {stores!r}")
    os.makedirs(out_dir, exist_ok=True)
    extension = f"{stores}.npy"
    entries: list[dict[str, Any]] = []
    shard: _ShardFile | None = None
    mtime = int(time.time())
    latent_shape: list[int] | None = None
    for sample in samples:
        if shard is None or shard.count == samples_per_shard:
            if shard is not None:
                entries.append(shard.finish())
            shard = _ShardFile(os.path.join(out_dir, f"{len(entries):06d}.tar"))
        latent_shape = latent_shape or list(sample.array.shape)
        add_member(shard.tar, f"{sample.key}.{extension}", npy_bytes(sample.array.astype(dtype)), mtime)
        add_member(shard.tar, f"{sample.key}.txt", sample.caption.encode("utf-8"), mtime)
        if sample.meta:
            add_member(shard.tar, f"{sample.key}.json", json.dumps(sample.meta).encode("utf-8"), mtime)
        shard.count += 1
    if shard is not None:
        entries.append(shard.finish())
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "vae": vae or {"name": "unknown", "scaling_factor": 0.18215, "latent_channels": None},
        "latent_shape": latent_shape,
        "stores": stores,
        "text_encoder": None,
        "shards": entries,
    }
    write_json_atomic(os.path.join(out_dir, MANIFEST_NAME), manifest)
    return manifest
