"""sdtrain-slurm renders a script whose srun line gives every task exactly the overrides the user typed."""

import subprocess

import pytest

from sdtrain.errors import ConfigError
from sdtrain.launch.slurm import SlurmJob, main, render

ODD = [
    "data.shards=/data/with space/manifest.json",
    "callbacks.sampling.prompts=[\"a cat's hat\",'$HOME and `uname`']",
    'callbacks.sampling.negative_prompt="blurry; rm -rf / \\"quoted\\""',
    "optim.lr=1e-4",
]


def _srun_args(script: str) -> list[str]:
    line = next(x for x in script.splitlines() if x.startswith("srun "))
    printer = line.replace("srun --kill-on-bad-exit=1 ", "printf '%s\\0' ", 1)
    out = subprocess.run(["bash", "-c", printer], capture_output=True, check=True).stdout
    return out.decode().split("\0")[:-1]


def test_odd_overrides_reach_the_tasks_unchanged():
    job = SlurmJob(run_dir="/runs/a", nodes=2, gpus_per_node=8, overrides=ODD, python="/venv/bin/python")
    args = _srun_args(render(job))
    assert args[:3] == ["/venv/bin/python", "-m", "sdtrain.train"]
    assert args[-len(ODD) :] == ODD
    assert {
        "strategy=ddp",
        "trainer=gpu",
        "trainer.num_nodes=2",
        "trainer.devices=8",
        "resume=auto",
        "hydra.run.dir=/runs/a",
    } <= set(args)


def test_multinode_directives():
    script = render(
        SlurmJob(
            run_dir="/runs/a",
            nodes=4,
            gpus_per_node=8,
            time="2:00:00",
            partition="gpu",
            account="proj",
            signal_seconds=300,
            sbatch_flags=["--qos=high"],
        )
    )
    for directive in (
        "--nodes=4",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--time=2:00:00",
        "--signal=USR1@300",
        "--requeue",
        "--open-mode=append",
        "--partition=gpu",
        "--account=proj",
        "--qos=high",
        "--output=/runs/a/slurm-%x-%j.out",
    ):
        assert f"#SBATCH {directive}" in script
    assert "MASTER_ADDR=$(scontrol show hostnames" in script
    single = render(SlurmJob(run_dir="/runs/a", nodes=1, gpus_per_node=4))
    assert "#SBATCH --nodes=1" in single and "MASTER_ADDR=127.0.0.1" in single and "{{" not in single


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"run_dir": "relative/dir"}, "absolute path"),
        ({"run_dir": "/runs/with space"}, "without spaces"),
        ({"run_dir": "/runs/a", "overrides": ["trainer.devices=3"]}, "set by sdtrain-slurm"),
        ({"run_dir": "/runs/a", "sbatch_flags": ["qos=high"]}, "--name=value"),
    ],
)
def test_bad_launcher_input(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        render(SlurmJob(**kwargs))


def test_dry_run_checks_overrides_against_the_config(capsys):
    assert main(["--run-dir", "/runs/a", "--dry-run", "--", "optim.lr=2e-4"]) == 0
    assert "optim.lr=2e-4" in capsys.readouterr().out
    assert main(["--run-dir", "/runs/a", "--dry-run", "--", "optim.lrr=2e-4"]) == 2
    assert "error: Could not override 'optim.lrr'" in capsys.readouterr().err
