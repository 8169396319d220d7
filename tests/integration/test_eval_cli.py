"""sdtrain-eval end to end on a trained checkpoint; fine-tuning from an export through the training CLI."""

import csv
import json
from pathlib import Path

import pytest
import torch
from cli_runner import run_module
from helpers import REPO, run_train

from sdtrain.checkpoint.format import find_ema_state
from sdtrain.checkpoint.trained import load_trained
from sdtrain.evaluate.cli import main as eval_main
from sdtrain.evaluate.images import read_image_folder
from sdtrain.evaluate.report import write_report
from sdtrain.export.diffusers_folder import export_diffusers
from sdtrain.models.inception import InceptionFeatures, fid
from sdtrain.vae.metrics import reconstruct

pytestmark = pytest.mark.slow


def test_eval_cli_table_plot_and_baseline(trained_run, tmp_path, capsys):
    from PIL import Image

    real = tmp_path / "real"
    real.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(8):
        pixels = (torch.rand(32, 32, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(real / f"{i:04d}.png")
        (real / f"{i:04d}.txt").write_text(f"grinning face {i}")
    ckpts = sorted((trained_run / "checkpoints").glob("*.ckpt"))
    out = tmp_path / "eval"
    args = [*map(str, ckpts), "--real", str(real), "--out", str(out)]
    args += ["--num-images", "8", "--steps", "2", "--baseline", "--reconstruction"]
    result = run_module("sdtrain.evaluate.cli", *args, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    assert [r["name"] for r in rows][-2:] == ["mean colour image", "VAE reconstruction"]
    assert len(rows) == len(ckpts) + 2 and all(float(r["fid"]) > 0 for r in rows)
    # the floor row is the real images through the first checkpoint's VAE, measured as the checkpoints are
    images = read_image_folder(str(real), 32).images
    vae = load_trained(str(ckpts[0])).vae
    inception = InceptionFeatures(None, "cpu")
    rebuilt = (reconstruct(vae, images * 2 - 1).clamp(-1, 1) + 1) / 2
    assert float(rows[-1]["fid"]) == pytest.approx(fid(inception(rebuilt), inception(images)), rel=1e-4)
    assert json.loads((out / "metrics.json").read_text())[0]["step"] == 30
    assert (out / "metrics.png").stat().st_size > 1000

    assert eval_main([*args, "--inception", "/nonexistent.pt"]) == 2
    assert capsys.readouterr().err.strip() == "error: Inception weights not found: /nonexistent.pt"


def _weaker_copy(checkpoint, path):
    """The checkpoint as an 'earlier step' of its run: global step 10, EMA weights pulled towards zero."""
    data = torch.load(checkpoint, map_location="cpu", weights_only=False)
    data["global_step"] = 10
    ema = find_ema_state(data)
    for name in ema["shadow"]:
        ema["shadow"][name] = ema["shadow"][name] * 0.8
    torch.save(data, path)
    return path


def test_eval_with_autoguidance_adds_a_guided_row_per_later_checkpoint(trained_run, tmp_path, capsys):
    from PIL import Image

    real = tmp_path / "real"
    real.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 200, 90)).save(real / f"{i:04d}.png")
        (real / f"{i:04d}.txt").write_text(f"green square {i}")
    last = trained_run / "checkpoints" / "last.ckpt"
    guide = _weaker_copy(last, tmp_path / "guide.ckpt")
    out = tmp_path / "eval"
    args = [str(last), str(guide), "--real", str(real), "--out", str(out), "--num-images", "4", "--steps", "2"]
    assert eval_main([*args, "--guide", str(guide), "--autoguidance", "3"]) == 0
    rows = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    # last (step 30): plain and guided by the step-10 copy; the guide itself (step 10): plain only
    assert [(r["step"], r["guide"]) for r in rows] == [("30", ""), ("30", "10"), ("10", "")]
    assert rows[0]["fid"] != rows[1]["fid"]
    assert (out / "step_000030_guided_000010_grid.png").is_file()
    report = write_report(str(trained_run), str(out), str(tmp_path / "report.html"))
    assert "30, with autoguidance" in Path(report).read_text(encoding="utf-8")

    assert eval_main([*args, "--guide", str(guide), "--autoguidance", "0.5"]) == 2
    assert capsys.readouterr().err.strip().endswith("autoguidance must be >= 1 (1 = off), got 0.5")
    assert eval_main([*args, "--autoguidance", "3"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("--autoguidance needs --guide (the weaker checkpoint to guide against)")
    )
    other = torch.load(guide, map_location="cpu", weights_only=False)
    other["sdtrain"]["spec"]["latent_shape"] = [4, 16, 16]
    torch.save(other, tmp_path / "other.ckpt")
    assert eval_main([*args[:1], *args[2:], "--guide", str(tmp_path / "other.ckpt")]) == 2
    assert "cannot guide this checkpoint: they differ in latent shape" in capsys.readouterr().err
    assert eval_main([*args[1:], "--guide", str(guide)]) == 2  # the guide alone: nothing later to guide
    assert capsys.readouterr().err.strip().endswith("is step 10: no checkpoint given is later, none to guide")


def test_fine_tune_from_export_and_ldm_file(trained_run, tmp_path, dataset):
    model = load_trained(str(trained_run / "checkpoints" / "last.ckpt"))
    export = export_diffusers(model, str(tmp_path / "export"))
    for source, expect in ((export, "model.unet: loaded"), (f"{export}/unet.ldm.safetensors", "converting")):
        run = tmp_path / f"ft_{len(source)}"
        result = run_train(
            run, f"data.shards={dataset}", f"model.unet.pretrained={source}", "debug=fast", "trainer.max_steps=1"
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert expect in result.stdout + result.stderr
        if source.endswith(".safetensors"):
            assert "loaded 326/326 tensors" in result.stdout + result.stderr
    wrong = run_train(
        tmp_path / "wrong",
        f"data.shards={dataset}",
        f"model.unet.pretrained={export}/unet.ldm.safetensors",
        "model.unet.config.block_out_channels=[16,32,64]",
        "debug=fast",
    )
    assert wrong.returncode == 2 and "wrong model size" in wrong.stderr and "Traceback" not in wrong.stderr
