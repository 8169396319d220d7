import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# pytest attaches its log capture to every logger that does not propagate, torch's structured-trace logger too;
# with a handler there torch builds its trace artifacts (FX graphs, generated code) on every compile, as under
# TORCH_TRACE, and pytest keeps them all. Propagating, it has no handler of its own once torch's lazy one leaves.
logging.getLogger("torch.__trace").propagate = True

from helpers import make_dataset  # noqa: E402


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """64 synthetic samples of 4x8x8 moments in 4 shards of 16, with a manifest."""
    return make_dataset(tmp_path_factory.mktemp("latents"), n=64, per_shard=16)


@pytest.fixture(scope="session")
def val_dataset(tmp_path_factory) -> Path:
    """40 held-out synthetic samples (other keys and values than `dataset`), for the validation loss."""
    return make_dataset(tmp_path_factory.mktemp("val_latents"), n=40, per_shard=20, seed=5, start=1000)


SHIFT = [0.3, -0.2, 0.1, 0.5]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, dataset, val_dataset) -> Path:
    """A 30-step tiny run with EMA, fixed-timestep validation every 10 steps and a per-channel latent shift
    (so export has a shift to fold). Shared by the sampling/export/eval tests; returns the run folder."""
    from helpers import run_train

    run = tmp_path_factory.mktemp("trained") / "run"
    result = run_train(
        run,
        f"data.shards={dataset}",
        f"data.val_shards={val_dataset}",
        f"data.shift_factor=[{','.join(map(str, SHIFT))}]",
        "data.num_workers=0",
        "trainer.max_steps=30",
        "callbacks.validation.every_n_steps=10",
        "callbacks.samples.every_n_steps=0",
        "callbacks.sampling.steps=2",
        "trainer.enable_progress_bar=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.fixture(scope="session")
def emoji_folders(tmp_path_factory) -> tuple[Path, Path]:
    """(train, held-out) folders of real emoji PNGs at 32 px with .txt captions: 600 and 64 images."""
    from sdtrain.demo.emoji_images import emoji_pairs, load_pixels, write_image_folder

    root = tmp_path_factory.mktemp("emoji")
    pairs = emoji_pairs()
    train, held_out = pairs[1::3][:600], pairs[2::3][:64]
    write_image_folder(train, load_pixels(train, 32), str(root / "train"))
    write_image_folder(held_out, load_pixels(held_out, 32), str(root / "held_out"))
    return root / "train", root / "held_out"


@pytest.fixture(scope="session")
def vae_run(tmp_path_factory, emoji_folders) -> Path:
    """A tiny VAE trained by `sdtrain-train-vae` for 500 steps on real emoji (32 px, no EMA), held-out PSNR/rFID.

    500, not fewer: at 300 steps the held-out PSNR still swings 14.7-16.8 dB with the seed; at 500 it is 17.4-17.7.
    """
    from helpers import run_train_vae

    run = tmp_path_factory.mktemp("vae_run") / "run"
    train, held_out = emoji_folders
    result = run_train_vae(
        run,
        f"data.images={train}",
        f"data.val_images={held_out}",
        "trainer.max_steps=500",
        "callbacks.reconstructions.every_n_steps=250",
        "data.num_workers=1",
        "callbacks.ema.enabled=false",  # 500 steps: an EMA of 0.995 still lags (the resume test covers EMA)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.fixture(scope="session")
def vae_dir(vae_run) -> str:
    """The diffusers AutoencoderKL folder that run wrote (DIR/vae, with latent_statistics.json)."""
    return str(vae_run / "vae")


@pytest.fixture(scope="session")
def raw_tars(tmp_path_factory) -> list[Path]:
    """96 captioned emoji in 6 img2dataset-style tars of 16 (6 encode parts)."""
    from helpers import emoji_raw_tars

    return emoji_raw_tars(tmp_path_factory.mktemp("raw"), count=96, per_tar=16)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need a CUDA device: skipped (with the reason) where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
