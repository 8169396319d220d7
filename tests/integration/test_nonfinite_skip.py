"""A NaN loss skips its step (counted) without touching the weights; training goes on."""

import lightning as L
import pytest
import torch
from test_step_reference import _batches, tiny_module
from torch.utils.data import DataLoader

from sdtrain.diffusion.objective import DiffusionConfig
from sdtrain.training.optim import OptimConfig

pytestmark = pytest.mark.slow


class Recorder(L.Callback):
    def __init__(self):
        self.weights = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.weights.append(pl_module.unet.conv_in.weight.detach().clone())


def test_nan_batch_is_skipped_and_counted():
    batches = _batches(4)
    batches[1]["latents"][0, 0, 0, 0] = float("nan")
    module = tiny_module(DiffusionConfig(), OptimConfig(lr=1e-3, warmup_steps=0))
    recorder = Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    trainer.fit(module, DataLoader(batches, batch_size=None))
    assert module.nonfinite_skips == 1
    assert torch.equal(recorder.weights[0], recorder.weights[1])  # the NaN step changed nothing
    assert not torch.equal(recorder.weights[1], recorder.weights[2])  # and training went on
    assert all(torch.isfinite(w).all() for w in recorder.weights)


DEEPSPEED_NAN = """
import sys
sys.path.insert(0, "tests/integration")
import lightning as L
from test_step_reference import _batches, tiny_module
from torch.utils.data import DataLoader
from sdtrain.diffusion.objective import DiffusionConfig
from sdtrain.errors import SdtrainError
from sdtrain.launch.zero import ZeroConfig, build_zero_strategy
from sdtrain.training.optim import OptimConfig

batches = _batches(4)
batches[1]["latents"][0, 0, 0, 0] = float("nan")
module = tiny_module(DiffusionConfig(), OptimConfig(lr=1e-3, warmup_steps=0))
strategy = build_zero_strategy(ZeroConfig(stage=2), {"accelerator": "cpu"}, micro_batch_size=2)
trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=4, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
try:
    trainer.fit(module, DataLoader(batches, batch_size=None))
except SdtrainError as exc:
    print("STOPPED:", exc, "after", trainer.global_step)
"""


def test_nan_under_deepspeed_stops_with_one_line():
    """DeepSpeed steps once the loss is returned, so a skip is impossible: the run stops, saying so."""
    import subprocess
    import sys

    from helpers import REPO

    done = subprocess.run([sys.executable, "-c", DEEPSPEED_NAN], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "STOPPED: non-finite loss (nan) at step 1 on some rank: DeepSpeed cannot skip" in done.stdout, done.stdout
    assert "after 1" in done.stdout
