"""A lean reader for uncompressed (USTAR/GNU/PAX) tar shards: the loader's hot path.

Python's tarfile parses every header field through several layers of method calls (~40 us a member); reading
512-byte headers directly is ~5x cheaper, which matters when a training step needs thousands of samples per
second per process. Samples are grouped like webdataset's `group_by_keys` (key = path up to the first dot of
the file name, lower-cased extensions, `__meta__` files skipped). Any damage raises TarDamage; the caller keeps
the samples read so far. Compressed shards go through webdataset's general path instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
REGULAR = (b"0", b"\0", b"7")
META = re.compile(r"__[^/]*__($|/)")
KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


class TarDamage(Exception):
    """A truncated or corrupt tar."""


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise TarDamage(f"bad number field {field!r}") from None


def _pax_path(data: bytes) -> bytes | None:
    path = None
    while data:
        length_text, _, rest = data.partition(b" ")
        try:
            length = int(length_text)
        except ValueError:
            raise TarDamage("bad pax header") from None
        record, data = rest[: length - len(length_text) - 1], data[length:]
        key, _, value = record.partition(b"=")
        if key == b"path":
            path = value.rstrip(b"\n")
    return path


def _size(stream: BinaryIO) -> int | None:
    """The stream's length where it knows it (local files, fsspec's remote files)."""
    try:
        return os.fstat(stream.fileno()).st_size
    except (AttributeError, OSError, ValueError):
        return getattr(stream, "size", None)


def iter_members(stream: BinaryIO, skip: Callable[[str], bool] | None = None) -> Iterator[tuple[str, bytes | None]]:
    """(name, data) of the regular files in an uncompressed tar stream, in order.

    Members whose name `skip` accepts come as (name, None): their payload is seeked past where the stream can
    seek (a resumed loader reads the headers of the samples it does not need, not their data)."""
    read = stream.read
    seekable = skip is not None and stream.seekable()
    end = _size(stream) if seekable else None
    long_name: bytes | None = None
    while True:
        header = read(BLOCK)
        if not header or header == ZERO_BLOCK:
            return
        if len(header) < BLOCK:
            raise TarDamage("truncated header")
        if _number(header[148:156]) != sum(header) - sum(header[148:156]) + 256:
            raise TarDamage("header checksum mismatch")
        size = _number(header[124:136])
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        kind = header[156:157]
        if kind in (b"L", b"x"):  # GNU long name / PAX extended header for the next member
            payload = read(padded)
            if len(payload) < padded:
                raise TarDamage("truncated member")
            long_name = payload[:size].rstrip(b"\0") if kind == b"L" else _pax_path(payload[:size]) or long_name
            continue
        name = long_name
        long_name = None
        if name is None:
            name = header[:100].split(b"\0", 1)[0]
            if header[257:263] == b"ustar\0":  # POSIX: a prefix field may hold the leading directories
                prefix = header[345:500].split(b"\0", 1)[0]
                name = prefix + b"/" + name if prefix else name
        text = name.decode("utf-8", "surrogateescape")
        skipped = kind in REGULAR and skip is not None and skip(text)
        if seekable and (skipped or kind not in REGULAR):
            if end is not None and stream.tell() + padded > end:
                raise TarDamage("truncated member")
            stream.seek(padded, 1)
            payload = b""
        else:
            payload = read(padded)
            if len(payload) < padded:
                raise TarDamage("truncated member")
        if kind in REGULAR:
            yield text, None if skipped else payload[:size]


def split_member(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member: the one rule every reader and counter of shards uses (webdataset's:
    key = the path up to the first dot of the file name, extension lower-cased). None for `__meta__` members and
    names without an extension, which belong to no sample."""
    if META.match(name) or ("/" not in name and name.startswith("__") and name.endswith("__")):
        return None
    match = KEY_EXT.match(name)
    if match is None:
        return None
    return match.group(1), match.group(2).lower()


def group_members(members: Iterable[tuple[str, bytes | None]], url: str) -> Iterator[dict[str, Any]]:
    """Samples as dicts {"__key__", "__url__", ext: bytes}, consecutive members with one key grouped (the data of
    skipped members is None)."""
    current: dict[str, Any] | None = None
    for name, data in members:
        split = split_member(name)
        if split is None:
            continue
        key, ext = split
        if current is None or key != current["__key__"]:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": url}
        if ext in current:
            raise TarDamage(f"duplicate file {name} in one sample")
        current[ext] = data
    if current is not None:
        yield current


class SampleOrdinals:
    """`skip` for iter_members that keeps the samples whose ordinal (position in the tar) `wanted` accepts: it
    numbers samples by the same key rule as group_members."""

    def __init__(self, wanted: Callable[[int], bool]) -> None:
        self.wanted = wanted
        self.key: str | None = None
        self.ordinal = -1

    def __call__(self, name: str) -> bool:
        split = split_member(name)
        if split is None:
            return True
        if split[0] != self.key:
            self.key, self.ordinal = split[0], self.ordinal + 1
        return not self.wanted(self.ordinal)


def iter_samples(stream: BinaryIO, url: str) -> Iterator[dict[str, Any]]:
    """The samples of an uncompressed tar stream (the lean reader)."""
    return group_members(iter_members(stream), url)


def iter_wanted_samples(
    stream: BinaryIO, url: str, wanted: Callable[[int], bool]
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(ordinal, sample) of the samples of an uncompressed tar stream that `wanted(ordinal)` accepts; the
    others' payloads are seeked past (their samples come with None data, so the caller sees how far it got)."""
    return enumerate(group_members(iter_members(stream, SampleOrdinals(wanted)), url))
