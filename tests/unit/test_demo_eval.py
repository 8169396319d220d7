"""sdtrain-demo's step 6 scores the run's first step checkpoint and its final weights once each (last.ckpt only when no
step checkpoint holds its step), the final weights also autoguided by that first checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sdtrain.evaluate.cli as eval_cli
from sdtrain.demo.cli import FID_AUTOGUIDANCE, evaluate_run


def _checkpoint(path: Path, step: int) -> None:
    torch.save({"state_dict": {}, "global_step": step}, path)


@pytest.mark.parametrize(
    ("steps", "last_step", "expected", "guide"),
    [
        ((300, 600, 900, 1200), 1200, ["step_000300", "step_001200"], "step_000300"),
        ((300, 600, 900, 1200), 1400, ["step_000300", "last"], "step_000300"),
        ((1200,), 1200, ["step_001200"], None),
        ((), 50, ["last"], None),
    ],
)
def test_demo_scores_first_and_final_checkpoints_once(tmp_path, monkeypatch, steps, last_step, expected, guide):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    for step in steps:
        _checkpoint(folder / f"step_{step:06d}.ckpt", step)
    _checkpoint(folder / "last.ckpt", last_step)
    seen: list[list[str]] = []
    monkeypatch.setattr(eval_cli, "main", lambda argv: seen.append(argv) or 0)
    assert evaluate_run(str(tmp_path / "run"), str(tmp_path)) == 0
    argv = seen[0]
    assert [Path(a).stem for a in argv[: argv.index("--real")]] == expected
    assert (Path(argv[argv.index("--guide") + 1]).stem if "--guide" in argv else None) == guide
    # the weight goes with the guide only (sdtrain-eval refuses --autoguidance without one)
    assert (argv[argv.index("--autoguidance") + 1] if "--autoguidance" in argv else None) == (
        FID_AUTOGUIDANCE if guide else None
    )
