"""On a CUDA GPU (skipped elsewhere; `pytest -m gpu` there): the real CLI trains in bf16 on the device."""

import pytest
from helpers import run_train

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_bf16_training_on_the_gpu_writes_a_checkpoint(tmp_path, dataset):
    run = tmp_path / "run"
    result = run_train(run, f"data.shards={dataset}", "trainer=gpu", "trainer.devices=1", "debug=fast")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "checkpoints" / "last.ckpt").is_file()
