"""Checkpoint files: atomic writes and safe loads.

- Save: write `NAME.tmp-PID`, fsync, rename over NAME, fsync the folder. A kill at any moment leaves either
  the old file or the new one, never a half-written checkpoint under a real name.
- Load: `torch.load(weights_only=True)` only: a checkpoint is data (tensors, numbers, strings), and a user-supplied
  file can never run code. An unreadable file is a CheckpointError naming it.
- Sharded strategies (DeepSpeed, FSDP) write directories instead of files (sharded.py reads them and makes
  their writes atomic); everything here takes either. Which one to resume from is resume.py's.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from sdtrain.checkpoint.sharded import read_full, read_meta
from sdtrain.errors import CheckpointError, first_line

log = logging.getLogger(__name__)


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint_file(path: str, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """A checkpoint as plain data; CheckpointError (one line, naming the file) if it cannot be read."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
        first = first_line(exc)
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or not a checkpoint): {first}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} is not an sdtrain/Lightning training checkpoint (no state_dict)")
    return checkpoint


def load_checkpoint_meta(path: str) -> dict[str, Any]:
    """A checkpoint's training state (global_step, callbacks, sdtrain) from a file or a sharded directory. Cheap:
    files are memory-mapped, directories give their small metadata file only."""
    return read_meta(path) if os.path.isdir(path) else load_checkpoint_file(path, mmap=True)


def load_full_checkpoint(path: str) -> dict[str, Any]:
    """A checkpoint with its full `state_dict` on the CPU, whichever strategy wrote it."""
    return read_full(path) if os.path.isdir(path) else load_checkpoint_file(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO with fsync + rename saves and weights_only loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = os.fspath(path)
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint_file(os.fspath(path), map_location=map_location or "cpu")


def state_dict_mismatch(exc: RuntimeError) -> str:
    """torch's multi-line load_state_dict error as one line: counts per kind and the first example."""
    text = str(exc)
    missing = re.search(r"Missing key\(s\) in state_dict: (.*?)\.\s*$", text, re.M)
    unexpected = re.search(r"Unexpected key\(s\) in state_dict: (.*?)\.\s*$", text, re.M)
    sizes = re.findall(r"size mismatch for ([^:]+): (.*)", text)
    parts = []
    if sizes:
        parts.append(f"{len(sizes)} size mismatches (first: size mismatch for {sizes[0][0]}: {sizes[0][1].strip()})")
    for label, match in (("missing", missing), ("unexpected", unexpected)):
        if match:
            keys = [k.strip().strip('"') for k in match.group(1).split(",")]
            parts.append(f"{len(keys)} {label} keys (first: {keys[0]})")
    return "; ".join(parts) or text.strip().splitlines()[-1]
