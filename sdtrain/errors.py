"""User-facing errors: the launcher prints them as one line and exits non-zero, never a traceback wall."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable


class SdtrainError(Exception):
    """A problem the user can fix (bad config, bad data, missing file). Printed as `error: <message>`."""


class ConfigError(SdtrainError):
    """An invalid configuration value or key."""


class DataError(SdtrainError):
    """Shards that cannot be found, read or used with this model."""


class CheckpointError(SdtrainError):
    """A checkpoint that cannot be found or does not fit the model."""


def one_line(exc: BaseException) -> str:
    """The message to print: errors re-raised from DataLoader workers carry the worker's traceback text, whose
    last line is the message."""
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def first_line(exc: BaseException) -> str:
    """The first line of a library's (often multi-line) exception text, for wrapping it in our own one-liner."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def command_line(run: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Wrap a console script's body: INFO logging, and any SdtrainError as one `error: ...` line + exit code 2."""

    @functools.wraps(run)
    def main(argv: list[str] | None = None) -> int:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
        try:
            return run(argv)
        except SdtrainError as exc:
            print(f"error: {one_line(exc)}", file=sys.stderr)
            return 2

    return main
