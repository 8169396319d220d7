"""On a CUDA GPU (skipped elsewhere; `pytest -m gpu` there): the real CLI trains in bf16 on the device."""

import pytest
from helpers import run_train

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_bf16_training_on_the_gpu_writes_a_checkpoint(tmp_path, dataset):
    run = tmp_path / "run"
    result = run_train(run, f"data.shards={dataset}", "trainer=gpu", "trainer.devices=1", "debug=fast")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_bf16_resume_on_the_gpu_is_bitwise_with_deterministic_kernels(tmp_path, dataset):
    """cuDNN's autotuned (benchmark) and atomics-based kernels are not run-to-run deterministic, so bitwise resume
    on a GPU asks for trainer.deterministic=true (Lightning's torch.use_deterministic_algorithms)."""
    import torch

    common = [
        f"data.shards={dataset}",
        "trainer=gpu",
        "trainer.devices=1",
        "trainer.deterministic=true",
        "trainer.benchmark=false",
        "callbacks.checkpoint.every_n_steps=4",
        "callbacks.samples.every_n_steps=0",
        "callbacks.samples.at_end=false",
        "trainer.enable_progress_bar=false",
    ]
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # what deterministic cuBLAS needs
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_train(straight, "trainer.max_steps=8", *common, env=env).returncode == 0
    assert run_train(split, "trainer.max_steps=4", *common, env=env).returncode == 0
    resumed = run_train(split, "trainer.max_steps=8", "resume=auto", *common, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(split / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name
