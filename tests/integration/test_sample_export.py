"""Sampling from a checkpoint, export to diffusers, and back: determinism, CFG=1, same pixels, every tensor."""

import csv

import pytest
import torch
from cli_runner import run_module
from conftest import SHIFT
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from helpers import REPO, assert_same_parts, only_folder, plain_diffusers_classes, run_train
from safetensors import safe_open

from sdtrain.checkpoint.files import load_checkpoint_file
from sdtrain.checkpoint.format import find_ema_state
from sdtrain.checkpoint.trained import load_trained
from sdtrain.diffusion.sampling import SamplingConfig, build_scheduler, initial_noise
from sdtrain.export.diffusers_folder import export_diffusers, import_diffusers
from sdtrain.export.pipeline import load_pipeline
from sdtrain.sample.cli import main as sample_main
from sdtrain.sample.cli import sample_images

pytestmark = pytest.mark.slow
PAIRS = [("grinning face 0", 0), ("red apple 1", 1), ("blue car 2", 2), ("grinning face 0", 7)]


@pytest.fixture(scope="module")
def ckpt(trained_run):
    return str(trained_run / "checkpoints" / "last.ckpt")


def test_validation_loss_is_logged_and_falls(trained_run):
    rows = list(csv.DictReader((trained_run / "logs" / "version_0" / "metrics.csv").read_text().splitlines()))
    val = {int(r["step"]): float(r["val/loss"]) for r in rows if r.get("val/loss")}
    assert sorted(val) == [0, 10, 20, 30]
    assert val[30] < val[0] * 0.8, val
    assert any(r.get("val/loss_t062") for r in rows)  # per-timestep curve: 8 of 1000 -> 62, 187, ...


@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_a", "dpm++"])
def test_samples_are_deterministic_per_seed_whatever_the_batch(ckpt, sampler):
    model = load_trained(ckpt)
    cfg = SamplingConfig(steps=4, guidance=3.0, sampler=sampler)
    one_by_one = sample_images(model, PAIRS, cfg, batch_size=1, latent_shape=model.latent_shape)
    batched = sample_images(model, PAIRS, cfg, batch_size=4, latent_shape=model.latent_shape)
    again = sample_images(model, PAIRS, cfg, batch_size=4, latent_shape=model.latent_shape)
    assert torch.equal(batched, again)
    assert torch.allclose(one_by_one, batched, atol=1e-5)
    assert not torch.allclose(batched[0], batched[3], atol=1e-3)  # same prompt, other seed: another image


def test_guidance_one_equals_the_conditional_only_path(ckpt):
    """CFG 1 skips the unconditional pass; it must equal the two-branch formula uncond + 1 * (cond - uncond)."""
    model = load_trained(ckpt)
    cfg = SamplingConfig(steps=4, guidance=1.0, negative_prompt="blue car")
    fast = sample_images(model, PAIRS[:2], cfg, batch_size=2, latent_shape=model.latent_shape)
    tokenizer = model.tokenizer
    cond = model.text_encoder(tokenizer([p for p, _ in PAIRS[:2]]))
    uncond = model.text_encoder(tokenizer(["blue car"] * 2))
    scheduler = build_scheduler("ddim", model.diffusion.scheduler_config())
    scheduler.set_timesteps(4)
    latents = initial_noise([0, 1], model.latent_shape, torch.device("cpu")) * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            pred = model.unet(torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            u, c = pred.chunk(2)
            latents = scheduler.step(u + 1.0 * (c - u), t, latents).prev_sample
        pixels = model.vae.decode(model.normalizer.denormalize(latents)).sample
    assert torch.allclose(fast, ((pixels + 1) / 2).clamp(0, 1), atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++", "euler_a"])  # euler_a: the step noise too, per image
def test_export_loads_in_diffusers_and_gives_the_same_pixels(ckpt, tmp_path, sampler):
    model = load_trained(ckpt)
    assert model.normalizer.shift == SHIFT  # the shift is folded into the exported VAE
    out = export_diffusers(model, str(tmp_path / "export"), sampler=sampler)
    unet = UNet2DConditionModel.from_pretrained(f"{out}/unet")
    ours = model.unet.state_dict()
    assert all(torch.equal(tensor, ours[key]) for key, tensor in unet.state_dict().items())
    # the OpenCLIP tower leaves as a CLIPTextModel: plain diffusers runs the folder, with no sdtrain code
    assert plain_diffusers_classes(out, tmp_path) == ["CLIPTextModel", "CLIPTokenizer"]
    pipeline = load_pipeline(out)  # StableDiffusionPipeline.from_pretrained, prompts encoded by the pipeline
    assert pipeline.text is None
    prompts, seeds = [p for p, _ in PAIRS], [s for _, s in PAIRS]
    for guidance in (1.0, 4.0):
        ours = sample_images(
            model,
            PAIRS,
            SamplingConfig(steps=5, guidance=guidance, sampler=sampler),
            batch_size=4,
            latent_shape=model.latent_shape,
        )
        theirs = pipeline(prompts, seeds, steps=5, guidance=guidance)
        assert (ours - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_import_of_export_keeps_every_tensor(ckpt, tmp_path, weights):
    out = export_diffusers(load_trained(ckpt, weights), str(tmp_path / weights))
    back = import_diffusers(out)
    checkpoint = load_checkpoint_file(ckpt)
    state = checkpoint["state_dict"]
    expected = {
        "unet": find_ema_state(checkpoint)["shadow"]
        if weights == "ema"
        else {k[5:]: v for k, v in state.items() if k.startswith("unet.")},
        "vae": {k[4:]: v for k, v in state.items() if k.startswith("vae.")},
        "text_encoder": {k[13:]: v for k, v in state.items() if k.startswith("text_encoder.")},
    }
    for part, tensors in expected.items():
        assert set(back[part]) == set(tensors), part
        for key, tensor in tensors.items():
            assert torch.equal(back[part][key], tensor), (part, key)
    ema, raw = find_ema_state(checkpoint)["shadow"], expected["unet"]
    assert weights == "ema" or any(not torch.equal(ema[k], raw[k]) for k in raw)  # the flag picks different weights


def test_single_file_of_an_open_clip_run_loads_in_diffusers_and_starts_a_run_from_the_preset(ckpt, tmp_path, dataset):
    """SD 2.x layout: the OpenCLIP tower as cond_stage_model.model.*; model.pretrained=FILE with no configs folder
    takes the U-Net/VAE configs from the preset (experiment=tiny) and the text encoder's sizes from the file."""
    model = load_trained(ckpt)
    file = str(tmp_path / "tiny.safetensors")
    out = export_diffusers(model, str(tmp_path / "export"), single_file=file)
    with safe_open(file, "pt") as f:
        tower = {k for k in f.keys() if k.startswith("cond_stage_model.model.")}  # noqa: SIM118
    assert tower == {f"cond_stage_model.model.{k}" for k in model.text_encoder.tower.state_dict()}  # the whole tower
    folder = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert_same_parts(folder, StableDiffusionPipeline.from_single_file(file, config=out, local_files_only=True))

    cache = tmp_path / "cache"
    run = run_train(
        tmp_path / "run", f"model.pretrained={file}", f"data.shards={dataset}", "debug=fast",
        env={"SDTRAIN_CACHE": str(cache)},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    converted = StableDiffusionPipeline.from_pretrained(only_folder(cache / "single_file"), local_files_only=True)
    assert_same_parts(folder, converted)
    prompts = ["grinning face 0", "red apple 1", ""]
    with torch.no_grad():  # the converted CLIPTextModel conditions as the trained OpenCLIP tower did
        tokens = converted.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        theirs = converted.text_encoder(tokens).last_hidden_state
    assert torch.allclose(model.text_encoder(model.tokenizer(prompts)), theirs, atol=1e-5)


def _cli(module, *args, timeout=300):
    return run_module(module, *map(str, args), cwd=REPO, timeout=timeout)


def test_sample_cli_writes_pngs_grid_and_index(ckpt, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red apple 1\n\nblue car 2\n", encoding="utf-8")
    out = tmp_path / "samples"
    result = _cli("sdtrain.sample.cli", ckpt, "--prompts-file", prompts, "--seeds", 0, 1, "--steps", 3, "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list(out.glob("0*.png"))) == 4 and (out / "grid.png").exists()
    assert (out / "samples.jsonl").read_text().count("\n") == 4


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_checkpoint", "checkpoint not found: /nonexistent.ckpt"),
        ("bad_utf8", "is not valid UTF-8 (line 2"),
        ("no_prompts", "give prompts with --prompt or --prompts-file"),
        ("bad_size", "must be a multiple of the VAE's factor 4"),
    ],
)
def test_sample_cli_bad_input_is_one_line(ckpt, tmp_path, capsys, case, message):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"red apple\n\xff\xfe broken\n")
    args = {
        "missing_checkpoint": ["/nonexistent.ckpt", "--prompt", "x"],
        "bad_utf8": [ckpt, "--prompts-file", bad],
        "no_prompts": [ckpt],
        "bad_size": [ckpt, "--prompt", "x", "--height", "30"],
    }[case]
    assert sample_main([str(a) for a in args]) == 2  # the console script's body, in process
    stderr = capsys.readouterr().err
    assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr
