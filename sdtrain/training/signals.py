"""Record SLURM's warning signal from the first moment the process runs.

SLURM may send `--signal=USR1@N` seconds after a (re)start, while Python is still importing torch. Python's
default action for SIGUSR1 is to terminate, which would kill the job instead of letting it save and requeue. So
the entry point installs this recorder before any heavy import, and RequeueOnSignal reads it later. Only the
standard library is imported here.
"""

from __future__ import annotations

import atexit
import signal
from types import FrameType

WARNING_SIGNALS = (signal.SIGUSR1,)
_received: set[int] = set()


def _record(signum: int, frame: FrameType | None) -> None:
    _received.add(signum)


def _ignore(signals: tuple[int, ...]) -> None:
    # Interpreter shutdown puts Python-level handlers back to the default action, which for SIGUSR1 is to die:
    # a warning arriving while a finished run exits would turn a completed job into a failed one.
    for signum in signals:
        signal.signal(signum, signal.SIG_IGN)


def install(signals: tuple[int, ...] = WARNING_SIGNALS) -> None:
    for signum in signals:
        signal.signal(signum, _record)
    atexit.register(_ignore, signals)


def received(signum: int) -> bool:
    return signum in _received
