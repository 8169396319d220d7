"""Against a real SLURM cluster (slurm/local_cluster.sh: 2 emulated nodes on this machine), as users run it."""

import glob
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from helpers import REPO, run_train

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
TRAIN = [
    "experiment=tiny",
    "data.num_workers=1",
    "trainer.enable_progress_bar=false",
    "callbacks.sampling.steps=2",
    "callbacks.samples.every_n_steps=0",
    "trainer.log_every_n_steps=10",
]


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("starting the local SLURM cluster needs root")
    started = subprocess.run(["bash", "slurm/local_cluster.sh", "start"], cwd=REPO, capture_output=True, text=True)
    assert started.returncode == 0, started.stdout + started.stderr
    yield
    subprocess.run(["bash", "slurm/local_cluster.sh", "stop"], cwd=REPO, capture_output=True)


def submit(run_dir, *args, env=None):
    cmd = [sys.executable, "-m", "sdtrain.launch.slurm", "--run-dir", str(run_dir), "--cpus-per-task", "1", *args]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr
    return re.search(r"submitted job (\d+)", out.stdout).group(1)


def job_field(job_id, name):
    text = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    match = re.search(rf"\b{name}=(\S+)", text)
    return match.group(1) if match else None


def wait_for(job_id, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_field(job_id, "JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"job {job_id} still {job_field(job_id, 'JobState')} after {timeout}s")


def job_log(run_dir, job_id):
    return (run_dir / f"slurm-sdtrain-{job_id}.out").read_text()


def last_step(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]


def test_two_node_ddp_job(cluster, tmp_path, dataset):
    run = tmp_path / "run"
    job = submit(run, "--nodes", "2", "--time", "5", "--", *TRAIN, f"data.shards={dataset}", "trainer.max_steps=6")
    assert wait_for(job, 300) == "COMPLETED"
    assert job_field(job, "ExitCode") == "0:0"
    log = job_log(run, job)
    # every rank runs on its own (emulated) node and knows its place
    assert re.search(r"SLURM_NODEID=0 SLURM_PROCID=0 SLURM_LOCALID=0", log)
    assert re.search(r"SLURM_NODEID=1 SLURM_PROCID=1 SLURM_LOCALID=0", log)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log and "distributed_backend=gloo" in log
    assert last_step(run) == 6
    assert (run / "samples" / "step_000006.png").exists()


def test_two_node_zero3_job_resumes(cluster, tmp_path, dataset):
    """DeepSpeed ZeRO-3 across 2 (emulated) nodes: each node's rank writes its shard of the checkpoint directory,
    and a second job continues from it."""
    from sdtrain.checkpoint.files import load_checkpoint_meta

    run = tmp_path / "run"
    train = [*TRAIN, f"data.shards={dataset}", "strategy=deepspeed_zero3", "data.num_workers=0"]
    job = submit(run, "--nodes", "2", "--time", "5", "--", *train, "trainer.max_steps=4")
    assert wait_for(job, 300) == "COMPLETED", job_log(run, job)[-3000:]
    log = job_log(run, job)
    assert "initializing deepspeed distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in log
    last = run / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in (last / "checkpoint").glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    job = submit(run, "--nodes", "2", "--time", "5", "--", *train, "trainer.max_steps=6")  # resume=auto
    assert wait_for(job, 300) == "COMPLETED", job_log(run, job)[-3000:]
    assert "(global step 4)" in job_log(run, job)
    assert load_checkpoint_meta(str(last))["global_step"] == 6


def test_warning_signal_saves_requeues_and_finishes(cluster, tmp_path, dataset):
    """SLURM's warning signal mid-run: save, requeue, resume, finish the planned steps exactly, same W&B run.

    The test sends the signal itself (`scancel --signal=USR1`, what `sbatch --signal=USR1@N` sends at the time
    limit) once the run has passed step 5, instead of waiting for SLURM's time-limit tick: that tick lands 0-30 s
    after a start-up whose length depends on the machine's load, so a 1-minute-limit job could make 1 step a
    cycle on a busy machine and never finish. Here only the deadlines depend on speed, not the outcome.
    """
    run = tmp_path / "run"
    steps = 20
    job = submit(
        run,
        "--nodes",
        "2",
        "--time",
        "10",
        "--signal-seconds",
        "30",
        "--",
        *TRAIN,
        f"data.shards={dataset}",
        f"trainer.max_steps={steps}",
        "callbacks.checkpoint.every_n_steps=5",
        "logger=wandb",
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    deadline = time.time() + 300
    while last_ckpt_missing(run) or last_step(run) < 5:
        assert time.time() < deadline and job_field(job, "JobState") in ("PENDING", "RUNNING", "CONFIGURING")
        time.sleep(1)
    assert last_step(run) < steps  # still training when the warning comes
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    assert wait_for(job, 600) == "COMPLETED", job_log(run, job)[-3000:]
    log = job_log(run, job)
    assert int(job_field(job, "Restarts")) >= 1
    assert "SIGUSR1 received: saved" in log and f"requeued SLURM job {job}" in log
    noise = ("Error executing job", "killed by signal", "Connection lost", "Traceback")
    assert not [n for n in noise if n in log], log[-3000:]  # the requeued tasks exited quietly
    assert re.search(r"resume=auto: continuing from .*last.ckpt \(global step \d+\)", log)
    assert last_step(run) == steps
    run_id = (run / "wandb_run_id.txt").read_text().strip()
    runs = glob.glob(str(run / "wandb" / "offline-run-*"))
    assert len(runs) >= 2 and all(r.endswith(f"-{run_id}") for r in runs)  # one W&B run, resumed


def test_scancel_leaves_the_last_checkpoint_loadable(cluster, tmp_path, dataset):
    run = tmp_path / "run"
    job = submit(
        run,
        "--nodes",
        "2",
        "--time",
        "10",
        "--",
        *TRAIN,
        f"data.shards={dataset}",
        "trainer.max_steps=5000",
        "callbacks.checkpoint.every_n_steps=5",
    )
    deadline = time.time() + 240
    while last_ckpt_missing(run) or last_step(run) < 15:
        assert time.time() < deadline and job_field(job, "JobState") in ("PENDING", "RUNNING", "CONFIGURING")
        time.sleep(0.5)
    subprocess.run(["scancel", job], check=True)
    assert wait_for(job, 120) == "CANCELLED"
    step = last_step(run)  # loads (weights_only) after the kill
    # resumed outside SLURM on one process: an elastic resume, the 2 nodes' global batch of 16 kept
    overrides = [f"data.shards={dataset}", f"trainer.max_steps={step + 3}", "resume=auto", "data.batch_size=16"]
    resumed = run_train(run, *overrides, *TRAIN[1:])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "on 1 rank(s) x 1 worker(s) instead of 2 x 1" in resumed.stdout + resumed.stderr
    assert last_step(run) == step + 3


def last_ckpt_missing(run):
    return not (run / "checkpoints" / "last.ckpt").exists()


def test_submitit_sweep_runs_one_job_per_point(cluster, tmp_path, dataset):
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "sdtrain.train",
        "-m",
        "hydra/launcher=sdtrain_slurm",
        *TRAIN,
        f"data.shards={dataset}",
        "trainer.max_steps=3",
        "optim.lr=1e-4,2e-4",
        "callbacks.samples.at_end=false",
        f"hydra.sweep.dir={sweep}",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=5",
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    for point, lr in ((0, "0.0001"), (1, "0.0002")):
        assert last_step(sweep / str(point)) == 3
        assert f"lr: {lr}" in (sweep / str(point) / ".hydra" / "config.yaml").read_text()
