"""tests/cli_runner.py, which starts every command of the suite: a forked command behaves as a fresh interpreter
(exit codes, output, environment, working directory, atexit), and ranks start and stop as under torchrun."""

import subprocess
import time

import pytest
from cli_runner import run_module
from helpers import REPO

pytestmark = pytest.mark.slow
HERE = REPO / "tests"  # cli_probe.py's folder: `python -m cli_probe` finds it from there
CASES = [
    ["show", "PROBE_VALUE"],
    ["exit", "0"],
    ["exit", "7"],
    ["fail", "a one-line message"],
    ["atexit"],
]


@pytest.mark.parametrize("args", CASES, ids=lambda a: "-".join(a))
def test_a_forked_command_ends_as_a_fresh_interpreter(args, tmp_path):
    common = {"cwd": HERE, "env": {"PROBE_VALUE": "42"}, "timeout": 120}
    fresh = run_module("cli_probe", *args, fresh=True, **common)
    forked = run_module("cli_probe", *args, **common)
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)


def test_an_uncaught_exception_is_a_traceback_and_exit_1():
    for fresh in (True, False):
        done = run_module("cli_probe", "raise", "boom", cwd=HERE, fresh=fresh, timeout=120)
        assert done.returncode == 1 and "Traceback" in done.stderr
        assert done.stderr.strip().splitlines()[-1] == "RuntimeError: boom"


def test_ranks_get_torchruns_environment_and_a_failing_rank_stops_the_others():
    done = run_module("cli_probe", "rank", "-", cwd=HERE, ranks=2, timeout=120)
    assert done.returncode == 0 and done.stdout.splitlines() == ["rank 0 of 2 at 127.0.0.1", "rank 1 of 2 at 127.0.0.1"]
    start = time.monotonic()
    done = run_module("cli_probe", "rank", "1", cwd=HERE, ranks=2, timeout=300)
    assert done.returncode == 3 and time.monotonic() - start < 290  # rank 0 (asleep for 600 s) was stopped


def test_a_command_past_its_timeout_is_killed():
    with pytest.raises(subprocess.TimeoutExpired):
        run_module("cli_probe", "sleep", "600", cwd=HERE, timeout=2)
