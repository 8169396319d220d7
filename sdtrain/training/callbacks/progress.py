"""Progress a job log can show: one line every N steps or seconds on rank 0 when stdout is not a terminal (SLURM
output files, `tee`, CI), and the progress bar (without Lightning's "Epoch 0/-2" for an endless stream) when it
is one.

    step 1200/50000 (2.4%) | loss 0.1234 | lr 1.00e-04 | 412.3 img/s | MFU 38.1% | data wait 1.2% |
    peak mem 61.2 GiB | elapsed 0:42:10 | ETA 28:31:05

The loss is the mean over the steps since the last line, summed on the device and read once per line, so the
lines add no host sync per step.
"""

from __future__ import annotations

import datetime
import logging
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar

from sdtrain.training.metrics import mfu

log = logging.getLogger("sdtrain.progress")


@dataclass(kw_only=True, slots=True)
class ProgressConfig:
    enabled: str = "auto"
    """auto (lines when stdout is not a terminal, the bar when it is) | lines (always lines) | bar | off."""
    every_n_steps: int = 0
    """A line every this many steps (0 = by time only)."""
    every_seconds: float = 60.0
    """A line when this many seconds passed since the last (0 = by steps only)."""

    def __post_init__(self) -> None:
        if self.enabled not in ("auto", "lines", "bar", "off"):
            raise ValueError(f"enabled must be auto, lines, bar or off, got {self.enabled!r}")

    def lines(self) -> bool:
        return self.enabled == "lines" or (self.enabled == "auto" and not sys.stdout.isatty())

    def bar(self) -> bool:
        return self.enabled == "bar" or (self.enabled == "auto" and sys.stdout.isatty())


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar, titled by steps: the stream is endless (max_epochs=-1), so "Epoch 0/-2" meant nothing.
    It shows the last loss and the throughput window's img/s itself: the training step logs nothing with
    prog_bar=True, which would read a device value back every step for every run, bar or not. (The bar is for
    interactive terminals; it reads the loss once per refresh.)"""

    def __init__(self) -> None:
        super().__init__()
        self._loss: torch.Tensor | None = None

    def _get_train_description(self, current_epoch: int) -> str:
        return f"Training (max {self.trainer.max_steps} steps)"

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self._loss = loss.detach() if isinstance(loss, torch.Tensor) else self._loss
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        if self._loss is not None:
            metrics["loss"] = f"{self._loss.item():.4f}"
        rate = next((c.images_per_s for c in trainer.callbacks if hasattr(c, "images_per_s")), None)
        if rate is not None:
            metrics["img/s"] = f"{rate:,.1f}"
        return metrics


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(max(0.0, seconds))))


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    """(peak GiB, what was measured): the accelerator's allocator peak, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "GPU"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "RSS"  # Linux reports KiB


class ProgressLog(L.Callback):
    def __init__(self, cfg: ProgressConfig) -> None:
        self.cfg = cfg
        self._loss_sum: torch.Tensor | None = None
        self._steps = self._images = 0
        self._wait = self._busy = 0.0
        self._start = self._last_line = self._batch_start = self._last_end = 0.0
        self._first_step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._last_line = self._last_end = time.perf_counter()
        self._first_step = trainer.global_step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int) -> None:
        self._batch_start = time.perf_counter()
        self._wait += self._batch_start - self._last_end

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        self._busy += now - self._batch_start
        self._last_end = now
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):  # a skipped (non-finite) step returns None
            loss = loss.detach().float()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._steps += 1
        self._images += len(batch["keys"])
        step = trainer.global_step
        by_steps = self.cfg.every_n_steps > 0 and step % self.cfg.every_n_steps == 0
        by_time = self.cfg.every_seconds > 0 and now - self._last_line >= self.cfg.every_seconds
        if by_steps or by_time or step >= (trainer.max_steps or 0):
            self.report(trainer, pl_module, now)

    def report(self, trainer: L.Trainer, pl_module: L.LightningModule, now: float) -> None:
        """One line (rank 0 prints; every rank resets its sums)."""
        step, total = trainer.global_step, trainer.max_steps
        interval = max(now - self._last_line, 1e-9)
        rate = self._images * trainer.world_size / interval
        loss = (self._loss_sum / max(self._steps, 1)).item() if self._loss_sum is not None else float("nan")
        fields = [f"step {step}/{total} ({100 * step / max(total, 1):.1f}%)", f"loss {loss:.4f}"]
        if trainer.optimizers:
            fields.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")
        fields.append(f"{rate:,.1f} img/s")
        throughput = next((c for c in trainer.callbacks if hasattr(c, "flops_per_image")), None)
        utilisation = (
            mfu(throughput.flops_per_image, rate / trainer.world_size, throughput.peak) if throughput else None
        )
        if utilisation is not None:
            fields.append(f"MFU {100 * utilisation:.1f}%")
        fields.append(f"data wait {100 * self._wait / max(self._wait + self._busy, 1e-9):.1f}%")
        peak, kind = peak_memory_gib(pl_module.device)
        fields.append(f"peak mem {peak:.1f} GiB ({kind})")
        elapsed = now - self._start
        done = step - self._first_step
        eta = elapsed / done * (total - step) if done > 0 else 0.0
        fields += [f"elapsed {_clock(elapsed)}", f"ETA {_clock(eta)}"]
        if trainer.is_global_zero:
            log.info(" | ".join(fields))
        self._loss_sum, self._steps, self._images = None, 0, 0
        self._wait = self._busy = 0.0
        self._last_line = now
