"""Which steps Lightning writes to the loggers, so that per-step values are handed over only on those.

On a GPU, every Python number given to `self.log` is copied to the device, and every `prog_bar=True` value is
read back to the host after each batch for as long as the run lasts; both wait for the queued GPU work. The
hot path therefore logs device tensors only (no copy, no read) and everything else on the logging steps, where
Lightning reads all logged values anyway.
"""

from __future__ import annotations

import lightning as L


def logs_this_step(trainer: L.Trainer) -> bool:
    """True in a training-batch hook when Lightning will write this batch's metrics (trainer.log_every_n_steps)."""
    return bool(trainer._logger_connector.should_update_logs)  # Lightning's own rule (+1 for the running batch)
