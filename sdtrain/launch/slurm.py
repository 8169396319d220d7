"""`sdtrain-slurm`: render an sbatch script for a training run and submit it (or print it with --dry-run).

    sdtrain-slurm --nodes 2 --gpus-per-node 8 --time 24:00:00 --run-dir /runs/sd2 -- model=sd2 data.shards=...

The overrides are checked by composing the real Hydra config before anything is queued, then passed to every
task quoted for the shell (spaces, quotes and `$` arrive unchanged). The script always runs with `resume=auto`
and a fixed `hydra.run.dir`, so a requeued job continues where the previous one stopped.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sdtrain.errors import ConfigError, SdtrainError

SLURM_DIR = Path(__file__).resolve().parents[2] / "slurm"
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
# Overrides the launcher owns: they must match the allocation.
OWNED = ("trainer.num_nodes", "trainer.devices", "hydra.run.dir", "resume")


@dataclass(kw_only=True, slots=True)
class SlurmJob:
    run_dir: str
    nodes: int = 1
    gpus_per_node: int = 0
    """0 = CPU-only nodes (gloo); tasks_per_node then defaults to 1."""
    tasks_per_node: int | None = None
    cpus_per_task: int = 8
    time: str = "24:00:00"
    signal_seconds: int = 120
    job_name: str = "sdtrain"
    partition: str | None = None
    account: str | None = None
    sbatch_flags: list[str] = field(default_factory=list)
    """Extra `#SBATCH` flags, e.g. --qos=high --constraint=h100."""
    overrides: list[str] = field(default_factory=list)
    python: str = sys.executable
    workdir: str = str(SLURM_DIR.parent)

    def __post_init__(self) -> None:
        if not os.path.isabs(self.run_dir) or re.search(r"[\s%'\"$]", self.run_dir):
            raise ConfigError(f"--run-dir must be an absolute path without spaces, quotes, % or $: {self.run_dir!r}")
        if self.nodes < 1 or self.cpus_per_task < 1 or self.signal_seconds < 1:
            raise ConfigError("--nodes, --cpus-per-task and --signal-seconds must be >= 1")
        owned = [o for o in self.overrides if o.split("=", 1)[0].lstrip("+~") in OWNED]
        if owned:
            raise ConfigError(f"{owned[0]!r} is set by sdtrain-slurm from the allocation; drop it")

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)

    def train_args(self) -> list[str]:
        accelerator = ["trainer=gpu"] if self.gpus_per_node else ["trainer.accelerator=cpu"]
        return [
            *accelerator,
            "strategy=ddp",
            f"trainer.num_nodes={self.nodes}",
            f"trainer.devices={self.tasks}",
            f"hydra.run.dir={self.run_dir}",
            "resume=auto",
            *self.overrides,
        ]


def sbatch_lines(job: SlurmJob) -> str:
    lines = [f"#SBATCH --gpus-per-node={job.gpus_per_node}"] if job.gpus_per_node else []
    lines += [f"#SBATCH --partition={job.partition}"] if job.partition else []
    lines += [f"#SBATCH --account={job.account}"] if job.account else []
    for flag in job.sbatch_flags:
        if "\n" in flag or not flag.startswith("-"):
            raise ConfigError(f"--sbatch flags look like --name=value, got {flag!r}")
        lines.append(f"#SBATCH {flag}")
    return "\n".join(lines)


def render(job: SlurmJob) -> str:
    template = "multinode.sbatch.tmpl" if job.nodes > 1 else "single_node.sbatch.tmpl"
    text = (SLURM_DIR / template).read_text(encoding="utf-8")
    command = shlex.join([job.python, "-m", "sdtrain.train", *job.train_args()])
    values = {
        "job_name": re.sub(r"[^\w.-]", "_", job.job_name),
        "nodes": str(job.nodes),
        "tasks_per_node": str(job.tasks),
        "cpus_per_task": str(job.cpus_per_task),
        "time": job.time,
        "signal_seconds": str(job.signal_seconds),
        "run_dir": job.run_dir,
        "sbatch_lines": sbatch_lines(job),
        "workdir": shlex.quote(job.workdir),
        "command": command,
    }
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def check_overrides(overrides: list[str]) -> None:
    """Compose the real config with the user's overrides: a typo fails here, not after hours in the queue."""
    from sdtrain.config import config_error_line
    from sdtrain.launch.config import CONFIG_ERRORS, compose_config, quote_brace_patterns

    try:
        compose_config(quote_brace_patterns(list(overrides)))
    except CONFIG_ERRORS as exc:
        raise ConfigError(config_error_line(exc)) from None


def submit(job: SlurmJob, script: str) -> str:
    folder = os.path.join(job.run_dir, "sbatch")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{job.job_name}-{len(os.listdir(folder)):03d}.sbatch")
    with open(path, "w", encoding="utf-8") as f:
        f.write(script)
    result = subprocess.run(["sbatch", "--parsable", path], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SdtrainError(f"sbatch {path} failed: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


def parse_args(argv: list[str] | None) -> tuple[SlurmJob, bool]:
    parser = argparse.ArgumentParser(
        prog="sdtrain-slurm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", required=True, help="absolute run folder (checkpoints, logs, slurm-*.out)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=0, help="0 for CPU nodes")
    parser.add_argument("--tasks-per-node", type=int, default=None, help="default: one per GPU (1 on CPU)")
    parser.add_argument("--cpus-per-task", type=int, default=8)
    parser.add_argument("--time", default="24:00:00")
    parser.add_argument("--signal-seconds", type=int, default=120, help="warning signal before the time limit")
    parser.add_argument("--job-name", default="sdtrain")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--sbatch", action="append", default=[], metavar="FLAG", help="extra #SBATCH flag")
    parser.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    parser.add_argument("overrides", nargs="*", help="training overrides (after --)")
    args = parser.parse_args(argv)
    job = SlurmJob(
        run_dir=args.run_dir,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task,
        time=args.time,
        signal_seconds=args.signal_seconds,
        job_name=args.job_name,
        partition=args.partition,
        account=args.account,
        sbatch_flags=args.sbatch,
        overrides=args.overrides,
    )
    return job, args.dry_run


def log_placement() -> None:
    """Where this process runs: one line per rank, so multi-node logs show every rank's place."""
    keys = ("SLURM_JOB_ID", "SLURM_NODEID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_RESTART_COUNT")
    env = {k: os.environ[k] for k in keys if k in os.environ}
    if env:
        logging.getLogger("sdtrain").info(
            "placement: host=%s %s", socket.gethostname(), " ".join(f"{k}={v}" for k, v in env.items())
        )


def main(argv: list[str] | None = None) -> int:
    try:
        job, dry_run = parse_args(argv)
        check_overrides(job.train_args())
        script = render(job)
        if dry_run:
            print(script, end="")
            return 0
        print(f"submitted job {submit(job, script)} (logs: {job.run_dir}/slurm-{job.job_name}-JOBID.out)")
        return 0
    except SdtrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
