"""A NaN loss skips its step (counted) without touching the weights; training goes on. The on-device skip (fused
AdamW's found_inf, no host sync) ends exactly where the host skip (.item() + return None) does."""

import os

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_step_reference import _batches, tiny_module
from torch.utils.data import DataLoader

from sdtrain.diffusion.objective import DiffusionConfig
from sdtrain.errors import SdtrainError
from sdtrain.training.callbacks.ema import EMACallback, EMAConfig
from sdtrain.training.nonfinite import NonfiniteGuard
from sdtrain.training.optim import OptimConfig

pytestmark = pytest.mark.slow


class Recorder(L.Callback):
    def __init__(self):
        self.weights = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.weights.append(pl_module.unet.conv_in.weight.detach().clone())


def _cpu_trainer(max_steps: int, callbacks: list, **kwargs) -> L.Trainer:
    """A quiet one-process CPU trainer (no logger, checkpoints, bar or summary)."""
    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )


def test_nan_batch_is_skipped_and_counted():
    batches = _batches(4)
    batches[1]["latents"][0, 0, 0, 0] = float("nan")
    module = tiny_module(DiffusionConfig(), OptimConfig(lr=1e-3, warmup_steps=0))
    recorder = Recorder()
    trainer = _cpu_trainer(4, [recorder])
    trainer.fit(module, DataLoader(batches, batch_size=None))
    assert module.nonfinite_skips == 1
    assert torch.equal(recorder.weights[0], recorder.weights[1])  # the NaN step changed nothing
    assert not torch.equal(recorder.weights[1], recorder.weights[2])  # and training went on
    assert all(torch.isfinite(w).all() for w in recorder.weights)


def _fit_with_a_nan_step(on_device: bool, monkeypatch):
    choose = NonfiniteGuard.choose

    def forced(self, trainer):
        choose(self, trainer)
        assert self.on_device  # fused AdamW on CPU: the device way applies ...
        self.on_device = on_device  # ... and the host way is forced for the reference run

    monkeypatch.setattr(NonfiniteGuard, "choose", forced)
    batches = _batches(5)
    batches[1]["latents"][0, 0, 0, 0] = float("nan")
    module = tiny_module(DiffusionConfig(), OptimConfig(lr=1e-3, warmup_steps=3, schedule="cosine"))
    ema = EMACallback(EMAConfig(decay=0.5, warmup=0))
    trainer = _cpu_trainer(5, [ema], gradient_clip_val=1.0)
    trainer.fit(module, DataLoader(batches, batch_size=None))
    optimizer = trainer.optimizers[0]
    return {
        "weights": {k: v.clone() for k, v in module.unet.state_dict().items()},
        "moments": [(s["step"].clone(), s["exp_avg"].clone()) for s in optimizer.state.values()],
        "ema": [t.clone() for t in ema.ema.shadow],
        "counts": (
            trainer.global_step,
            trainer.lr_scheduler_configs[0].scheduler.last_epoch,
            ema.ema.num_updates,
            module.nonfinite_skips,
        ),
    }


def test_device_skip_ends_where_the_host_skip_does(monkeypatch):
    device, host = _fit_with_a_nan_step(True, monkeypatch), _fit_with_a_nan_step(False, monkeypatch)
    assert device["counts"] == host["counts"] == (5, 5, 5, 1)  # global step, LR schedule, EMA advance; 1 skip
    assert all(torch.equal(device["weights"][k], v) for k, v in host["weights"].items())
    assert all(int(step) == 4 for step, _ in host["moments"])  # AdamW's own step count skipped the bad one
    for (s1, m1), (s2, m2) in zip(device["moments"], host["moments"], strict=True):
        assert torch.equal(s1, s2) and torch.equal(m1, m2)
    assert all(torch.equal(a, b) for a, b in zip(device["ema"], host["ema"], strict=True))


def test_device_skips_are_read_at_check_points_and_capped():
    guard = NonfiniteGuard(OptimConfig(max_nonfinite_skips=2))
    guard.on_device = True
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], fused=True)
    for norm in (1.0, float("nan"), float("inf"), 2.0):
        guard.gate(optimizer, torch.tensor(norm))
    assert guard.skips == 0 and guard.check(step=4) == 2  # counted on the device, read at the check
    guard.gate(optimizer, torch.tensor(float("nan")))
    with pytest.raises(SdtrainError, match="3 in all > optim.max_nonfinite_skips=2"):
        guard.check(step=5)


def _ddp_rank(rank: int, port: str, out: dict) -> None:
    """Rank 1 alone sees a NaN loss; DDP's gradient all-reduce must make both ranks skip, with no other collective."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    guard = NonfiniteGuard(OptimConfig())
    guard.on_device = True
    before = [p.detach().clone() for p in model.parameters()]
    changed = []
    for step in range(2):
        x = torch.randn(2, 4)
        if step == 0 and rank == 1:
            x[0, 0] = float("nan")
        loss = model(x).square().mean()
        guard.poison(loss).backward()
        guard.gate(optimizer, torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        changed.append(any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True)))
    out[rank] = (changed, guard.check(step=2))
    dist.destroy_process_group()


def test_a_nan_on_one_rank_skips_the_step_on_every_rank():
    from helpers import free_port

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_rank, args=(str(free_port()), out), nprocs=2)
        assert dict(out) == {0: ([False, True], 1), 1: ([False, True], 1)}


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
