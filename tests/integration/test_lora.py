"""LoRA through peft (`model.lora.rank=R`) on released SD 1.x and SDXL layouts: only the adapters train, are
EMA'd and checkpointed (small checkpoints, resumed bit for bit), under DDP, ZeRO-2 and FSDP too; the export is
diffusers' LoRA format that `load_lora_weights` puts on the base, with sdtrain's pixels; `--merge` folds it into
a full model equal to base + LoRA; a target module that does not exist is one line."""

import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from helpers import run_train
from pipelines import save_tiny_pipeline, save_tiny_sdxl_pipeline
from test_sdxl import bucketed_shards

from sdtrain.checkpoint.files import load_full_checkpoint
from sdtrain.checkpoint.trained import load_trained
from sdtrain.diffusion.sampling import SamplingConfig, build_scheduler, initial_noise
from sdtrain.export.cli import main as export_main
from sdtrain.sample.cli import sample_images

pytestmark = pytest.mark.slow
PAIRS = [("grinning face", 0), ("red apple", 1)]
LORA = [
    "debug=fast",
    "model.lora.rank=4",
    "model.lora.alpha=8",
    "optim.lr=0.05",  # large enough that four steps move the adapters visibly
    "trainer.max_steps=4",
    "callbacks.checkpoint.every_n_steps=2",
    "callbacks.checkpoint.keep_last=-1",
    "callbacks.samples.at_end=false",
    "callbacks.ema.decay=0.5",
]


@pytest.fixture(scope="module")
def sd1_lora(tmp_path_factory, dataset):
    root = tmp_path_factory.mktemp("lora")
    base = save_tiny_pipeline(root / "released", "sd1")
    args = [f"model.pretrained={base}", f"data.shards={dataset}", *LORA]
    result = run_train(root / "a", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return base, root / "a", args


def _pixels(pipe, shape, **size):
    pipe.set_progress_bar_config(disable=True)
    noise = initial_noise([s for _, s in PAIRS], shape, torch.device("cpu"))
    with torch.no_grad():
        return pipe(
            [p for p, _ in PAIRS], latents=noise, num_inference_steps=3, guidance_scale=3.0, output_type="pt", **size
        ).images


def _ours(model, shape):
    cfg = SamplingConfig(prompts=[p for p, _ in PAIRS], seeds=[0], steps=3, guidance=3.0)
    return sample_images(model, PAIRS, cfg, batch_size=2, latent_shape=shape)


def test_only_adapters_train_and_checkpoints_hold_only_them(sd1_lora):
    base, run, _ = sd1_lora
    checkpoint = load_full_checkpoint(str(run / "checkpoints" / "last.ckpt"))
    keys = list(checkpoint["state_dict"])
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)  # no base, text encoder or VAE tensors
    shadow = checkpoint["callbacks"][next(k for k in checkpoint["callbacks"] if "EMA" in k)]["shadow"]
    assert set(shadow) == {k.removeprefix("unet.") for k in keys}  # EMA follows the adapters only
    model = load_trained(str(run / "checkpoints" / "last.ckpt"), "raw")
    released = StableDiffusionPipeline.from_pretrained(base, local_files_only=True).unet.state_dict()
    ours = model.unet.state_dict()
    for name, tensor in released.items():  # every base weight is the release's, bit for bit
        name = (
            name if name in ours else name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        )
        assert torch.equal(ours[name], tensor), name
    assert any(v.abs().sum() > 0 for k, v in ours.items() if ".lora_B." in k)  # B started at 0 and trained
    log = (run / "train.log").read_text()
    assert "trainable" in log


def test_lora_resumes_bit_for_bit(sd1_lora, tmp_path):
    _, run, args = sd1_lora
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copy2(run / "checkpoints" / "step_000002.ckpt", tmp_path / "b" / "checkpoints")
    result = run_train(tmp_path / "b", *args, "resume=auto")
    assert result.returncode == 0, result.stderr[-3000:]
    a = load_full_checkpoint(str(run / "checkpoints" / "last.ckpt"))
    b = load_full_checkpoint(str(tmp_path / "b" / "checkpoints" / "last.ckpt"))
    assert a["global_step"] == b["global_step"] == 4 and a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_export_loads_with_load_lora_weights_and_merge_equals_base_plus_lora(sd1_lora, tmp_path):
    base, run, _ = sd1_lora
    ckpt = str(run / "checkpoints" / "last.ckpt")
    assert export_main([ckpt, str(tmp_path / "lora")]) == 0
    assert export_main([ckpt, str(tmp_path / "merged"), "--merge"]) == 0
    model = load_trained(ckpt)
    shape = model.latent_shape
    pipe = StableDiffusionPipeline.from_pretrained(base, local_files_only=True)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    with_lora = _pixels(pipe, shape)
    assert torch.allclose(_ours(model, shape), with_lora, atol=1e-5)
    plain = _pixels(StableDiffusionPipeline.from_pretrained(base, local_files_only=True), shape)
    assert (plain - with_lora).abs().max() > 1e-3  # the adapters change the pictures
    merged = StableDiffusionPipeline.from_pretrained(str(tmp_path / "merged"), local_files_only=True)
    assert torch.allclose(_pixels(merged, shape), with_lora, atol=1e-4)
    pipe.fuse_lora()  # diffusers' own folding gives the very weights --merge wrote
    fused, ours = pipe.unet.state_dict(), merged.unet.state_dict()
    for name, tensor in ours.items():
        theirs = fused.get(name, fused.get(name.replace(".weight", ".base_layer.weight")))
        theirs = theirs if theirs is not None else fused[name.replace(".bias", ".base_layer.bias")]
        assert torch.allclose(tensor, theirs, atol=1e-6), name


def _train_and_export(tmp_path, base, shards, strategy: str, batch_size: int, steps: int = 2):
    """`steps` of LoRA on 2 ranks under `strategy`, exported to tmp_path/lora; the model load_trained gives."""
    run = tmp_path / "run"
    extra = [f"strategy={strategy}", "trainer.devices=2", f"trainer.max_steps={steps}", f"data.batch_size={batch_size}"]
    result = run_train(run, f"model.pretrained={base}", f"data.shards={shards}", *LORA, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = str(run / "checkpoints" / "last.ckpt")
    assert export_main([ckpt, str(tmp_path / "lora")]) == 0
    return load_trained(ckpt), [f"model.pretrained={base}", f"data.shards={shards}", *LORA, *extra]


def _bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def test_lora_on_sdxl_trains_under_ddp_and_loads_in_diffusers(tmp_path):
    base = save_tiny_sdxl_pipeline(tmp_path / "released")
    shards = bucketed_shards(tmp_path, str(base / "vae"), n=32)
    model, _ = _train_and_export(tmp_path, base, shards, "ddp", batch_size=2)
    pipe = StableDiffusionXLPipeline.from_pretrained(base, local_files_only=True)
    pipe.scheduler = build_scheduler("ddim", model.diffusion.scheduler_config())  # the release ships Euler
    pipe.load_lora_weights(str(tmp_path / "lora"))
    shape = (4, 12, 24)  # a non-square bucket
    assert torch.allclose(_ours(model, shape), _pixels(pipe, shape, height=24, width=48), atol=1e-5)


def test_a_target_module_that_does_not_exist_is_one_line(sd1_lora, tmp_path, dataset):
    base, _, _ = sd1_lora
    result = run_train(
        tmp_path / "bad",
        f"model.pretrained={base}",
        f"data.shards={dataset}",
        *LORA,
        "model.lora.target_modules=[to_qq]",
    )
    assert result.returncode == 2
    assert "model.lora.target_modules: 'to_qq' is no module of this U-Net" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "fsdp"])
def test_lora_under_sharding_checkpoints_small_resumes_bit_for_bit_and_exports(sd1_lora, tmp_path, dataset, strategy):
    """ZeRO writes the trained parameters only (exclude_frozen_parameters), FSDP's DCP the adapters only and
    reads back just those; both resume to the uninterrupted run's adapters and EMA exactly."""
    base, _, _ = sd1_lora
    model, args = _train_and_export(tmp_path, base, dataset, strategy, batch_size=4, steps=4)
    checkpoints = tmp_path / "run" / "checkpoints"
    # no base weights in it (full fine-tuning's would be ~3x the U-Net: weights + AdamW; here DCP's per-tensor
    # records dominate, the adapters of this tiny U-Net are ~50 KB)
    assert _bytes(checkpoints / "step_000002.ckpt") < _bytes(base / "unet") / 2
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoints / "step_000002.ckpt", resumed / "checkpoints" / "step_000002.ckpt")
    result = run_train(resumed, *args, "resume=auto")
    assert result.returncode == 0, result.stderr[-3000:]
    whole, again = (load_full_checkpoint(str(d / "last.ckpt")) for d in (checkpoints, resumed / "checkpoints"))
    assert (
        whole["global_step"] == again["global_step"] == 4 and whole["state_dict"].keys() == again["state_dict"].keys()
    )
    for name, tensor in whole["state_dict"].items():
        assert torch.equal(tensor, again["state_dict"][name]), name
    shadows = [c["callbacks"][next(k for k in c["callbacks"] if "EMA" in k)]["shadow"] for c in (whole, again)]
    assert shadows[0].keys() == shadows[1].keys() and all(torch.equal(shadows[0][k], shadows[1][k]) for k in shadows[0])
    pipe = StableDiffusionPipeline.from_pretrained(base, local_files_only=True)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    assert torch.allclose(_ours(model, model.latent_shape), _pixels(pipe, model.latent_shape), atol=1e-5)
