"""sdtrain installs as a wheel and trains from any folder: the Hydra config travels inside the package."""

import email
import subprocess
import sys
import zipfile

import pytest
from helpers import REPO

pytestmark = pytest.mark.slow


def _run(cmd, **kw):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result


def test_wheel_installed_outside_the_source_tree_trains_three_steps(tmp_path, dataset):
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)])
    (wheel,) = wheels.glob("sdtrain-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = email.message_from_bytes(zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))))
    assert {"sdtrain/conf/train.yaml", "sdtrain/conf/model/tiny.yaml", "sdtrain/conf/strategy/fsdp.yaml"} <= names
    assert meta["Requires-Python"] == ">=3.10"
    assert meta["License-Expression"] == "Apache-2.0"
    pinned = [r for r in meta.get_all("Requires-Dist") if "==" in r.split(";")[0]]
    assert not pinned, pinned  # ranges only; exact pins live in .ci/constraints.txt

    site = tmp_path / "site"
    _run([*pip, "install", "--no-deps", "-q", "--target", str(site), str(wheel)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    where = _run([sys.executable, "-c", "import sdtrain; print(sdtrain.__file__)"], cwd=elsewhere, env=env)
    assert where.stdout.strip().startswith(str(site)), where.stdout  # the wheel's copy, not the checkout
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "sdtrain.train", "experiment=tiny", f"data.shards={dataset}", "debug=fast"]
    _run([*cmd, f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false"], cwd=elsewhere, env=env)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
