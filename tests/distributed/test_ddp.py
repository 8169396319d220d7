import pytest
import torch
from helpers import run_train

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_two_process_ddp_fit_on_gloo(tmp_path, dataset):
    run = tmp_path / "run"
    result = run_train(
        run,
        f"data.shards={dataset}",
        "strategy=ddp",
        "trainer.devices=2",
        "trainer.max_steps=4",
        "callbacks.samples.every_n_steps=2",
        "callbacks.sampling.steps=2",
        "data.num_workers=1",
        "trainer.enable_progress_bar=false",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4
    assert (run / "train_ddp_process_1.log").exists()  # the second rank ran as its own process
    assert (run / "samples" / "step_000002.png").exists() and (run / "samples" / "step_000004.png").exists()
