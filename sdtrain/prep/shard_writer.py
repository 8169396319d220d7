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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sdtrain.data.normalizer import SD_SCALING_FACTOR
from sdtrain.data.samples import TEXT_MEMBER
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


class ShardSink:
    """Appends samples to fixed-size shards out_dir/NAME.tar (names from `name_for(chunk index)`), each written
    under a temporary name and renamed when full or closed. mtime is fixed so the same samples give the same bytes."""

    def __init__(
        self,
        out_dir: str,
        *,
        samples_per_shard: int,
        stores: str = "moments",
        dtype: str = "float16",
        name_for: Callable[[int], str] = lambda i: f"{i:06d}.tar",
        mtime: int = 0,
    ) -> None:
        if stores not in ("moments", "latent"):
            raise ValueError(f"stores must be moments or latent, got {stores!r}")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.samples_per_shard, self.dtype = out_dir, samples_per_shard, dtype
        self.extension, self.name_for, self.mtime = f"{stores}.npy", name_for, mtime
        self.entries: list[dict[str, Any]] = []
        self.latent_shape: list[int] | None = None
        self._shard: _ShardFile | None = None

    def add(
        self, sample: LatentSample, text: np.ndarray | None = None, extra: dict[str, np.ndarray] | None = None
    ) -> None:
        """Append a sample (+ its text.npy, + `extra` arrays as KEY.NAME members, e.g. inpainting masks)."""
        if self._shard is None or self._shard.count == self.samples_per_shard:
            if self._shard is not None:
                self.entries.append(self._shard.finish())
            self._shard = _ShardFile(os.path.join(self.out_dir, self.name_for(len(self.entries))))
        tar, mtime = self._shard.tar, self.mtime
        self.latent_shape = self.latent_shape or list(sample.array.shape)
        add_member(tar, f"{sample.key}.{self.extension}", npy_bytes(sample.array.astype(self.dtype)), mtime)
        add_member(tar, f"{sample.key}.txt", sample.caption.encode("utf-8"), mtime)
        if sample.meta:
            add_member(tar, f"{sample.key}.json", json.dumps(sample.meta, sort_keys=True).encode("utf-8"), mtime)
        if text is not None:
            add_member(tar, f"{sample.key}.{TEXT_MEMBER}", npy_bytes(text), mtime)
        for name, array in (extra or {}).items():
            add_member(tar, f"{sample.key}.{name}", npy_bytes(array), mtime)
        self._shard.count += 1

    def close(self) -> list[dict[str, Any]]:
        if self._shard is not None:
            self.entries.append(self._shard.finish())
            self._shard = None
        return self.entries


def manifest(
    entries: list[dict[str, Any]],
    *,
    latent_shape: list[int] | None,
    stores: str = "moments",
    vae: dict[str, Any] | None = None,
    text_encoder: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "vae": vae or {"name": "unknown", "scaling_factor": SD_SCALING_FACTOR, "latent_channels": None},
        "latent_shape": latent_shape,
        "stores": stores,
        "text_encoder": text_encoder,
        "shards": entries,
        **extra,
    }


def write_shards(
    samples: Iterable[LatentSample],
    out_dir: str,
    *,
    samples_per_shard: int,
    stores: str = "moments",
    vae: dict[str, Any] | None = None,
    dtype: str = "float16",
    text_for: Callable[[str], np.ndarray] | None = None,
    text_encoder: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `samples` to out_dir/NNNNNN.tar and out_dir/manifest.json; returns the manifest. `text_for(caption)`
    gives pre-encoded hidden states to store as text.npy, `text_encoder` the identity the manifest records."""
    sink = ShardSink(out_dir, samples_per_shard=samples_per_shard, stores=stores, dtype=dtype, mtime=int(time.time()))
    for sample in samples:
        sink.add(sample, text_for(sample.caption) if text_for else None)
    result = manifest(sink.close(), latent_shape=sink.latent_shape, stores=stores, vae=vae, text_encoder=text_encoder)
    write_json_atomic(os.path.join(out_dir, MANIFEST_NAME), result)
    return result
