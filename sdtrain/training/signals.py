"""Record SLURM's warning signal from the first moment the process runs.

SLURM may send `--signal=USR1@N` seconds after a (re)start, while Python is still importing torch. Python's
default action for SIGUSR1 is to terminate, which would kill the job instead of letting it save and requeue. So
the entry point installs this recorder before any heavy import, and RequeueOnSignal reads it later. Only the
standard library is imported here.
"""

from __future__ import annotations

import signal
from types import FrameType

WARNING_SIGNALS = (signal.SIGUSR1,)
_received: set[int] = set()


def _record(signum: int, frame: FrameType | None) -> None:
    _received.add(signum)


def install(signals: tuple[int, ...] = WARNING_SIGNALS) -> None:
    for signum in signals:
        signal.signal(signum, _record)


def received(signum: int) -> bool:
    return signum in _received
