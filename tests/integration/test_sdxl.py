"""SDXL end to end on a tiny StableDiffusionXLPipeline folder saved by diffusers itself: prompts encoded as
diffusers' encode_prompt does, micro-conditioning from the shards' json, bucketed training + validation with
mixed shapes, resume bit for bit, export that plain StableDiffusionXLPipeline runs at a non-square bucket with
sdtrain's pixels, single file out and back in, and one-line errors."""

import dataclasses
import io
import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from helpers import CAPTIONS, run_train, write_raw_tar
from PIL import Image
from pipelines import save_tiny_sdxl_pipeline

from sdtrain.checkpoint.files import load_full_checkpoint
from sdtrain.checkpoint.trained import load_trained
from sdtrain.data.loader import LatentDataConfig, LatentStream
from sdtrain.data.normalizer import LatentNormalizer
from sdtrain.data.shards import iter_raw_samples, resolve_shards
from sdtrain.diffusion.sampling import SamplingConfig, initial_noise
from sdtrain.export.diffusers_folder import export_diffusers
from sdtrain.models.builder import ModelConfig, build_model
from sdtrain.models.conditioning import encode_text
from sdtrain.prep.encode_cli import main as encode_main
from sdtrain.sample.cli import sample_images

pytestmark = pytest.mark.slow
BUCKETS = "32x32,48x24,24x48"  # pixels; the tiny VAE halves them: latents 16x16, 12x24, 24x12
RUN = [
    "debug=fast",
    "trainer.max_steps=4",
    "data.batch_size=4",
    "data.caption_dropout=0.3",
    "callbacks.checkpoint.every_n_steps=2",
    "callbacks.checkpoint.keep_last=-1",
    "callbacks.validation.every_n_steps=2",
    "callbacks.ema.decay=0.9",
]


def bucketed_shards(root, vae: str, n: int = 48, *extra: str):
    samples = []
    for i in range(n):  # wide, tall and square images of several sizes -> three buckets, varied crops
        size = [(64, 32), (32, 64), (48, 48), (90, 40)][i % 4]
        buf = io.BytesIO()
        Image.new("RGB", size, (i * 5, 100, 200 - i * 3)).save(buf, "PNG")
        samples.append((f"{i:04d}", buf.getvalue(), CAPTIONS[i % len(CAPTIONS)].encode(), {}, "png"))
    write_raw_tar(root / "raw.tar", samples)
    out = root / "latents"
    args = [str(root / "raw.tar"), "--out", str(out), "--vae", vae, "--workers", "0", "--buckets", BUCKETS]
    assert encode_main([*args, "--samples-per-shard", "16", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    folder = save_tiny_sdxl_pipeline(root / "released")
    return folder, bucketed_shards(root, str(folder / "vae"))


@pytest.fixture(scope="module")
def trained(sdxl, tmp_path_factory):
    folder, shards = sdxl
    run = tmp_path_factory.mktemp("run") / "a"
    args = [f"model.pretrained={folder}", f"data.shards={shards}", f"data.val_shards={shards}", *RUN]
    result = run_train(run, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return run, args


def test_prompts_encode_as_diffusers_sdxl_pipeline_does(sdxl):
    folder, _ = sdxl
    parts = build_model(ModelConfig(pretrained=str(folder)))
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    prompts = ["a red apple", "grinning face", "x " * 100]
    context, negative, pooled, negative_pooled = pipe.encode_prompt(prompts, device="cpu")
    ours = encode_text(parts.text_encoder, parts.tokenizer(prompts))
    assert ours.context.shape == (3, 77, 80) and ours.pooled.shape == (3, 40)
    assert torch.equal(ours.context, context) and torch.equal(ours.pooled, pooled)
    assert not negative.any() and not negative_pooled.any()  # force_zeros_for_empty_prompt: what sdtrain drops to


def test_time_ids_come_from_each_samples_json(sdxl):
    folder, shards = sdxl
    parts = build_model(ModelConfig(pretrained=str(folder)))
    shard_set = resolve_shards(str(shards))
    cfg = LatentDataConfig(shards=str(shards), batch_size=4, num_workers=0, shuffle=False, caption_dropout=0.5)
    stream = LatentStream(
        shard_set, cfg, parts.tokenizer, latent_channels=4, normalizer=LatentNormalizer(0.13025), micro_conditioning=2
    )
    meta = {}
    for shard in shard_set.shards:
        for raw in iter_raw_samples(shard.url, print):
            meta[raw["__key__"]] = json.loads(raw["json"])
    seen = 0
    for batch in [b for b, _ in zip(stream, range(6), strict=False)]:
        assert batch["tokens"].shape == (4, 2, 77) and batch["dropped"].dtype == torch.bool
        h, w = (s * 2 for s in batch["latents"].shape[-2:])
        for key, row in zip(batch["keys"], batch["time_ids"].tolist(), strict=True):
            m = meta[key]
            assert row == [m["original_height"], m["original_width"], m["crop_top"], m["crop_left"], h, w]
            seen += m["crop_left"] > 0 or m["crop_top"] > 0
    assert seen  # some samples were cropped: the crop really is read


def test_bucketed_sdxl_run_validates_all_shapes_and_resumes_bit_for_bit(trained):
    run, args = trained
    log = (run / "train.log").read_text()
    assert "validation: 48 held-out samples" in log and "val/loss" in log
    grids = sorted(p.name for p in (run / "samples").glob("step_000004_*.png"))
    assert grids == ["step_000004_24x48.png", "step_000004_32x32.png", "step_000004_48x24.png"]  # one per bucket
    checkpoint = load_full_checkpoint(str(run / "checkpoints" / "last.ckpt"))
    spec = checkpoint["sdtrain"]["spec"]
    assert spec["text_model_2"]["config"]["class"] == "CLIPTextModelWithProjection"
    assert spec["normalizer"]["scale"] == pytest.approx(0.13025)  # SDXL's own VAE scaling, from the folder

    resumed = run.parent / "b"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy2(run / "checkpoints" / "step_000002.ckpt", resumed / "checkpoints")
    result = run_train(resumed, *args, "resume=auto")
    assert result.returncode == 0, result.stderr[-3000:]
    again = load_full_checkpoint(str(resumed / "checkpoints" / "last.ckpt"))
    assert checkpoint["global_step"] == again["global_step"] == 4
    for name, tensor in checkpoint["state_dict"].items():
        assert torch.equal(tensor, again["state_dict"][name]), name


def test_export_runs_in_plain_diffusers_at_a_non_square_bucket_with_the_same_pixels(trained, tmp_path):
    run, _ = trained
    model = load_trained(str(run / "checkpoints" / "last.ckpt"))
    out = export_diffusers(model, str(tmp_path / "export"), single_file=str(tmp_path / "sdxl.safetensors"))
    pipe = StableDiffusionXLPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pairs, shape = [("grinning face", 0), ("red apple", 1)], (4, 12, 24)  # a 48x24 px bucket
    cfg = SamplingConfig(prompts=[p for p, _ in pairs], seeds=[0], steps=3, guidance=3.0)
    ours = sample_images(model, pairs, cfg, batch_size=2, latent_shape=shape)
    with torch.no_grad():
        theirs = pipe(
            [p for p, _ in pairs],
            height=24,
            width=48,
            latents=initial_noise([s for _, s in pairs], shape, torch.device("cpu")),
            num_inference_steps=3,
            guidance_scale=3.0,
            output_type="pt",
        ).images
    assert ours.shape == theirs.shape == (2, 3, 24, 48)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()

    single = StableDiffusionXLPipeline.from_single_file(
        str(tmp_path / "sdxl.safetensors"), config=out, local_files_only=True
    )
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):  # the single file holds the same tensors
        left, right = getattr(pipe, part).state_dict(), getattr(single, part).state_dict()
        assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left), part


def test_a_single_file_with_its_configs_starts_a_run(trained, sdxl, tmp_path, monkeypatch):
    run, _ = trained
    folder, shards = sdxl
    monkeypatch.setenv("SDTRAIN_CACHE", str(tmp_path / "cache"))
    out = export_diffusers(
        load_trained(str(run / "checkpoints" / "last.ckpt")),
        str(tmp_path / "export"),
        single_file=str(tmp_path / "f.safetensors"),
    )
    result = run_train(
        tmp_path / "run",
        f"model.pretrained={tmp_path / 'f.safetensors'}",
        f"model.pretrained_config={out}",
        f"data.shards={shards}",
        "debug=fast",
        "data.batch_size=4",
        "trainer.max_steps=1",
        env={"SDTRAIN_CACHE": str(tmp_path / "cache")},
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_sdxl_mistakes_are_one_line(sdxl, tmp_path):
    folder, shards = sdxl
    broken = save_tiny_sdxl_pipeline(tmp_path / "no_te2", drop="text_encoder_2")
    other = save_tiny_sdxl_pipeline(tmp_path / "other", seed=1)  # another VAE made these latents' model
    cases = {
        "missing text_encoder_2": ([f"model.pretrained={broken}"], "has no text_encoder_2/ folder"),
        "latents of another VAE": ([f"model.pretrained={other}"], "another VAE"),
    }
    for name, (overrides, message) in cases.items():
        result = run_train(tmp_path / name.replace(" ", "_"), *overrides, f"data.shards={shards}", "debug=fast")
        assert result.returncode != 0, name
        assert message in result.stderr and "Traceback" not in result.stderr, (name, result.stderr[-2000:])


def test_pre_encoded_sdxl_text_is_what_training_encodes(sdxl, tmp_path):
    """sdtrain-encode --text-encoder DIR stores both encoders' states (text.npy) and the pooled embedding
    (pooled.npy); the loader's batches carry them, equal to encoding the captions (to float16), and dropped
    captions become zeros as with tokens; the manifest's identities are checked for both encoders."""
    from sdtrain.data.probe import check_text_embeddings
    from sdtrain.diffusion.objective import DiffusionConfig, DiffusionObjective
    from sdtrain.errors import DataError
    from sdtrain.training.module import LatentDiffusionModule
    from sdtrain.training.optim import OptimConfig

    folder, _ = sdxl
    out = bucketed_shards(tmp_path, str(folder / "vae"), 16, "--text-encoder", str(folder))
    manifest = json.loads((out / "manifest.json").read_text())
    parts = build_model(ModelConfig(pretrained=str(folder)))
    check_text_embeddings(manifest, parts.text_config, parts.text_config_2)  # the same encoders: accepted

    cfg = LatentDataConfig(
        shards=str(out), batch_size=4, num_workers=0, shuffle=False, caption_dropout=0.5, text_embeddings=True
    )
    stream = LatentStream(
        resolve_shards(str(out)),
        cfg,
        parts.tokenizer,
        latent_channels=4,
        normalizer=LatentNormalizer(0.13025),
        micro_conditioning=2,
    )
    captions = {
        r["__key__"]: r["txt"].decode() for s in resolve_shards(str(out)).shards for r in iter_raw_samples(s.url, print)
    }
    module = LatentDiffusionModule(
        unet=parts.unet,
        text_encoder=parts.text_encoder,
        vae=parts.vae,
        tokenizer=parts.tokenizer,
        objective=DiffusionObjective(DiffusionConfig()),
        optim=OptimConfig(),
        normalizer=LatentNormalizer(0.13025),
        latent_shape=(4, 16, 16),
        seed=0,
    )
    dropped = 0
    for batch in [b for b, _ in zip(stream, range(4), strict=False)]:
        assert batch["context"].shape == (4, 77, 80) and batch["pooled"].shape == (4, 40)
        expected = encode_text(parts.text_encoder, parts.tokenizer([captions[k] for k in batch["keys"]]))
        torch.testing.assert_close(batch["context"], expected.context, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(batch["pooled"], expected.pooled, atol=2e-3, rtol=2e-3)
        states = module.text_states(batch)
        for row, drop in enumerate(batch["dropped"].tolist()):
            dropped += drop
            assert (states.context[row].abs().sum() == 0) == drop and (states.pooled[row].abs().sum() == 0) == drop
    assert dropped

    one_encoder = {k: v for k, v in manifest.items() if k != "text_encoder_2"}
    other_second = {**manifest, "text_encoder_2": {**manifest["text_encoder_2"], "weights_sha256": "0" * 64}}
    for bad, message in [
        (one_encoder, "came from one text encoder(s), this run has SDXL's two"),
        (other_second, "weights_sha256: '000"),
    ]:
        with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
            check_text_embeddings(bad, parts.text_config, parts.text_config_2)
    with pytest.raises(DataError, match="came from SDXL's two"):
        check_text_embeddings(manifest, parts.text_config)

    run = tmp_path / "run"
    result = run_train(
        run,
        f"model.pretrained={folder}",
        f"data.shards={out}",
        "data.text_embeddings=true",
        "debug=fast",
        "data.batch_size=4",
        "trainer.max_steps=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pre-encoded text" in (run / "train.log").read_text()


def test_a_from_scratch_sdxl_with_open_clip_towers_exports_to_plain_diffusers(sdxl, tmp_path):
    """model=sdxl's OpenCLIP towers become the CLIPTextModel + CLIPTextModelWithProjection SDXL pipelines load:
    diffusers' encode_prompt gives sdtrain's states and pooled embedding, its pipeline sdtrain's pixels, and the
    single file reads back to the same tensors."""
    from pipelines import TINY_VAE

    from sdtrain.checkpoint.trained import TrainedModel
    from sdtrain.diffusion.objective import DiffusionConfig
    from sdtrain.models.diffusers_parts import UNetConfig, VAEConfig
    from sdtrain.models.text_encoder import TextEncoderConfig

    folder, _ = sdxl
    unet = json.loads((folder / "unet" / "config.json").read_text())
    unet = {k: v for k, v in unet.items() if not k.startswith("_")} | {"projection_class_embeddings_input_dim": 48 + 48}
    towers = [TextEncoderConfig(width=w, heads=4, layers=3, layer="penultimate") for w in (32, 48)]
    torch.manual_seed(0)
    cfg = ModelConfig(unet=UNetConfig(config=unet), vae=VAEConfig(config=TINY_VAE), text_encoder=towers[0])
    parts = build_model(dataclasses.replace(cfg, text_encoder_2=towers[1]))
    with torch.no_grad():  # open_clip's init leaves biases and LayerNorms trivial: perturb every tensor
        for p in parts.text_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model = TrainedModel(
        unet=parts.unet,
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        text_config=parts.text_config,
        tokenizer=parts.tokenizer,
        normalizer=LatentNormalizer(0.13025),
        diffusion=DiffusionConfig(),
        latent_shape=(4, 8, 8),
        step=0,
        weights="raw",
        text_config_2=parts.text_config_2,
    )
    out = export_diffusers(model, str(tmp_path / "export"), single_file=str(tmp_path / "sdxl.safetensors"))
    pipe = StableDiffusionXLPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red apple", "grinning face", "x " * 100]
    context, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu")
    ours = encode_text(parts.text_encoder, parts.tokenizer(prompts))
    assert context.shape == (3, 77, 80) and pooled.shape == (3, 48)
    assert torch.allclose(ours.context, context, atol=1e-5) and torch.allclose(ours.pooled, pooled, atol=1e-5)

    pairs, shape = [("grinning face", 0), ("red apple", 1)], (4, 12, 24)
    cfg = SamplingConfig(prompts=[p for p, _ in pairs], seeds=[0], steps=3, guidance=3.0)
    noise = initial_noise([s for _, s in pairs], shape, torch.device("cpu"))
    with torch.no_grad():
        theirs = pipe(
            [p for p, _ in pairs],
            height=24,
            width=48,
            latents=noise,
            num_inference_steps=3,
            guidance_scale=3.0,
            output_type="pt",
        ).images
    assert torch.allclose(sample_images(model, pairs, cfg, batch_size=2, latent_shape=shape), theirs, atol=1e-5)
    single = StableDiffusionXLPipeline.from_single_file(
        str(tmp_path / "sdxl.safetensors"), config=out, local_files_only=True
    )
    for part in ("text_encoder", "text_encoder_2"):
        left, right = getattr(pipe, part).state_dict(), getattr(single, part).state_dict()
        assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left), part


def test_an_fp16_fix_style_vae_folder_takes_the_folders_vae_place(sdxl, tmp_path):
    """SDXL users swap in another VAE of the same layout (madebyollin's fp16-fix): model.vae.pretrained=DIR with
    latents encoded by that VAE trains, its scaling factor is the one used, and the folder's own VAE is refused."""
    folder, _ = sdxl
    other = save_tiny_sdxl_pipeline(tmp_path / "other", seed=1)  # another AutoencoderKL, same config
    config = json.loads((other / "vae" / "config.json").read_text())
    (other / "vae" / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.2}))
    shards = bucketed_shards(tmp_path, str(other / "vae"), 16)
    run = tmp_path / "run"
    args = [f"model.pretrained={folder}", f"data.shards={shards}", "debug=fast", "data.batch_size=4"]
    result = run_train(run, *args, f"model.vae.pretrained={other / 'vae'}", "trainer.max_steps=1")
    assert result.returncode == 0, result.stderr[-3000:]
    spec = load_full_checkpoint(str(run / "checkpoints" / "last.ckpt"))["sdtrain"]["spec"]
    assert spec["normalizer"]["scale"] == pytest.approx(0.2)
    refused = run_train(tmp_path / "refused", *args)
    assert refused.returncode == 2 and "another VAE" in refused.stderr.strip().splitlines()[-1]
