"""Reading the checkpoint directories that sharding strategies write, without starting any processes.

- DeepSpeed (ZeRO 1/2/3): `NAME/latest` holds the tag; `NAME/TAG/*mp_rank_00_model_states.pt` holds Lightning's
  checkpoint dict (loops, callbacks incl. the gathered EMA, `sdtrain`) next to DeepSpeed's own keys; the weights
  are spread over `zero_pp_rank_R_*` files and put back together by DeepSpeed's `zero_to_fp32`.
- FSDP2 (torch.distributed.checkpoint): `NAME/meta.pt` holds Lightning's dict; `NAME/*.distcp` the shards.

`read_meta` is cheap (no weights) and serves resume probing; `read_full` returns a single-file-style checkpoint
(full fp32 `state_dict` on the CPU) that sampling, export and consolidation use for every strategy alike.

Writes are atomic like single-file saves: every rank writes into NAME.tmp-save; after a barrier rank 0 moves an
existing NAME aside (NAME.old-save), renames the new one into place and deletes the old. A kill before the
rename leaves NAME as it was (the next resume removes the .tmp-save); a kill between the two renames leaves only
NAME.old-save, which the next resume moves back.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import tempfile
import zipfile
from typing import Any

import torch

from sdtrain.errors import CheckpointError, first_line

OLD_SUFFIX = ".old-save"
TMP_SUFFIX = ".tmp-save"
LOAD_ERRORS = (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, KeyError)


def _deepspeed_tag(path: str) -> str | None:
    latest = os.path.join(path, "latest")
    if not os.path.isfile(latest):
        return None
    with open(latest, encoding="utf-8") as f:
        return f.read().strip()


def sharded_kind(path: str) -> str | None:
    """'deepspeed', 'dcp' or None (not a sharded checkpoint directory)."""
    if not os.path.isdir(path):
        return None
    if _deepspeed_tag(path) is not None:
        return "deepspeed"
    if os.path.isfile(os.path.join(path, "meta.pt")) and os.path.isfile(os.path.join(path, ".metadata")):
        return "dcp"
    return None


def _meta_file(path: str, kind: str) -> str:
    if kind == "dcp":
        return os.path.join(path, "meta.pt")
    tag_dir = os.path.join(path, _deepspeed_tag(path) or "")
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if os.path.isfile(os.path.join(tag_dir, name)):
            return os.path.join(tag_dir, name)
    raise CheckpointError(f"checkpoint {path} is incomplete: no model states file in {tag_dir}")


def read_meta(path: str) -> dict[str, Any]:
    """Lightning's checkpoint dict of a sharded directory, without the weights (callbacks, loops, sdtrain)."""
    kind = sharded_kind(path)
    if kind is None:
        raise CheckpointError(f"checkpoint {path} is a directory but neither a DeepSpeed nor a torch DCP checkpoint")
    meta_file = _meta_file(path, kind)
    try:
        meta = torch.load(meta_file, map_location="cpu", weights_only=True, mmap=True)
    except LOAD_ERRORS as exc:
        first = first_line(exc)
        raise CheckpointError(f"checkpoint {path} is unreadable ({os.path.basename(meta_file)}): {first}") from None
    if not isinstance(meta, dict) or "global_step" not in meta:
        raise CheckpointError(f"checkpoint {path} is not an sdtrain/Lightning training checkpoint (no global_step)")
    meta.pop("module", None)  # DeepSpeed's placeholder weights; the real ones come from read_full
    return meta


def _deepspeed_state_dict(path: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # chatty
        state = get_fp32_state_dict_from_zero_checkpoint(
            path, tag=_deepspeed_tag(path), exclude_frozen_parameters=False
        )
    return {k: v.detach().clone() for k, v in state.items()}


def _dcp_state_dict(path: str) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "full.pt")
        dcp_to_torch_save(path, out)
        return torch.load(out, map_location="cpu", weights_only=True)["state_dict"]


def read_full(path: str) -> dict[str, Any]:
    """A sharded checkpoint as one single-file-style dict (`state_dict` full and fp32 where training was)."""
    checkpoint = read_meta(path)
    try:
        state = _deepspeed_state_dict(path) if sharded_kind(path) == "deepspeed" else _dcp_state_dict(path)
    except LOAD_ERRORS as exc:
        first = first_line(exc)
        raise CheckpointError(f"checkpoint {path}: its shards do not load ({first})") from None
    checkpoint["state_dict"] = state
    return checkpoint


def replace_directory(strategy: Any, tmp: str, final: str) -> None:
    """Called on every rank once its shard of `tmp` is written: puts `tmp` in place of `final`."""
    strategy.barrier("sharded-checkpoint-written")
    if strategy.is_global_zero:
        old = final + OLD_SUFFIX
        if os.path.isdir(final) and not os.path.islink(final):
            os.replace(final, old)
        elif os.path.lexists(final):
            os.remove(final)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    strategy.barrier("sharded-checkpoint-renamed")
