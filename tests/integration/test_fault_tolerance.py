"""Checkpoints survive kills and damage; bad checkpoints, NaN losses and secrets are handled with one clear line."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import REPO, run_train

pytestmark = pytest.mark.slow
QUIET = [
    "trainer.enable_progress_bar=false",
    "callbacks.samples.every_n_steps=0",
    "callbacks.samples.at_end=false",
    "data.num_workers=1",
    "callbacks.checkpoint.every_n_steps=3",
    "callbacks.checkpoint.keep_last=-1",
]

# Runs the real CLI with torch.save patched to die (SIGKILL) half-way through the 3rd checkpoint file it writes:
# step_000003.ckpt and last.ckpt are complete, step_000006.ckpt is half-written when the process dies.
KILL_DURING_SAVE = textwrap.dedent(
    """
    import io, os, signal, sys, torch
    import sdtrain.checkpoint.files as ckpt
    real_save, calls = torch.save, [0]
    def dying_save(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] < 3:
            return real_save(obj, f, *a, **k)
        buf = io.BytesIO(); real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2]); f.flush(); os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    ckpt.torch.save = dying_save
    sys.argv = ["sdtrain.train", *sys.argv[1:]]
    from sdtrain.launch.train import main
    main()
    """
)


def _global_step(path):
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def test_kill_during_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, dataset):
    run = tmp_path / "run"
    script = tmp_path / "kill_during_save.py"
    script.write_text(KILL_DURING_SAVE)
    args = ["experiment=tiny", f"hydra.run.dir={run}", f"data.shards={dataset}", "trainer.max_steps=9", *QUIET]
    killed = subprocess.run([sys.executable, str(script), *args], cwd=REPO, capture_output=True, timeout=300)
    assert killed.returncode == -9
    ckpts = run / "checkpoints"
    assert _global_step(ckpts / "last.ckpt") == 3 and _global_step(ckpts / "step_000003.ckpt") == 3
    assert not (ckpts / "step_000006.ckpt").exists()  # the half file never got its real name
    assert any(".ckpt.tmp-" in name for name in os.listdir(ckpts))
    resumed = run_train(run, f"data.shards={dataset}", "trainer.max_steps=9", "resume=auto", *QUIET)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = resumed.stdout + resumed.stderr
    assert "a checkpoint write that did not finish" in out and "global step 3" in out
    assert _global_step(ckpts / "last.ckpt") == 9
    assert not any(".ckpt.tmp-" in name for name in os.listdir(ckpts))


def test_truncated_checkpoint_is_named_and_resume_auto_falls_back(tmp_path, dataset):
    run = tmp_path / "run"
    assert run_train(run, f"data.shards={dataset}", "trainer.max_steps=6", *QUIET).returncode == 0
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    explicit = run_train(tmp_path / "other", f"data.shards={dataset}", f"resume={last}", *QUIET)
    assert explicit.returncode == 2 and "Traceback" not in explicit.stderr
    assert f"error: checkpoint {last} is unreadable (truncated or not a checkpoint)" in explicit.stderr
    auto = run_train(run, f"data.shards={dataset}", "trainer.max_steps=8", "resume=auto", *QUIET)
    assert auto.returncode == 0, auto.stderr[-3000:]
    out = auto.stdout + auto.stderr
    assert f"skipping checkpoint {last} is unreadable" in out
    assert "step_000006.ckpt (global step 6)" in out
    assert _global_step(last) == 8


def test_checkpoint_of_another_model_size_is_a_clear_error(tmp_path, dataset):
    first = tmp_path / "first"
    assert run_train(first, f"data.shards={dataset}", "trainer.max_steps=3", *QUIET).returncode == 0
    other = run_train(
        tmp_path / "second",
        f"data.shards={dataset}",
        f"resume={first}/checkpoints/last.ckpt",
        "model.unet.config.block_out_channels=[32,64,64]",
        *QUIET,
    )
    assert other.returncode == 2 and "Traceback" not in other.stderr
    line = other.stderr.strip().splitlines()[-1]
    assert "last.ckpt does not fit this model" in line
    assert "size mismatches (first: size mismatch for unet." in line and "unexpected keys (first: unet." in line


def test_nonfinite_loss_stops_with_a_clear_message(tmp_path, dataset):
    result = run_train(
        tmp_path / "run",
        f"data.shards={dataset}",
        "trainer.max_steps=30",
        "optim.lr=1e30",
        "optim.warmup_steps=0",
        "trainer.gradient_clip_val=null",
        "optim.max_nonfinite_skips=2",
        *QUIET,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "non-finite loss" in result.stderr.strip().splitlines()[-1]
    assert "max_nonfinite_skips=2" in result.stderr


def test_secrets_stay_out_of_configs_and_logs(tmp_path, dataset):
    secret = "sk-test-0123456789abcdef"
    run = tmp_path / "run"
    result = run_train(
        run,
        f"data.shards={dataset}",
        "logger=wandb",
        "trainer.max_steps=2",
        *QUIET,
        env={"WANDB_MODE": "offline", "WANDB_API_KEY": secret, "WANDB_SILENT": "true"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for path in run.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    refused = run_train(tmp_path / "r2", f"data.shards={dataset}", "logger=wandb", f"+logger.api_key={secret}", *QUIET)
    assert refused.returncode == 2 and "looks like a secret" in refused.stderr
