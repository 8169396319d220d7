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
