"""bench/gpu_throughput.py stays runnable: its tiny CPU mode runs every case and reports a rate."""

import subprocess
import sys

from helpers import REPO


def test_gpu_throughput_tiny_mode_runs():
    out = subprocess.run(
        [sys.executable, "bench/gpu_throughput.py", "--tiny"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| 256") or line.startswith("| 512")]
    assert len(rows) == 4 and all(float(r.split("|")[5]) > 0 for r in rows)
