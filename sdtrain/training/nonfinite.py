"""The NaN/Inf policy of the training step (`optim.on_nonfinite_loss`), without a host sync per step.

A non-finite loss on any rank must skip the optimizer step on every rank. Two ways to get there:

- **on the device** (default where it applies: torch's fused AdamW, no fp16 GradScaler, a strategy whose
  optimizer step Lightning drives — DDP, FSDP, one device). The loss that goes to backward is multiplied by 1 when
  finite and by NaN when not, so every gradient of that rank becomes NaN and the gradient all-reduce (DDP) or
  reduce-scatter (FSDP) carries the flag to all ranks: no extra collective. Before the step, the U-Net's total
  gradient norm (computed anyway for `train/grad_norm`) is then non-finite on every rank or on none; it becomes the
  fused AdamW's `found_inf`, with which the kernel leaves parameters, moments and step counts as they were (the
  mechanism GradScaler uses for fp16 overflow). Skips are counted on the device and read where Lightning syncs to
  log anyway — every `trainer.log_every_n_steps`, before each checkpoint and at the end — and the warning,
  `train/nonfinite_skips` and `max_nonfinite_skips` act there. It also skips a step whose loss was finite but
  whose gradients overflowed (the host way applied those).
- **on the host** (DeepSpeed, whose engine steps by itself; `on_nonfinite_loss=stop`, which stops at the very
  step; optimizers without `found_inf`): `.item()` on the loss and, with several ranks, an all-reduce of the
  decision, every step; a skipped step returns None to Lightning, which then runs neither backward nor the update.

Both end the same (tests/integration/test_nonfinite_skip.py): weights, AdamW moments and step counts untouched,
while the global step, the LR schedule and the EMA (of the unchanged weights) advance. Under gradient accumulation
the on-device way skips the whole optimizer step, the host way only the bad micro-batch.
"""

from __future__ import annotations

import logging

import lightning as L
import torch

from sdtrain.errors import SdtrainError
from sdtrain.training.optim import OptimConfig

log = logging.getLogger(__name__)


def fused_found_inf_supported(optimizer: torch.optim.Optimizer) -> bool:
    """torch's fused Adam/AdamW read `optimizer.found_inf` and skip their update on the device when it is 1."""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))


class NonfiniteGuard:
    """Counts and skips non-finite steps; `skips` is the confirmed (host) count, saved in checkpoints."""

    def __init__(self, cfg: OptimConfig) -> None:
        self.cfg = cfg
        self.skips = 0
        self.on_device = False
        self._device_count: torch.Tensor | None = None  # skips so far, as the device knows them

    def choose(self, trainer: L.Trainer) -> None:
        """Pick the way once the optimizer exists (on_train_start)."""
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.on_device = (
            self.cfg.on_nonfinite_loss == "skip"
            and optimizer is not None
            and fused_found_inf_supported(optimizer)
            and getattr(trainer.strategy, "can_skip_steps", True)
            and getattr(trainer.precision_plugin, "scaler", None) is None  # fp16: GradScaler owns found_inf
        )
        self._device_count = None
        log.debug("non-finite steps are skipped on the %s", "device" if self.on_device else "host")

    # ---- on the device -------------------------------------------------------------------------------------
    @staticmethod
    def poison(loss: torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate: itself when finite (x * 1.0 is exact), else one whose gradients are all NaN."""
        return loss * torch.where(torch.isfinite(loss), 1.0, float("nan")).to(loss.dtype)

    def gate(self, optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor) -> None:
        """Make the coming fused AdamW step a no-op when the (all-reduced) gradients are not finite."""
        found_inf = (~torch.isfinite(grad_norm)).to(torch.float32)
        optimizer.found_inf = found_inf
        if self._device_count is None or self._device_count.device != found_inf.device:
            self._device_count = torch.full((), float(self.skips), device=found_inf.device)
        self._device_count += found_inf

    def check(self, step: int) -> int:
        """Read the device count (one host sync; only at log/checkpoint/end points) and apply the policy."""
        if not self.on_device or self._device_count is None:
            return self.skips
        total = int(self._device_count.item())
        new, self.skips = total - self.skips, total
        if new:
            where = f"{new} step(s) with a non-finite loss or gradients skipped by step {step}"
            if self.skips > self.cfg.max_nonfinite_skips:
                raise SdtrainError(
                    f"{where} ({self.skips} in all > optim.max_nonfinite_skips={self.cfg.max_nonfinite_skips})"
                )
            log.warning("%s (%d so far)", where, self.skips)
        return self.skips

    # ---- on the host ---------------------------------------------------------------------------------------
    def finite_everywhere(self, trainer: L.Trainer, loss: torch.Tensor) -> bool:
        finite = bool(torch.isfinite(loss).item())
        if trainer.world_size > 1:  # every rank must take the same branch, or DDP's all-reduce hangs
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        return finite

    def skip_now(self, trainer: L.Trainer, loss: torch.Tensor, step: int) -> None:
        """Count one skipped step, or stop the run where skipping is not allowed or not possible."""
        self.skips += 1
        where = f"non-finite loss ({loss.item()}) at step {step} on some rank"
        if not getattr(trainer.strategy, "can_skip_steps", True):
            raise SdtrainError(f"{where}: DeepSpeed cannot skip an optimizer step; resume from the last checkpoint")
        if self.cfg.on_nonfinite_loss == "stop" or self.skips > self.cfg.max_nonfinite_skips:
            raise SdtrainError(
                f"{where} (skipped {self.skips - 1} before; optim.on_nonfinite_loss="
                f"{self.cfg.on_nonfinite_loss}, max_nonfinite_skips={self.cfg.max_nonfinite_skips})"
            )
        log.warning("%s: step skipped (%d so far)", where, self.skips)
