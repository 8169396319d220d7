"""On a CUDA GPU (skipped elsewhere; bench/gpu_check.sh runs them): the hot path as a GPU sees it.

- between logging steps the training step makes no synchronizing CUDA call (torch's sync debug mode raises on one);
- the optimizer is the fused AdamW and a NaN step is skipped on the device;
- the compiled U-Net (default and reduce-overhead, i.e. CUDA graphs) trains to the eager losses within bf16
  tolerance.
"""

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_step_reference import _batches, tiny_module  # noqa: E402

from sdtrain.diffusion.objective import DiffusionConfig  # noqa: E402
from sdtrain.models.unet_runtime import UNetRuntimeConfig, apply_runtime  # noqa: E402
from sdtrain.training.log_steps import logs_this_step  # noqa: E402
from sdtrain.training.optim import OptimConfig  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


class SyncGuard(L.Callback):
    """Sync debug mode "error" from the start of a quiet step's batch to its end (logging steps may sync)."""

    def __init__(self) -> None:
        self.guarded = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step > 0 and not logs_this_step(trainer):
            torch.cuda.set_sync_debug_mode("error")
            self.guarded += 1

    def on_train_batch_end(self, trainer, pl_module, *args):
        torch.cuda.set_sync_debug_mode("default")


class Losses(L.Callback):
    def __init__(self) -> None:
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, *args):
        self.losses.append(outputs["loss"].detach())


def _fit(batches, callbacks, runtime: UNetRuntimeConfig | None = None, steps: int = 8):
    module = tiny_module(DiffusionConfig(), OptimConfig(lr=1e-3, warmup_steps=2))
    if runtime is not None:
        apply_runtime(module.unet, runtime)
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=steps,
        log_every_n_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, DataLoader(batches, batch_size=None, pin_memory=True))
    return module, trainer


def test_no_synchronizing_call_between_logging_steps():
    batches = _batches(8)
    batches[2]["latents"][0, 0, 0, 0] = float("nan")  # the NaN policy runs without a sync too
    guard = SyncGuard()
    module, trainer = _fit(batches, [guard])
    assert guard.guarded >= 4
    assert trainer.optimizers[0].defaults["fused"] and module.nonfinite.on_device
    assert module.nonfinite_skips == 1


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_unet_trains_like_eager(mode):
    batches = _batches(6)
    eager = Losses()
    _fit(batches, [eager], steps=6)
    compiled = Losses()
    _fit(batches, [compiled], UNetRuntimeConfig(compile=True, compile_mode=mode), steps=6)
    a, b = torch.stack(eager.losses).float().cpu(), torch.stack(compiled.losses).float().cpu()
    assert torch.allclose(a, b, rtol=3e-2, atol=3e-3), (a, b)  # bf16: kernels differ in rounding only
