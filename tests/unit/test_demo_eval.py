"""sdtrain-demo's step 6 evaluates each checkpoint once: last.ckpt only when no step checkpoint holds its step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sdtrain.evaluate.cli as eval_cli
from sdtrain.demo.cli import evaluate_run


def _checkpoint(path: Path, step: int) -> None:
    torch.save({"state_dict": {}, "global_step": step}, path)


@pytest.mark.parametrize(
    ("last_step", "expected"),
    [
        (1200, ["step_000400", "step_000800", "step_001200"]),
        (1400, ["step_000400", "step_000800", "step_001200", "last"]),
    ],
)
def test_demo_evaluates_each_step_once(tmp_path, monkeypatch, last_step, expected):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    for step in (400, 800, 1200):
        _checkpoint(folder / f"step_{step:06d}.ckpt", step)
    _checkpoint(folder / "last.ckpt", last_step)
    seen: list[list[str]] = []
    monkeypatch.setattr(eval_cli, "main", lambda argv: seen.append(argv) or 0)
    assert evaluate_run(str(tmp_path / "run"), str(tmp_path)) == 0
    names = [Path(a).stem for a in seen[0][: seen[0].index("--real")]]
    assert names == expected
