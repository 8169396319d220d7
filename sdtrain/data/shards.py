"""Find the shards of a latent dataset and how many samples each holds.

`data.shards` may be a brace pattern (`/d/{000000..000009}.tar`), a glob (`/d/*.tar`), a list of either, a
`manifest.json` (or a folder holding one). The manifest (shared/spec/latent-shards.md) gives exact sample
counts; local shards without one are counted by reading their tar headers once.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import braceexpand
from webdataset.gopen import gopen
from webdataset.tariterators import tar_file_iterator

from sdtrain.data import storage
from sdtrain.data.tar_reader import group_members, iter_samples, iter_wanted_samples, split_member
from sdtrain.errors import DataError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "sdtrain-latents"
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZ", b"\xfd7", b"(\xb5")  # gzip, bzip2, xz, zstd


@dataclass(frozen=True, slots=True)
class Shard:
    url: str
    num_samples: int


@dataclass(frozen=True, slots=True)
class ShardSet:
    """The shards of one dataset plus what its manifest says about the VAE and latents (empty if none)."""

    shards: tuple[Shard, ...]
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def total_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def sample_counts(self) -> list[int]:
        return [s.num_samples for s in self.shards]


def _has_scheme(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def read_manifest(path: str) -> ShardSet:
    """Read a manifest.json (a local path or a remote URL); shard urls are relative to its folder unless absolute
    or with a scheme."""
    remote = storage.is_remote(path)
    try:
        if remote:  # a missing bucket or key, refused credentials: storage's one line
            manifest = json.loads(storage.read_text(path))
        else:
            with open(path, encoding="utf-8") as f:
                manifest = json.load(f)
    except OSError as exc:
        raise DataError(f"cannot read manifest {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"manifest {path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path} is not an sdtrain latent manifest (format != {MANIFEST_FORMAT!r})")
    base = path.rsplit("/", 1)[0] if remote else os.path.dirname(os.path.abspath(path))
    shards = []
    for entry in manifest.get("shards", []):
        url = entry["url"]
        if not (os.path.isabs(url) or _has_scheme(url)):
            url = storage.join(base, url) if remote else os.path.join(base, url)
        shards.append(Shard(url, int(entry["num_samples"])))
    if not shards:
        raise DataError(f"manifest {path} lists no shards")
    return ShardSet(tuple(shards), manifest)


def count_samples(url: str) -> int:
    """Number of sample keys in a local tar, reading headers only (seeks past the payloads)."""
    keys = set()
    try:
        with tarfile.open(url, mode="r:") as tar:
            for member in tar:
                split = split_member(member.name) if member.isreg() else None
                if split is not None:
                    keys.add(split[0])
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"cannot read shard {url}: {exc}") from None
    return len(keys)


def _expand_one(pattern: str) -> list[str]:
    if pattern.endswith(".json") or os.path.isdir(pattern):
        raise AssertionError("manifests are handled by resolve_shards")
    if storage.is_remote(pattern):  # globs are listed by the store; braces are expanded here
        expanded = list(braceexpand.braceexpand(pattern))
        return [u for e in expanded for u in (storage.glob(e) if glob.has_magic(e) else [e])]
    if _has_scheme(pattern):
        return list(braceexpand.braceexpand(pattern))
    urls: list[str] = []
    for expanded in braceexpand.braceexpand(pattern):
        if glob.has_magic(expanded):
            urls.extend(sorted(glob.glob(expanded)))
        elif os.path.exists(expanded):
            urls.append(expanded)
        else:
            raise DataError(f"shard not found: {expanded}")
    return urls


def resolve_shards(spec: str | Sequence[str] | None) -> ShardSet:
    """Resolve `data.shards` to a ShardSet. Raises DataError naming the pattern when nothing matches."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        raise DataError(
            "data.shards is empty: give a manifest.json, a brace pattern, a glob or a list of shards (or data.sources)"
        )
    patterns = [spec] if isinstance(spec, str) else list(spec)
    if not patterns:
        raise DataError("data.shards is an empty list")
    if len(patterns) == 1:
        only = patterns[0]
        if storage.is_remote(only) and not only.endswith(".json") and not glob.has_magic(only) and "{" not in only:
            return read_manifest(storage.join(only, MANIFEST_NAME))  # a remote folder: its manifest
        manifest = os.path.join(only, MANIFEST_NAME) if os.path.isdir(only) else only
        if manifest.endswith(".json"):
            return read_manifest(manifest)
    urls: list[str] = []
    for pattern in patterns:
        if pattern.endswith(".json") or os.path.isdir(pattern):
            raise DataError(f"a manifest ({pattern}) cannot be mixed with other shard patterns")
        urls.extend(_expand_one(pattern))
    if not urls:
        raise DataError(f"no shards match data.shards={spec!r}")
    remote = [u for u in urls if _has_scheme(u)]
    if remote:
        raise DataError(f"remote shards need a manifest.json with sample counts (first: {remote[0]})")
    return ShardSet(tuple(Shard(u, count_samples(u)) for u in urls))


def iter_raw_samples(url: str, on_error: Callable[[str], None]) -> Iterator[dict[str, Any]]:
    """Raw samples (`__key__` plus bytes per extension) of one shard, in file order.

    A shard that cannot be opened or is truncated ends early; `on_error(reason)` is told why, once.
    Uncompressed tars take the lean reader (data/tar_reader.py); compressed ones webdataset's tarfile path.
    """
    return (raw for _, raw in iter_shard_samples(url, on_error))


def iter_shard_samples(
    url: str,
    on_error: Callable[[str], None],
    wanted: Callable[[int], bool] | None = None,
    stop: int | None = None,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(ordinal, raw sample) of one shard, as iter_raw_samples, up to ordinal `stop`; with `wanted`, only the
    ordinals it accepts (an uncompressed local tar then reads the others' headers only)."""
    try:
        stream = storage.open_url(url) if storage.is_remote(url) else gopen(url, "rb")
    except Exception as exc:  # noqa: BLE001 - any opener failure is one counted, reported skip
        on_error(f"cannot open shard {url}: {exc}")
        return
    try:
        head = storage.peek_head(stream)
        if head and head not in COMPRESSED_MAGIC:
            samples = iter_wanted_samples(stream, url, wanted) if wanted else enumerate(iter_samples(stream, url))
        else:
            members = ((f["fname"], f["data"]) for f in tar_file_iterator(stream))
            samples = enumerate(group_members(members, url))
        for ordinal, raw in samples:
            if stop is not None and ordinal >= stop:
                break
            if wanted is None or wanted(ordinal):
                yield ordinal, raw
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt tar: keep what was read, report the rest
        on_error(f"shard {url} is truncated or corrupt: {type(exc).__name__}: {exc}")
    finally:
        stream.close()
