"""Write latent samples as fixed-size WebDataset shards plus manifest.json (shared/spec/latent-shards.md).

A shard is written under a temporary name and renamed when complete, so a killed writer never leaves a half
shard that looks finished; the manifest is written last, the same way.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import webdataset as wds

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


def write_json_atomic(path: str, payload: dict[str, Any]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    writer: wds.TarWriter | None = None
    tmp_path = final_path = ""
    count = 0
    latent_shape: list[int] | None = None

    def close() -> None:
        if writer is not None:
            writer.close()
            os.replace(tmp_path, final_path)
            entries.append({"url": os.path.basename(final_path), "num_samples": count})

    for sample in samples:
        if writer is None or count == samples_per_shard:
            close()
            final_path = os.path.join(out_dir, f"{len(entries):06d}.tar")
            tmp_path = final_path + ".tmp"
            writer, count = wds.TarWriter(tmp_path), 0
        latent_shape = latent_shape or list(sample.array.shape)
        record = {"__key__": sample.key, extension: npy_bytes(sample.array.astype(dtype)), "txt": sample.caption}
        if sample.meta:
            record["json"] = sample.meta
        writer.write(record)
        count += 1
    close()
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
