"""Exponential moving average of model weights: the math, kept apart from when it runs (the EMA callback).

shadow <- decay * shadow + (1 - decay) * param, done as one fused `_foreach_lerp_` over all tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(kw_only=True, slots=True)
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999
    """Target decay. Short CPU runs want ~0.99-0.999: decay d keeps d**n of the weights from n updates ago."""
    warmup: int = 10
    """Effective decay is min(decay, (1 + n) / (warmup + n)) after n updates; 0 = constant decay."""
    start_step: int = 0
    """Before this global step the EMA just copies the weights."""
    update_every: int = 1
    """Update every this many optimizer steps (the decay is applied per update, not per step)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")
        if self.update_every < 1 or self.warmup < 0 or self.start_step < 0:
            raise ValueError("update_every must be >= 1; warmup and start_step >= 0")


def ema_decay(num_updates: int, decay: float, warmup: int) -> float:
    """The decay for update number `num_updates` (0-based)."""
    if warmup <= 0:
        return decay
    return min(decay, (1.0 + num_updates) / (warmup + num_updates))


class EMAWeights:
    """A float32 shadow copy of a module's trainable parameters."""

    def __init__(self, module: nn.Module) -> None:
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        self.shadow = [params[n].detach().to(torch.float32, copy=True) for n in self.names]
        self.num_updates = 0

    def _params(self, module: nn.Module) -> list[torch.Tensor]:
        params = dict(module.named_parameters())
        return [params[n] for n in self.names]

    @torch.no_grad()
    def update(self, module: nn.Module, decay: float) -> None:
        params = [p.detach().float() for p in self._params(module)]
        torch._foreach_lerp_(self.shadow, params, 1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_from(self, module: nn.Module) -> None:
        torch._foreach_copy_(self.shadow, [p.detach().float() for p in self._params(module)])

    @contextmanager
    def swapped_into(self, module: nn.Module) -> Iterator[None]:
        """Temporarily load the EMA weights into `module` (for sampling); the trained weights come back after."""
        params = self._params(module)
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, self.shadow, strict=True):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup, strict=True):
                    p.copy_(b)

    def to(self, device: torch.device) -> None:
        self.shadow = [s.to(device) for s in self.shadow]

    def state_dict(self) -> dict:
        return {"shadow": dict(zip(self.names, self.shadow, strict=True)), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        missing = [n for n in self.names if n not in state["shadow"]]
        if missing or len(state["shadow"]) != len(self.names):
            raise ValueError(f"EMA state does not match the model ({len(missing)} missing, e.g. {missing[:1]})")
        device = self.shadow[0].device if self.shadow else "cpu"
        self.shadow = [state["shadow"][n].to(device, torch.float32) for n in self.names]
        self.num_updates = int(state["num_updates"])


def find_ema_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The EMA callback's state in a Lightning checkpoint ({"shadow": {param name: tensor}, ...}) or None."""
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if str(key).startswith("EMACallback") and isinstance(state, dict) and state.get("shadow"):
            return state
    return None
