"""bench/gpu_check.sh stays runnable: its CPU smoke mode runs every stage (GPU tests collected and skipped, the
U-Net sweep in child processes, the real CLI under ddp and deepspeed_zero2) and writes the results page."""

import subprocess

import pytest
from helpers import REPO

pytestmark = pytest.mark.slow


def test_gpu_check_cpu_smoke_writes_every_section(tmp_path):
    out = tmp_path / "RESULTS-gpu.md"
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--cpu-smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    page = out.read_text()
    for heading in ("## GPU-marked tests", "## Tiny U-Net (CPU smoke)", "## Real CLI"):
        assert heading in page, heading
    assert "skipped" in page.split("## GPU-marked tests")[1].split("##")[0]  # collected; no CUDA here
    sweep_rows = [r for r in page.splitlines() if r.startswith("| 256") or r.startswith("| 512")]
    assert len(sweep_rows) >= 6 and all(" ok " in r for r in sweep_rows), sweep_rows
    assert all(float(r.split("|")[5]) > 0 for r in sweep_rows)  # img/s measured
    cli_rows = [r for r in page.splitlines() if r.startswith("| ddp") or r.startswith("| deepspeed_zero2")]
    assert len(cli_rows) == 2 and all("| ok " in r for r in cli_rows), cli_rows
    assert all(float(r.split("|")[5]) > 0 for r in cli_rows)  # the run logged its throughput window


def test_gpu_check_without_a_gpu_says_so_in_one_line():
    done = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("bench/gpu_check.sh: no CUDA GPU")
