"""A run killed with SIGKILL and resumed equals the uninterrupted run, bit for bit: fp32, bf16-mixed (with gradient
accumulation, so the on-device NaN gate spans micro-batches), and 2 processes under DDP and ZeRO-2 (its sharded
checkpoint directory written and killed like any other). FSDP writes its directory through the same atomic
replace (checkpoint/sharded.py); its resume is tested in tests/distributed/test_strategies.py."""

import os
import random
import shutil
import signal
import time

import pytest
import torch
from cli_runner import start_module
from helpers import REPO, run_train

from sdtrain.checkpoint.files import load_checkpoint_meta, load_full_checkpoint

pytestmark = pytest.mark.slow
STEPS = 12
COMMON = [
    "trainer.enable_progress_bar=false",
    "callbacks.checkpoint.every_n_steps=3",
    "callbacks.checkpoint.keep_last=-1",
    "callbacks.samples.every_n_steps=0",
    "callbacks.samples.at_end=false",
    "data.num_workers=2",
    "data.caption_dropout=0.3",
    "optim.warmup_steps=4",
    "optim.schedule=cosine",
    "callbacks.ema.decay=0.9",
]


def _ckpt(run):
    """last.ckpt as one dict, whether a file or a sharded (ZeRO / FSDP) directory."""
    return load_full_checkpoint(str(run / "checkpoints" / "last.ckpt"))


def _kill_after_first_checkpoint(run, overrides):
    proc = start_module("sdtrain.train", "experiment=tiny", f"hydra.run.dir={run}", *overrides, cwd=REPO)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "last.ckpt").exists():  # written (atomically) right after step_000003
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 0.5))  # a random step after the checkpoint (the run needs > 1 s more)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank/worker, no chance to clean up
    proc.wait()
    return load_checkpoint_meta(str(run / "checkpoints" / "last.ckpt"))["global_step"]


def _assert_identical(a, b):
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name in a["state_dict"]:
        assert torch.equal(a["state_dict"][name], b["state_dict"][name]), name
    ema_a, ema_b = a["callbacks"]["EMACallback"], b["callbacks"]["EMACallback"]
    assert ema_a["num_updates"] == ema_b["num_updates"]
    for name in ema_a["shadow"]:
        assert torch.equal(ema_a["shadow"][name], ema_b["shadow"][name]), f"ema {name}"
    assert a["lr_schedulers"] == b["lr_schedulers"]
    if "optimizer_states" not in a:  # ZeRO / FSDP keep the moments in their shards; the weights above depend on them
        return
    opt_a, opt_b = a["optimizer_states"][0], b["optimizer_states"][0]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for key in opt_a["state"]:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_a["state"][key][field], opt_b["state"][key][field]), (key, field)


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([], id="1-process"),
        pytest.param(
            ["trainer.accumulate_grad_batches=2", "trainer.precision=bf16-mixed"], id="1-process-bf16-accumulate"
        ),
        pytest.param(["strategy=ddp", "trainer.devices=2"], id="2-process-ddp", marks=pytest.mark.distributed),
        pytest.param(
            ["strategy=deepspeed_zero2", "trainer.devices=2"], id="2-process-zero2", marks=pytest.mark.distributed
        ),
    ],
)
def test_sigkill_and_resume_is_bitwise_identical(tmp_path, dataset, extra):
    overrides = [f"data.shards={dataset}", f"trainer.max_steps={STEPS}", *COMMON, *extra]
    straight = run_train(tmp_path / "a", *overrides, timeout=400)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed_at = _kill_after_first_checkpoint(tmp_path / "b", overrides)
    assert 3 <= killed_at < STEPS
    resumed = run_train(tmp_path / "b", *overrides, "resume=auto", timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert f"global step {killed_at}" in log and "Restored all states from the checkpoint" in log
    resumes = f"data stream resumes after {killed_at * _accumulation(extra)} batches of this rank"
    assert f"{resumes}, from each worker's saved position" in log  # flat cost: no replay of the epoch so far
    assert (tmp_path / "b" / "logs" / "version_1").is_dir()  # the resumed run keeps the first run's metrics
    _assert_identical(_ckpt(tmp_path / "a"), _ckpt(tmp_path / "b"))


def _accumulation(extra):
    return next((int(o.split("=")[1]) for o in extra if o.startswith("trainer.accumulate_grad_batches=")), 1)


def test_a_skipped_nonfinite_step_does_not_shift_the_data_position(tmp_path):
    """One sample whose moments are finite but overflow the loss (3e38 in float32) makes step 1 non-finite; it is
    skipped. A run resumed from the step-3 checkpoint must take the batches the uninterrupted run took: same
    weights at step 6, and the skip counted once in each."""
    from helpers import synthetic_samples

    from sdtrain.prep.shard_writer import LatentSample, write_shards

    samples = list(synthetic_samples(48))
    poisoned = samples[5]  # in batch 1 (batch size 4, no shuffling): step 1
    moments = poisoned.array.copy()
    moments[:4] = 3e38  # the posterior mean; the log-variance stays -6
    samples[5] = LatentSample(poisoned.key, moments, poisoned.caption)
    write_shards(samples, str(tmp_path / "data"), samples_per_shard=16, dtype="float32")
    overrides = [
        f"data.shards={tmp_path / 'data' / 'manifest.json'}",
        "data.shuffle=false",
        "data.num_workers=0",
        "data.batch_size=4",
        "trainer.max_steps=6",
        *COMMON[:5],
    ]
    straight = run_train(tmp_path / "a", *overrides, timeout=400)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "1 step(s) with a non-finite loss or gradients skipped" in straight.stdout + straight.stderr
    second = tmp_path / "b"
    (second / "checkpoints").mkdir(parents=True)
    shutil.copy2(tmp_path / "a" / "checkpoints" / "step_000003.ckpt", second / "checkpoints")
    resumed = run_train(second, *overrides, "resume=auto", timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "data stream resumes after 3 batches of this rank, from each worker's saved position" in log
    a, b = _ckpt(tmp_path / "a"), _ckpt(second)
    assert a["global_step"] == b["global_step"] == 6
    for name in a["state_dict"]:
        assert torch.equal(a["state_dict"][name], b["state_dict"][name]), name
