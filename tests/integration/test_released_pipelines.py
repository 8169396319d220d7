"""Released SD 1.x / 2.x pipeline folders in and out: `model.pretrained=DIR` fine-tunes from one (U-Net, VAE,
transformers text encoder, tokenizer and schedule from the folder), the export loads and runs in plain diffusers
with no sdtrain code, and gives the pixels `sdtrain-sample` gives."""

import subprocess
import sys

import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import CAPTIONS, REPO, run_train
from pipelines import save_tiny_pipeline

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
    # plain diffusers, in a fresh process with no sdtrain import: the folder is complete
    code = (
        "import sys; from diffusers import StableDiffusionPipeline as P; "
        "p = P.from_pretrained(sys.argv[1], local_files_only=True); "
        "assert 'sdtrain' not in sys.modules; print(type(p.text_encoder).__name__, type(p.tokenizer).__name__)"
    )
    plain = subprocess.run([sys.executable, "-c", code, out], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert plain.stdout.split() == ["CLIPTextModel", "CLIPTokenizer"]

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


def test_folders_that_are_not_pipelines_are_one_line_errors(tmp_path, dataset):
    (tmp_path / "notapipe").mkdir()
    (tmp_path / "file.safetensors").write_bytes(b"x")
    cases = {
        str(tmp_path / "notapipe"): "is not a diffusers pipeline folder (no model_index.json)",
        str(tmp_path / "file.safetensors"): "is a single file: give a diffusers pipeline folder",
    }
    for path, message in cases.items():
        result = run_train(tmp_path / "run", f"model.pretrained={path}", f"data.shards={dataset}", "debug=fast")
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
