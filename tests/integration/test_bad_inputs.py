"""Every bad input ends with one clear line naming the problem: no traceback, no hang."""

import tarfile

import numpy as np
import pytest
from helpers import run_train

pytestmark = pytest.mark.slow


def _no_caption_dataset(folder):
    from sdtrain.prep.shard_writer import npy_bytes

    folder.mkdir()
    with tarfile.open(folder / "000000.tar", "w") as tar:
        data = npy_bytes(np.zeros((8, 8, 8), np.float16))
        info = tarfile.TarInfo("0001.moments.npy")
        info.size = len(data)
        import io

        tar.addfile(info, io.BytesIO(data))
    return folder / "000000.tar"


CASES = {
    "empty_pattern": (["data.shards="], "data.shards is empty"),
    "nonexistent": (["data.shards='/nonexistent/{000000..000003}.tar'"], "shard not found: /nonexistent/000000.tar"),
    "wrong_channels": (["model.unet.config.in_channels=8"], "4 latent channels, model expects 8"),
    "unknown_key_plus": (["+data.colour=red"], "unknown key data.colour"),
    "unknown_key": (["data.colour=red"], "Key 'colour' is not in struct"),
    "bad_type": (["optim.lr=fast"], "optim.lr must be a number"),
    "missing_resume": (["resume=/nonexistent/last.ckpt"], "resume checkpoint not found: /nonexistent/last.ckpt"),
    "max_steps": (["trainer.max_steps=0"], "trainer.max_steps must be >= 1"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_clear_line(tmp_path, dataset, case):
    overrides, message = CASES[case]
    args = [] if any(o.startswith("data.shards") for o in overrides) else [f"data.shards={dataset}"]
    result = (
        run_train(tmp_path / "run", *args, *overrides, "trainer.max_steps=2", timeout=120)
        if case != "max_steps"
        else run_train(tmp_path / "run", *args, *overrides, timeout=120)
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert message in result.stderr, result.stderr[-2000:]


def test_missing_caption_names_the_shard_and_sample(tmp_path):
    shard = _no_caption_dataset(tmp_path / "data")
    result = run_train(tmp_path / "run", f"data.shards={shard}", "trainer.max_steps=2", timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: shard ") and "sample '0001': missing_caption" in last
