"""torch.compile'd U-Net in the real training step: within float rounding of eager over a few steps, and a resumed
compiled run continues bit for bit. compile_mode=reduce-overhead is the mode under test: on a GPU it adds CUDA
graphs (tests/gpu/test_gpu_hot_path.py); on the CPU torch builds none, so this holds the rest of that path
(static shapes, cudagraph_mark_step_begin in the step, inductor kernels for forward and backward)."""

import lightning as L
import pytest
import torch
from test_step_reference import _batches, tiny_module
from torch.utils.data import DataLoader

from sdtrain.diffusion.objective import DiffusionConfig
from sdtrain.models.unet_runtime import UNetRuntimeConfig, apply_runtime
from sdtrain.training.optim import OptimConfig

pytestmark = pytest.mark.slow
TOLERANCE = dict(rtol=1e-4, atol=1e-5)  # losses, fp32: inductor fuses and reorders reductions, nothing else differs
RELATIVE_WEIGHT_TOLERANCE = 1e-2  # after 4 AdamW steps at lr 1e-3 (see below)


class Record(L.Callback):
    def __init__(self, save_at=None, path=None):
        self.losses, self.save_at, self.path = [], save_at, path

    def on_train_batch_end(self, trainer, pl_module, outputs, *args):
        self.losses.append(outputs["loss"].detach().clone())
        if trainer.global_step == self.save_at:
            trainer.save_checkpoint(self.path)


def _fit(batches, compiled, record, max_steps, ckpt_path=None):
    module = tiny_module(DiffusionConfig(), OptimConfig(lr=1e-3, warmup_steps=1))
    if compiled:
        apply_runtime(module.unet, UNetRuntimeConfig(compile=True, compile_mode="reduce-overhead"))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
    )
    trainer.fit(module, DataLoader(batches, batch_size=None), ckpt_path=ckpt_path)
    return {k: v.detach().clone() for k, v in module.unet.state_dict().items()}


def _global_norm(tensors: dict[str, torch.Tensor]) -> float:
    return torch.cat([t.flatten() for t in tensors.values()]).norm().item()


def test_compiled_unet_matches_eager_and_resumes_bitwise(tmp_path):
    batches = _batches(4)
    eager = Record()
    eager_weights = _fit(batches, False, eager, 4)
    compiled = Record(save_at=2, path=tmp_path / "step2.ckpt")
    compiled_weights = _fit(batches, True, compiled, 4)
    assert torch.allclose(torch.stack(eager.losses), torch.stack(compiled.losses), **TOLERANCE)
    # AdamW's first steps move a weight by ~lr whatever its gradient's size, so float rounding can flip the sign of
    # a near-zero gradient and move that one weight 2*lr the other way (1.3e-4 seen on one CPU, 4.4e-5 on another):
    # compare the runs as a whole, the distance between them against the distance both travelled
    init = tiny_module(DiffusionConfig(), OptimConfig()).unet.state_dict()
    moved = min((v - init[n]).abs().max().item() for n, v in eager_weights.items())
    travelled = _global_norm({n: v - init[n] for n, v in eager_weights.items()})
    apart = _global_norm({n: v - compiled_weights[n] for n, v in eager_weights.items()})
    assert moved > 1e-3 and apart < RELATIVE_WEIGHT_TOLERANCE * travelled, (moved, apart / travelled)
    resumed = Record()
    resumed_weights = _fit(batches[2:], True, resumed, 4, ckpt_path=tmp_path / "step2.ckpt")
    assert torch.equal(torch.stack(resumed.losses), torch.stack(compiled.losses[2:]))
    assert all(torch.equal(resumed_weights[k], v) for k, v in compiled_weights.items())
