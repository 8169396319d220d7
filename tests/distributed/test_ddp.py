import csv

import pytest
import torch
from helpers import run_train

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _val_losses(run):
    rows = csv.DictReader((run / "logs" / "version_0" / "metrics.csv").read_text().splitlines())
    return {int(r["step"]): float(r["val/loss"]) for r in rows if r.get("val/loss")}


def test_two_process_ddp_fit_on_gloo(tmp_path, dataset, val_dataset):
    run = tmp_path / "run"
    validation = [f"data.val_shards={val_dataset}", "callbacks.validation.every_n_steps=2"]
    result = run_train(
        run,
        f"data.shards={dataset}",
        *validation,
        "strategy=ddp",
        "trainer.devices=2",
        "trainer.max_steps=4",
        "callbacks.samples.every_n_steps=2",
        "callbacks.sampling.steps=2",
        "data.num_workers=1",
        "trainer.enable_progress_bar=false",
        timeout=300,
        fresh=True,  # Lightning's own launcher starts rank 1, as for `sdtrain-train trainer.devices=2` on one machine
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4
    assert (run / "train_ddp_process_1.log").exists()  # the second rank ran as its own process
    assert (run / "samples" / "step_000002.png").exists() and (run / "samples" / "step_000004.png").exists()
    # Validation on 2 ranks (each its share of the 40 held-out samples, summed) equals 1 process: same initial
    # weights, same samples, timesteps and noise; only the reduction order differs.
    single = tmp_path / "single"
    one = run_train(single, f"data.shards={dataset}", *validation, "debug=fast", "trainer.max_steps=1")
    assert one.returncode == 0, one.stderr[-3000:]
    two_ranks, one_rank = _val_losses(run), _val_losses(single)
    assert sorted(two_ranks) == [0, 2, 4]
    assert abs(two_ranks[0] - one_rank[0]) < 1e-6 * one_rank[0], (two_ranks, one_rank)
