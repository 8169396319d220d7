"""On SLURM's warning signal (sbatch --signal=USR1@SECONDS): save a checkpoint, requeue the job once, stop.

The signal handler only sets a flag; the work happens at the next step boundary, where all ranks agree (any rank
signalled = all save), build the checkpoint together and rank 0 calls `scontrol requeue`. The requeued job starts
with resume=auto and continues from that checkpoint. Preemption (SIGTERM from scancel/preempt) needs nothing
here: checkpoints are atomic, so the last complete one always loads.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from types import FrameType
from typing import Any

import lightning as L

from sdtrain.training import signals

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class PreemptionConfig:
    enabled: bool = True
    """Only active under SLURM: on `signal`, save DIR/checkpoints/last.ckpt, requeue the job once and stop."""
    signal: str = "SIGUSR1"
    """sbatch --signal=USR1@SECONDS."""
    requeue: bool = True
    """scontrol requeue once; the new job continues with resume=auto."""


def _exit_quietly(signum: int, frame: FrameType | None) -> None:
    log.info("SLURM ends this job for its requeue: exiting (the requeued job resumes from the checkpoint)")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class RequeueOnSignal(L.Callback):
    def __init__(self, *, ckpt_path: str, signal_name: str = "SIGUSR1", requeue: bool = True) -> None:
        self.ckpt_path = ckpt_path
        self.signum = getattr(signal, signal_name)
        self.requeue = requeue
        self.done = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Usually already done by the entry point; installed before the DataLoader forks its workers, so they
        # inherit the recorder instead of dying on the signal.
        signals.install((self.signum,))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.done:
            return
        signalled = signals.received(self.signum)
        if trainer.world_size > 1:
            signalled = trainer.strategy.reduce_boolean_decision(signalled, all=False)
        if not signalled:
            return
        self.done = True
        trainer.save_checkpoint(self.ckpt_path)  # every rank takes part; rank 0 writes
        log.warning(
            "%s received: saved %s at step %d", signal.Signals(self.signum).name, self.ckpt_path, trainer.global_step
        )
        job_id = os.environ.get("SLURM_JOB_ID")
        if self.requeue and job_id:
            # `scontrol requeue` makes SLURM end every task of this job (SIGTERM): exit quietly then, instead of
            # each rank printing Hydra's "Error executing job", worker and gloo tracebacks into the job log. The
            # checkpoint is complete, so nothing is lost. Installed on every rank before rank 0 requeues.
            signal.signal(signal.SIGTERM, _exit_quietly)
            trainer.strategy.barrier("requeue")
        if self.requeue and job_id and trainer.is_global_zero:
            result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, check=False)
            if result.returncode == 0:
                log.warning("requeued SLURM job %s; it will resume from the checkpoint", job_id)
            else:
                log.error("scontrol requeue %s failed: %s", job_id, result.stderr.strip())
        trainer.should_stop = True
