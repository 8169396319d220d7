"""Which checkpoint a run continues from: `resume=auto` takes the newest one in DIR/checkpoints that loads, and
says which; a damaged newer one is reported and skipped; saves killed half-way are cleaned up first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil

from sdtrain.checkpoint.files import load_checkpoint_meta
from sdtrain.checkpoint.format import LAST_NAME
from sdtrain.checkpoint.sharded import OLD_SUFFIX, TMP_SUFFIX
from sdtrain.errors import CheckpointError

log = logging.getLogger(__name__)
STEP_PATTERN = re.compile(r"step_(\d+)\.ckpt$")  # format.STEP_NAME + ".ckpt"


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
    last = os.path.join(ckpt_dir, LAST_NAME)
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


def resolve_resume(resume: str | None, run_dir: str) -> str | None:
    """The checkpoint for `resume=` (null | auto | PATH), checked to load before any work; None = start fresh."""
    if resume in (None, "", "none", "null"):
        return None
    if resume == "auto":
        return find_resume_checkpoint(os.path.join(run_dir, "checkpoints"))
    if not os.path.exists(resume):
        raise CheckpointError(f"resume checkpoint not found: {resume}")
    load_checkpoint_meta(resume)  # a damaged checkpoint fails here, with its name, before any work
    return resume
