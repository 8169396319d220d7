"""A command for tests/unit/test_cli_runner.py: `python -m cli_probe CASE [ARG]` does one thing a CLI can do."""

import atexit
import os
import sys
import time


def main(case: str, arg: str = "") -> None:
    if case == "show":  # where it runs, what it was given
        print(f"cwd={os.getcwd()} env={os.environ.get(arg)} argv={sys.argv[1:]} main={__name__}")
    elif case == "exit":
        sys.exit(int(arg))
    elif case == "fail":
        sys.exit(f"error: {arg}")
    elif case == "raise":
        raise RuntimeError(arg)
    elif case == "atexit":
        atexit.register(print, "at exit", flush=True)
    elif case == "rank":  # rank ARG fails with exit code 3, the others then wait (as at a collective); ARG "-": none
        rank = os.environ["RANK"]
        print(f"rank {rank} of {os.environ['WORLD_SIZE']} at {os.environ['MASTER_ADDR']}", flush=True)
        if rank == arg:
            sys.exit(3)
        if arg != "-":
            time.sleep(600)
    elif case == "sleep":
        time.sleep(float(arg))


if __name__ == "__main__":
    main(*sys.argv[1:3])  # ranks > 0 also get the Hydra overrides cli_runner adds for them
