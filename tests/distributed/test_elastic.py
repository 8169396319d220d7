"""Elastic resume through sdtrain-train: a 2-process DDP checkpoint resumed on 1 process with the per-rank batch
doubled (global batch kept) finishes the epoch with the samples it still owed; a resume that would change the
global batch stops with one line naming the batch size that keeps it. The sample-level proof (no repeats, none
lost beyond the new plan's tail, exact resume inside the transition epoch) is tests/unit/test_elastic_resume.py.
"""

import shutil

import pytest
import torch
from helpers import run_train

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
COMMON = [
    "trainer.max_steps=6",
    "trainer.enable_progress_bar=false",
    "callbacks.checkpoint.every_n_steps=3",
    "callbacks.checkpoint.keep_last=-1",
    "callbacks.samples.every_n_steps=0",
    "callbacks.samples.at_end=false",
    "data.num_workers=2",
]


def test_two_ranks_resumed_on_one_keep_the_epoch_and_the_global_batch(tmp_path, dataset):
    first = tmp_path / "ddp"
    result = run_train(
        first,
        f"data.shards={dataset}",
        "strategy=ddp",
        "trainer.devices=2",
        "data.batch_size=4",
        *COMMON,
        "trainer.max_steps=3",
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    second = tmp_path / "one"
    (second / "checkpoints").mkdir(parents=True)
    shutil.copy2(first / "checkpoints" / "step_000003.ckpt", second / "checkpoints")

    wrong = run_train(second, f"data.shards={dataset}", "data.batch_size=4", *COMMON, "resume=auto", timeout=400)
    assert wrong.returncode != 0
    last = wrong.stderr.strip().splitlines()[-1]
    assert "global batch 8) on 1 x 4 x 1 = 4: set data.batch_size=8" in last, wrong.stderr[-2000:]

    resumed = run_train(second, f"data.shards={dataset}", "data.batch_size=8", *COMMON, "resume=auto", timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    # 64 samples; each old rank took 3 batches of 4: 40 are owed, 2 batches per worker of the new rank
    assert "on 1 rank(s) x 2 worker(s) instead of 2 x 2: epoch 0 goes on with the 40 samples it still owed" in log
    final = torch.load(second / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == 6
    state = final["LatentDataModule"]
    assert state["layout"]["world_size"] == 1 and state["transition"]["epoch"] == 0
    assert state["ranks"][0]["batches"] == 6
