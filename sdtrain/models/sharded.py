"""A parameter's own shard on this rank, whatever sharded it: the one place that knows ZeRO-3 and FSDP2 layouts.

- plain / DDP / ZeRO-1/2: every rank holds the whole tensor;
- ZeRO-3: `p.ds_tensor` is this rank's slice of the flattened parameter, padded so every rank's slice has the
  same length (`p.data` is empty between forwards);
- FSDP2: `p` is a DTensor sharded on dim 0; `p._local_tensor` is this rank's rows.

EMA keeps a shadow of exactly the local shard (no communication per step) and gathers to full tensors only to
save; a full tensor is cut back to the local shard on load.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def is_zero3(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_tensor")


def local_shard(p: nn.Parameter) -> torch.Tensor:
    """The tensor holding this rank's part of `p`'s current values (writing into it changes `p`)."""
    if is_zero3(p):
        return p.ds_tensor
    if isinstance(p, DTensor):
        return p._local_tensor
    return p.data


def full_shape(p: nn.Parameter) -> torch.Size:
    return p.ds_shape if is_zero3(p) else p.shape


def gather_full(p: nn.Parameter, local: torch.Tensor) -> torch.Tensor:
    """`local` (laid out like `local_shard(p)`) assembled into the full tensor. Collective: every rank calls it."""
    if is_zero3(p):
        group = getattr(p, "ds_process_group", None)
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts)[: p.ds_numel].view(p.ds_shape)
    if isinstance(p, DTensor):
        spec = dict(run_check=False, shape=p.shape, stride=p.stride())
        return DTensor.from_local(local, p.device_mesh, p.placements, **spec).full_tensor()
    return local


def local_part(p: nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of the full tensor `full` (the inverse of gather_full). Collective for FSDP2."""
    if is_zero3(p):
        size = p.ds_tensor.numel()
        rank = dist.get_rank(getattr(p, "ds_process_group", None))
        flat = full.reshape(-1)
        part = flat[rank * size : (rank + 1) * size]
        return torch.cat([part, part.new_zeros(size - part.numel())]) if part.numel() < size else part.clone()
    if isinstance(p, DTensor):
        return distribute_tensor(full.to(p.device), p.device_mesh, p.placements)._local_tensor
    return full


def refresh_gathered(params: Sequence[nn.Parameter]) -> None:
    """After writing into ZeRO-3 shards: re-gather the parameters ZeRO-3 keeps whole between forwards
    (`stage3_param_persistence_threshold`), which would otherwise keep their old values."""
    persistent = [p for p in params if is_zero3(p) and getattr(p, "ds_persist", False)]
    if persistent:
        persistent[0].all_gather(param_list=persistent)
