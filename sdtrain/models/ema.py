"""Exponential moving average of model weights: the math, kept apart from when it runs (the EMA callback).

shadow <- decay * shadow + (1 - decay) * param, done as one fused `_foreach_lerp_` over all tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from sdtrain.models.sharded import full_shape, gather_full, local_part, local_shard, refresh_gathered


def ema_decay(num_updates: int, decay: float, warmup: int) -> float:
    """The decay for update number `num_updates` (0-based)."""
    if warmup <= 0:
        return decay
    return min(decay, (1.0 + num_updates) / (warmup + num_updates))


class EMAWeights:
    """A float32 shadow of a module's trainable parameters: of this rank's shard of each under ZeRO-3/FSDP2
    (models/sharded.py), so the update needs no communication; gathered to full tensors only to save."""

    def __init__(self, module: nn.Module) -> None:
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [local_shard(p).detach().to(torch.float32, copy=True) for p in self.params]
        self.num_updates = 0

    def _locals(self) -> list[torch.Tensor]:
        return [local_shard(p).detach() for p in self.params]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        torch._foreach_lerp_(self.shadow, [t.float() for t in self._locals()], 1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_from(self) -> None:
        torch._foreach_copy_(self.shadow, [t.float() for t in self._locals()])

    @contextmanager
    def swapped_into(self) -> Iterator[None]:
        """Temporarily put the EMA weights into the module (for sampling); the trained weights come back after.
        Every rank must enter it under ZeRO-3 (persistent parameters are re-gathered)."""
        locals_ = self._locals()
        backup = [t.clone() for t in locals_]
        with torch.no_grad():
            torch._foreach_copy_(locals_, self.shadow)
            refresh_gathered(self.params)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(locals_, backup)
                refresh_gathered(self.params)

    def to(self, device: torch.device) -> None:
        self.shadow = [s.to(device) for s in self.shadow]

    def state_dict(self) -> dict:
        """Full (gathered) float32 tensors on the CPU, the same format for every strategy. Collective when sharded."""
        full = [gather_full(p, s).cpu() for p, s in zip(self.params, self.shadow, strict=True)]
        return {"shadow": dict(zip(self.names, full, strict=True)), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        missing = [n for n in self.names if n not in state["shadow"]]
        if missing or len(state["shadow"]) != len(self.names):
            raise ValueError(f"EMA state does not match the model ({len(missing)} missing, e.g. {missing[:1]})")
        shadow = []
        for name, p, current in zip(self.names, self.params, self.shadow, strict=True):
            full = state["shadow"][name]
            if tuple(full.shape) != tuple(full_shape(p)):
                raise ValueError(f"EMA tensor {name} has shape {tuple(full.shape)}, the model {tuple(full_shape(p))}")
            shadow.append(local_part(p, full.to(current.device, torch.float32)).to(current.device, torch.float32))
        self.shadow = shadow
        self.num_updates = int(state["num_updates"])
