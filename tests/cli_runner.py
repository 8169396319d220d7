"""Run an sdtrain command (`python -m MODULE ARGS`) as its own process without paying its imports every time.

A fresh interpreter spends ~9 s of a 2-core machine importing torch, Lightning (which imports torchmetrics, and
with it torchvision, transformers and scipy), diffusers and open_clip before the first step; most slow tests start
one or more such commands. Here a fork server (multiprocessing's "forkserver") imports those modules once per test
session and forks one child per command: the child runs the module as `__main__` with the given argv, environment
and working directory, its stdout/stderr in files, and exits with the command's exit code as `subprocess.run`
reports it. A child is still a process of its own (memory, signals, exit code, atexit handlers); what the children
share is the modules' state as their imports left it, since the server runs nothing else. Several ranks are
started as torchrun starts its workers (`ranks=N`).

SDTRAIN_TESTS_FRESH_PROCESSES=1 runs every command as a fresh interpreter instead (to rule this runner out; ranks are
then started by Lightning's launcher), and `fresh=True` does so for one command (the tests of what a fresh process
prints while importing, and of Lightning's launcher).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the modules the commands' entry points import; the children of the server start with them imported
PRELOAD = [
    "sdtrain.launch.train",
    "sdtrain.launch.train_vae",
    "sdtrain.sample.cli",
    "sdtrain.export.cli",
    "sdtrain.evaluate.cli",
]
_SERVER = multiprocessing.get_context("forkserver")
_SERVER.set_forkserver_preload(PRELOAD)


def run_module(
    module: str,
    *args: str,
    cwd: Path | str,
    env: dict | None = None,
    timeout: float = 600,
    fresh: bool = False,
    ranks: int = 1,
) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` in CWD with os.environ + PYTHONUNBUFFERED=1 + ENV, output captured as text.

    ranks > 1: one process per rank with the environment torchrun gives its workers (RANK, WORLD_SIZE, MASTER_PORT,
    TORCHELASTIC_RUN_ID, ...), so Lightning starts no processes of its own; their outputs one after the other, the
    exit code the first failing rank's, and the other ranks stopped when one fails (as torchrun does)."""
    full_env = _command_env(env)
    cmd = [sys.executable, "-m", module, *args]
    if _fresh(fresh):  # ranks: Lightning's launcher starts them
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)
    with tempfile.TemporaryDirectory(prefix="sdtrain-cli-") as out:
        port, children, outputs = free_port(), [], []
        for rank in range(ranks):
            rank_args, rank_env = list(args), dict(full_env)
            if ranks > 1:
                rank_env.update(_torchrun_env(rank, ranks, port))
                if rank:  # what Lightning's launcher adds for the other ranks of a Hydra job: no second config
                    rank_args += ["hydra.output_subdir=null", f"hydra.job.name=train_ddp_process_{rank}"]
            paths = (os.path.join(out, f"{rank}.stdout"), os.path.join(out, f"{rank}.stderr"))
            children.append(_SERVER.Process(target=_run_as_main, args=(module, rank_args, str(cwd), rank_env, paths)))
            children[-1].start()
            outputs.append(paths)
        code = _wait_all(children, timeout, cmd)
        stdout, stderr = ("".join(Path(p[i]).read_text(encoding="utf-8", errors="replace") for p in outputs)
                          for i in (0, 1))  # fmt: skip
    return subprocess.CompletedProcess(cmd, code, stdout, stderr)


def _torchrun_env(rank: int, world: int, port: int) -> dict[str, str]:
    return {
        "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
        "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "ROLE_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "sdtrain-tests",
    }  # fmt: skip


def _wait_all(children: list, timeout: float, cmd: list[str]) -> int:
    """Wait until every child has exited; the exit code of the first to fail (0 if none did). Once one fails the
    rest are killed (a rank left alone would wait for its peer until the process group's timeout); past TIMEOUT,
    all of them (then TimeoutExpired)."""
    deadline = time.monotonic() + timeout
    while any(c.is_alive() for c in children):
        failed = [c.exitcode for c in children if c.exitcode]
        if failed or time.monotonic() > deadline:
            for child in children:
                child.kill()
            for child in children:
                child.join()
            if not failed:
                raise subprocess.TimeoutExpired(cmd, timeout)
            return failed[0]
        multiprocessing.connection.wait([c.sentinel for c in children if c.is_alive()], timeout=1.0)
    return next((c.exitcode for c in children if c.exitcode), 0)


def _command_env(env: dict | None) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}


def _fresh(asked: bool) -> bool:
    return asked or os.environ.get("SDTRAIN_TESTS_FRESH_PROCESSES") == "1"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a test's process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Started:
    """A command started by `start_module`, output discarded: its pid (the leader of its own session, so
    `os.killpg(pid, ...)` reaches it and every process it started), `poll()` and `wait()` as in subprocess.Popen."""

    def __init__(self, module: str, args: list[str], cwd: Path | str, env: dict | None, fresh: bool) -> None:
        full_env = _command_env(env)
        if _fresh(fresh):
            cmd = [sys.executable, "-m", module, *args]
            quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
            self._popen = subprocess.Popen(cmd, cwd=cwd, env=full_env, start_new_session=True, **quiet)
            self.pid = self._popen.pid
            return
        self._popen = None
        paths = (os.devnull, os.devnull)
        self._child = _SERVER.Process(target=_run_as_main, args=(module, args, str(cwd), full_env, paths, True))
        self._child.start()
        self.pid = self._child.pid

    def poll(self) -> int | None:
        return self._popen.poll() if self._popen else self._child.exitcode

    def wait(self, timeout: float | None = None) -> int | None:
        if self._popen:
            return self._popen.wait(timeout)
        self._child.join(timeout)
        return self._child.exitcode


def start_module(module: str, *args: str, cwd: Path | str, env: dict | None = None, fresh: bool = False) -> Started:
    """`python -m MODULE ARGS` started in its own session and left running (for the tests that kill it)."""
    return Started(module, list(args), cwd, env, fresh)


def _run_as_main(
    module: str, args: list[str], cwd: str, env: dict, paths: tuple[str, str], new_session: bool = False
) -> None:
    """In the forked child: become `python -m MODULE ARGS` and exit as that interpreter would."""
    import atexit
    import logging
    import multiprocessing.util
    import runpy
    import threading
    import traceback
    import weakref

    if new_session:
        os.setsid()
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in zip((1, 2), paths, strict=True):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", closefd=False)  # noqa: SIM115
    # What the server made while importing (wandb's media temp folder, ...) is the server's: a fresh interpreter
    # would have made its own, so this child's exit must not clean it up for the children after it. Its exit runs
    # only what it registers itself, plus the interpreter's own handlers (logging, multiprocessing, finalizers).
    atexit._clear()
    for made_by_server in list(weakref.finalize._registry):
        made_by_server.atexit = False
    for handler in (logging.shutdown, multiprocessing.util._exit_function, weakref.finalize._exitfunc):
        atexit.register(handler)
    if "numpy" in sys.modules:  # a fresh interpreter seeds numpy's global generator from the OS (random reseeds
        sys.modules["numpy"].random.seed()  # itself after a fork)
    sys.argv = [module, *args]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:  # what the interpreter does with it: an int is the code, anything else is printed
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - an uncaught exception: traceback on stderr, exit 1
        traceback.print_exc()
        code = 1
    threading._shutdown()  # the interpreter's exit: wait for non-daemon threads, then the atexit handlers
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
