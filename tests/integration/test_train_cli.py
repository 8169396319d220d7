"""The documented CLI contract, run as users run it: python -m sdtrain.train experiment=tiny ..."""

import csv
import glob
from pathlib import Path

import pytest
import torch
from helpers import run_train
from PIL import Image

from sdtrain.diffusion.grid import LABEL_WIDTH, PAD

pytestmark = pytest.mark.slow
FAST = [
    "trainer.enable_progress_bar=false",
    "data.num_workers=1",
    "callbacks.sampling.steps=3",
    "trainer.log_every_n_steps=1",
]


def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_fit_writes_checkpoints_samples_and_metrics(tmp_path, dataset):
    run = tmp_path / "run"
    result = run_train(
        run,
        f"data.shards={dataset}",
        "trainer.max_steps=7",
        "callbacks.samples.every_n_steps=3",
        "callbacks.checkpoint.every_n_steps=3",
        *FAST,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "checkpoints" / "last.ckpt").exists() and (run / "checkpoints" / "step_000003.ckpt").exists()
    # the final state is in last.ckpt even when the run ends between two step checkpoints
    assert _ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 7
    for step in (3, 6, 7):
        grid = Image.open(run / "samples" / f"step_{step:06d}.png")
        # 2 prompts x 1 seed of 32x32 px (8x8 latents, 4x VAE) upscaled 4x, the prompts in a label column
        assert grid.size == (LABEL_WIDTH + 128 + 2 * PAD, 2 * (128 + PAD) + PAD)
    with open(run / "logs" / "version_0" / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert losses and all(loss > 0 for loss in losses)


def test_resume_from_explicit_path(tmp_path, dataset):
    first = tmp_path / "first"
    common = [f"data.shards={dataset}", "callbacks.samples.at_end=false", "callbacks.samples.every_n_steps=0", *FAST]
    assert run_train(first, "trainer.max_steps=3", *common).returncode == 0
    second = run_train(tmp_path / "second", "trainer.max_steps=5", f"resume={first}/checkpoints/last.ckpt", *common)
    assert second.returncode == 0, second.stderr[-3000:]
    assert _ckpt(tmp_path / "second" / "checkpoints" / "last.ckpt")["global_step"] == 5


def test_wandb_offline_run_has_the_config_images_and_survives_a_resume(tmp_path, dataset):
    """Without SLURM or root: a run and its resume log into the same W&B run, with the resolved config, the
    sample images captioned by prompt, and the metrics namespaced."""
    run = tmp_path / "run"
    common = [f"data.shards={dataset}", "logger=wandb", "callbacks.samples.every_n_steps=0", *FAST]
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    first = run_train(run, *common, "trainer.max_steps=3", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_train(run, *common, "trainer.max_steps=5", "resume=auto", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    run_id = (run / "wandb_run_id.txt").read_text().strip()
    runs = sorted(glob.glob(str(run / "wandb" / "offline-run-*")))
    assert len(runs) == 2 and all(r.endswith(f"-{run_id}") for r in runs), runs  # one W&B run, two sessions
    record = (Path(runs[0]) / f"run-{run_id}.wandb").read_bytes()  # offline: the config is a record in here
    # one config item per group, its value the resolved group as JSON
    for nested in (b'"cross_attention_dim"', b'"batch_size":8', b'"warmup_steps"', b'"every_n_steps"', b'"max_steps"'):
        assert nested in record, nested
    assert glob.glob(f"{runs[0]}/run-{run_id}.wandb")
    assert glob.glob(f"{runs[0]}/files/media/images/samples_*.png")  # the sample images went to W&B too


def test_masked_loss_reads_each_samples_mask_into_the_loss(tmp_path, dataset):
    """diffusion.masked_loss=true through the CLI: the same shards with an all-zero mask.npy per sample train with
    a loss of exactly 0 at every step (the same data without masks trains with loss > 0: the test above)."""
    import io
    import shutil
    import tarfile

    import numpy as np

    masked = tmp_path / "masked"
    masked.mkdir()
    mask = io.BytesIO()
    np.save(mask, np.zeros((8, 8), np.float32))
    for shard in sorted(dataset.parent.glob("*.tar")):
        with tarfile.open(shard) as src, tarfile.open(masked / shard.name, "w") as dst:
            members = src.getmembers()
            for i, member in enumerate(members):
                dst.addfile(member, src.extractfile(member))
                key = member.name.split(".", 1)[0]
                if i + 1 == len(members) or members[i + 1].name.split(".", 1)[0] != key:  # the key's last member
                    info = tarfile.TarInfo(f"{key}.mask.npy")
                    info.size = len(mask.getvalue())
                    dst.addfile(info, io.BytesIO(mask.getvalue()))
    shutil.copy(dataset, masked / "manifest.json")
    run = tmp_path / "run"
    overrides = ["trainer.max_steps=3", "callbacks.samples.at_end=false", "callbacks.samples.every_n_steps=0"]
    result = run_train(run, f"data.shards={masked / 'manifest.json'}", "diffusion.masked_loss=true", *overrides, *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(run / "logs" / "version_0" / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) == 3 and all(loss == 0.0 for loss in losses)


def test_weighted_sources_train_and_log_each_sources_samples(tmp_path, dataset, val_dataset):
    """data.sources from the command line (Hydra's list-of-dicts syntax): the header states each source's share,
    the metrics count each source's samples, and shards + sources together is one line."""
    sources = f"data.sources=[{{shards:{dataset},weight:3,name:main}},{{shards:{val_dataset},weight:1,name:extra}}]"
    run = tmp_path / "run"
    result = run_train(run, sources, "trainer.max_steps=6", "callbacks.samples.at_end=false", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "sources: main 75% (78 samples/epoch of 64), extra 25% (26 samples/epoch of 40)" in log  # 104 in all
    with open(run / "logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("data/samples/main")]
    last = rows[-1]
    main, extra = float(last["data/samples/main"]), float(last.get("data/samples/extra") or 0)
    assert main > 0 and extra > 0 and main + extra == 6 * 8  # every sample of the 6 batches, by source
    both = run_train(tmp_path / "both", sources, f"data.shards={dataset}", "trainer.max_steps=1", *FAST)
    assert both.returncode == 2 and both.stderr.strip().splitlines()[-1].endswith(
        "give data.shards or data.sources, not both"
    )
