"""Checkpoint files: atomic writes, safe loads, and picking the checkpoint to resume from.

- Save: write `NAME.tmp-PID`, fsync, rename over NAME, fsync the folder. A kill at any moment leaves either
  the old file or the new one, never a half-written checkpoint under a real name.
- Load: `torch.load(weights_only=True)` only: a checkpoint is data (tensors, numbers, strings), and a user-supplied
  file can never run code. An unreadable file is a CheckpointError naming it.
- Resume: `resume=auto` takes the newest checkpoint in DIR/checkpoints that loads, and says which; a damaged
  newer one is reported and skipped.
- Sharded strategies (DeepSpeed, FSDP) write directories instead of files (training/sharded_checkpoint.py reads
  them and makes their writes atomic); everything here takes either.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import shutil
import zipfile
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from sdtrain.errors import CheckpointError, first_line
from sdtrain.training.sharded_checkpoint import OLD_SUFFIX, TMP_SUFFIX, read_full, read_meta

log = logging.getLogger(__name__)
STEP_PATTERN = re.compile(r"step_(\d+)\.ckpt$")


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


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that always leaves the final state in last.ckpt.

    Lightning writes last.ckpt at the end of training only if no checkpoint was ever written, so a run whose
    max_steps is not a multiple of every_n_train_steps would end with a stale last.ckpt.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def _candidates(ckpt_dir: str) -> list[str]:
    """Checkpoints in `ckpt_dir`, newest first: step_N.ckpt by N, with last.ckpt ahead of an equal step."""
    if not os.path.isdir(ckpt_dir):
        return []
    steps = []
    for name in os.listdir(ckpt_dir):
        match = STEP_PATTERN.search(name)
        if match:
            steps.append((int(match.group(1)), name))
    ordered = [os.path.join(ckpt_dir, name) for _, name in sorted(steps, reverse=True)]
    last = os.path.join(ckpt_dir, "last.ckpt")
    return ([last] if os.path.exists(last) else []) + ordered


def remove_partial_writes(ckpt_dir: str) -> None:
    """Delete `*.ckpt.tmp-PID` files and `*.tmp-save` directories: saves killed before their rename, never usable.
    A sharded save killed between its two renames left only `NAME.old-save`: move it back to NAME."""
    if not os.path.isdir(ckpt_dir):
        return
    for name in os.listdir(ckpt_dir):
        path = os.path.join(ckpt_dir, name)
        if ".ckpt.tmp-" in name or name.endswith(TMP_SUFFIX):
            log.warning("removing %s: a checkpoint write that did not finish", name)
            with contextlib.suppress(FileNotFoundError):  # another rank may have removed it first
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        elif name.endswith(OLD_SUFFIX):
            final = path[: -len(OLD_SUFFIX)]
            if os.path.exists(final):
                shutil.rmtree(path, ignore_errors=True)
            else:
                log.warning("restoring %s: its replacement was not renamed into place", final)
                with contextlib.suppress(FileNotFoundError):  # another rank may have restored it first
                    os.replace(path, final)


def find_resume_checkpoint(ckpt_dir: str) -> str | None:
    """The newest loadable checkpoint in `ckpt_dir` (None if there is none), logging which one and why.

    last.ckpt is written with every step checkpoint, so it comes first; a damaged one falls back to the newest
    step_N.ckpt that loads. Probing uses mmap, so it does not read whole multi-GB files.
    """
    remove_partial_writes(ckpt_dir)
    candidates = _candidates(ckpt_dir)
    for path in candidates:
        try:
            step = int(load_checkpoint_meta(path).get("global_step", -1))
        except CheckpointError as exc:
            log.warning("resume=auto: skipping %s", exc)
            continue
        log.info("resume=auto: continuing from %s (global step %d)", path, step)
        return path
    if candidates:
        raise CheckpointError(f"resume=auto: none of the {len(candidates)} checkpoints in {ckpt_dir} loads")
    log.info("resume=auto: no checkpoint in %s, starting fresh", ckpt_dir)
    return None
