"""Raw image-text inputs, cut into *parts* (the unit of parallel, resumable encoding).

- img2dataset / LAION WebDataset tars: `KEY.jpg|png|webp` + `KEY.txt` + `KEY.json`; one tar = one part.
- a folder of images with same-name `.txt` captions (and optional `.json`): parts of `files_per_part` images.
  Either may hold a loss mask per image (`KEY.mask.png` / `NAME.mask.png`, white = learn; diffusion.masked_loss).
- a table (`.parquet`, `.jsonl`, `.csv`) with a caption column and an image-path column (relative to the table):
  parts of `files_per_part` rows.

The part list is a pure function of the inputs, so every rank and every re-run computes the same one. A
truncated tar ends its part early with a counted `truncated_tar`; nothing here raises for bad data.
"""

from __future__ import annotations

import csv
import functools
import glob
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sdtrain.data import storage
from sdtrain.data.shards import COMPRESSED_MAGIC
from sdtrain.data.tar_reader import TarDamage, iter_members, split_member
from sdtrain.errors import DataError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
TABLE_EXTENSIONS = (".parquet", ".jsonl", ".csv")
MASK_SUFFIX = "mask.png"  # KEY.mask.png: a loss mask the size of KEY's image


@dataclass(slots=True)
class RawSample:
    key: str
    image: bytes | None
    caption: bytes | None
    meta: dict[str, Any] = field(default_factory=dict)
    mask: bytes | None = None


@dataclass(frozen=True, slots=True)
class InputPart:
    index: int
    kind: str  # tar | folder | table
    location: str
    start: int = 0
    stop: int = 0


def plan_parts(inputs: list[str], files_per_part: int = 1000) -> list[InputPart]:
    """Inputs (tar files/globs, folders, tables) -> the ordered list of parts."""
    parts: list[InputPart] = []
    for spec in inputs:
        remote = storage.is_remote(spec)
        if any(c in spec for c in "*?["):
            matches = storage.glob(spec) if remote else sorted(glob.glob(spec))
        else:
            matches = [spec]
        if not matches:
            raise DataError(f"input matches nothing: {spec}")
        for path in matches:
            if remote and not path.endswith(".tar"):
                raise DataError(f"input {path}: from object storage, only .tar shards (img2dataset's output) are read")
            if not storage.exists(path):
                raise DataError(f"input not found: {path}")
            if os.path.isdir(path):
                count = len(_folder_images(path))
                kind = "folder"
            elif path.endswith(".tar"):
                parts.append(InputPart(len(parts), "tar", path))
                continue
            elif path.endswith(TABLE_EXTENSIONS):
                count = len(_table_rows(path))
                kind = "table"
            else:
                raise DataError(f"input {path}: expected a .tar, a folder, or a {'/'.join(TABLE_EXTENSIONS)} table")
            for start in range(0, count, files_per_part):
                parts.append(InputPart(len(parts), kind, path, start, min(count, start + files_per_part)))
    if not parts:
        raise DataError("no input samples found")
    return parts


def iter_part(part: InputPart, on_error: Callable[[str], None]) -> Iterator[RawSample]:
    if part.kind == "tar":
        yield from _iter_tar(part.location, on_error)
    elif part.kind == "folder":
        yield from _iter_folder(part.location, part.start, part.stop)
    else:
        yield from _iter_table(part.location, part.start, part.stop)


def _tar_members(path: str) -> Iterator[tuple[str, bytes]]:
    """(name, data) of regular files: the lean reader (reports truncation) for plain tars, tarfile otherwise."""
    with storage.open_url(path) as f:  # local or s3:// (data/storage.py)
        if storage.peek_head(f) not in COMPRESSED_MAGIC:
            yield from iter_members(f)
            return
    with storage.open_url(path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if member.isfile():
                yield member.name, tar.extractfile(member).read()  # type: ignore[union-attr]


def _iter_tar(path: str, on_error: Callable[[str], None]) -> Iterator[RawSample]:
    current: RawSample | None = None
    try:
        for name, data in _tar_members(path):
            split = split_member(name)
            if split is None:
                continue
            key, ext = split
            if current is not None and key != current.key:
                yield current
                current = None
            current = current or RawSample(key, None, None)
            if ext in IMAGE_EXTENSIONS and current.image is None:
                current.image = data
            elif ext == "txt":
                current.caption = data
            elif ext == "json":
                current.meta = _json_meta(data)
            elif ext == MASK_SUFFIX:
                current.mask = data
    except (TarDamage, tarfile.TarError, EOFError, OSError) as exc:
        on_error(f"truncated_tar: {path}: {exc}")
        current = None  # the sample being read when the damage hit may be incomplete
    if current is not None:
        yield current


def _json_meta(data: bytes) -> dict[str, Any]:
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"_bad_json": True}
    return meta if isinstance(meta, dict) else {}


@functools.lru_cache(maxsize=2)  # one listing per folder, not one per part (a worker encodes many parts)
def _folder_images(folder: str) -> list[str]:
    found = []
    for root, _, files in os.walk(folder):
        for name in files:
            if name.lower().rsplit(".", 1)[-1] in IMAGE_EXTENSIONS and not name.endswith("." + MASK_SUFFIX):
                found.append(os.path.relpath(os.path.join(root, name), folder))
    return sorted(found)


def _read_optional(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _iter_folder(folder: str, start: int, stop: int) -> Iterator[RawSample]:
    for rel in _folder_images(folder)[start:stop]:
        stem = os.path.splitext(os.path.join(folder, rel))[0]
        meta = _read_optional(stem + ".json")
        key = os.path.splitext(rel)[0].replace(os.sep, "__").replace(".", "_")
        yield RawSample(
            key,
            _read_optional(os.path.join(folder, rel)),
            _read_optional(stem + ".txt"),
            _json_meta(meta or b"{}"),
            _read_optional(f"{stem}.{MASK_SUFFIX}"),
        )


@functools.lru_cache(maxsize=2)  # one read per table, not one per part; callers only read the rows
def _table_rows(path: str) -> list[dict[str, Any]]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


CAPTION_COLUMNS = ("caption", "text", "TEXT", "txt")
PATH_COLUMNS = ("image_path", "path", "file", "filepath")


def _iter_table(path: str, start: int, stop: int) -> Iterator[RawSample]:
    rows = _table_rows(path)
    folder = os.path.dirname(os.path.abspath(path))
    for i, row in enumerate(rows[start:stop], start=start):
        image_col = next((c for c in PATH_COLUMNS if c in row), None)
        caption_col = next((c for c in CAPTION_COLUMNS if c in row), None)
        if image_col is None:  # no caption column: captions count as missing (the VAE job needs none)
            raise DataError(
                f"table {path} needs an image path column {PATH_COLUMNS} (and a caption column {CAPTION_COLUMNS})"
            )
        image_path = str(row[image_col])
        image = _read_optional(image_path if os.path.isabs(image_path) else os.path.join(folder, image_path))
        caption = row[caption_col] if caption_col is not None else None
        meta = {k: v for k, v in row.items() if k not in (image_col, caption_col) and _jsonable(v)}
        yield RawSample(f"{i:09d}", image, None if caption is None else str(caption).encode("utf-8"), meta)


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)
