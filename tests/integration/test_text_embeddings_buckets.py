"""Pre-encoded text.npy (used only from the same text encoder) and aspect-ratio buckets through the loader."""

import json

import numpy as np
import pytest
import torch
from helpers import emoji_raw_tars, run_train

from sdtrain.data.loader import LatentDataConfig, LatentStream
from sdtrain.data.normalizer import LatentNormalizer
from sdtrain.data.shards import resolve_shards
from sdtrain.models.text_encoder import TextEncoderConfig, build_text_encoder, build_tokenizer
from sdtrain.prep.encode_cli import main as encode_main

pytestmark = pytest.mark.slow
TINY_TEXT = {"width": 128, "heads": 4, "layers": 3}  # conf/model/tiny.yaml's text tower


@pytest.fixture(scope="module")
def random_vae(tmp_path_factory):
    from diffusers import AutoencoderKL
    from omegaconf import OmegaConf

    from sdtrain.launch.config import compose_config

    config = OmegaConf.to_container(compose_config([]).model.vae.config)
    folder = tmp_path_factory.mktemp("vae") / "vae"
    AutoencoderKL.from_config(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    return emoji_raw_tars(tmp_path_factory.mktemp("raw"), count=64, per_tar=32)


def test_text_npy_trains_only_with_the_same_text_encoder(tmp_path, tars, random_vae):
    out = tmp_path / "latents"
    torch.manual_seed(0)  # the run seeds the same way before building its (random-init) tiny text tower
    args = [*map(str, tars), "--out", str(out), "--vae", random_vae, "--resolution", "32", "--workers", "0"]
    assert encode_main([*args, "--text-encoder", json.dumps(TINY_TEXT)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["text_encoder"] == {**TextEncoderConfig(**TINY_TEXT).identity(), "dtype": "float16"}

    # The stored states are the encoder's output for the caption.
    cfg = LatentDataConfig(
        shards=str(out), batch_size=4, num_workers=0, caption_dropout=0.5, text_embeddings=True, shuffle=False
    )
    stream = LatentStream(
        resolve_shards(str(out)), cfg, build_tokenizer(), latent_channels=4, normalizer=LatentNormalizer(1.0)
    )
    batch = next(iter(stream))
    assert batch["context"].shape == (4, 77, 128) and "tokens" not in batch and batch["dropped"].dtype == torch.bool
    torch.manual_seed(0)
    encoder = build_text_encoder(TextEncoderConfig(**TINY_TEXT))
    from sdtrain.data.shards import iter_raw_samples

    first = next(iter_raw_samples(resolve_shards(str(out)).shards[0].url, print))
    expected = encoder(build_tokenizer()([first["txt"].decode()]))[0]
    stored = torch.from_numpy(np.load(__import__("io").BytesIO(first["text.npy"])).astype(np.float32))
    assert torch.allclose(stored, expected, atol=2e-2)  # float16 storage

    ok = run_train(tmp_path / "run", f"data.shards={out}", "data.text_embeddings=true", "debug=fast")
    assert ok.returncode == 0, ok.stderr[-3000:]
    wrong = run_train(
        tmp_path / "wrong",
        f"data.shards={out}",
        "data.text_embeddings=true",
        "debug=fast",
        "model.text_encoder.layer=last",
        "model.unet.config.cross_attention_dim=128",
    )
    assert wrong.returncode == 2
    assert "text.npy came from another text encoder (layer: 'penultimate' there, 'last' in" in wrong.stderr
    assert "Traceback" not in wrong.stderr


def test_buckets_batch_one_shape_and_keep_ranks_in_step(tmp_path, random_vae):
    from helpers import write_raw_tar
    from PIL import Image

    samples = []
    for i in range(60):  # wide, tall and square images -> three buckets
        size = [(64, 32), (32, 64), (48, 48)][i % 3]
        buf = __import__("io").BytesIO()
        Image.new("RGB", size, (i * 4, 100, 200 - i * 3)).save(buf, "PNG")
        samples.append((f"{i:04d}", buf.getvalue(), f"image {i}".encode(), {}, "png"))
    write_raw_tar(tmp_path / "raw.tar", samples)
    out = tmp_path / "latents"
    assert (
        encode_main(
            [
                str(tmp_path / "raw.tar"),
                "--out",
                str(out),
                "--vae",
                random_vae,
                "--workers",
                "0",
                "--buckets",
                "32x32,48x24,24x48",
                "--samples-per-shard",
                "16",
            ]
        )
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["encode"]["latent_shapes"] == {"8x8x8": 20, "8x6x12": 20, "8x12x6": 20}

    shard_set = resolve_shards(str(out))
    cfg = LatentDataConfig(shards=str(out), batch_size=4, num_workers=2, shuffle_buffer=8, caption_dropout=0)
    per_rank = []
    for rank in range(2):
        stream = LatentStream(
            shard_set,
            cfg,
            build_tokenizer(),
            latent_channels=4,
            normalizer=LatentNormalizer(1.0),
            rank=rank,
            world_size=2,
        )
        batches = []
        for worker in range(2):
            import unittest.mock as mock

            info = mock.Mock(id=worker)
            with mock.patch("sdtrain.data.loader.get_worker_info", return_value=info):
                it = iter(stream)
                batches += [next(it) for _ in range(stream.plan(0).batches_per_slot)]
        per_rank.append(batches)
        for b in batches:  # one bucket per batch
            assert b["latents"].shape[0] == 4 and len({tuple(x.shape) for x in b["latents"]}) == 1
    assert len(per_rank[0]) == len(per_rank[1])  # ranks stay in step
    shapes = {tuple(b["latents"].shape[2:]) for r in per_rank for b in r}
    assert shapes == {(8, 8), (6, 12), (12, 6)}

    # Resume inside a bucketed epoch replays to exactly the batches the uninterrupted stream gave.
    cfg0 = LatentDataConfig(shards=str(out), batch_size=4, num_workers=0, shuffle_buffer=8, caption_dropout=0)
    full = LatentStream(shard_set, cfg0, build_tokenizer(), latent_channels=4, normalizer=LatentNormalizer(1.0))
    it = iter(full)
    reference = [next(it) for _ in range(9)]
    resumed = iter(
        LatentStream(
            shard_set, cfg0, build_tokenizer(), latent_channels=4, normalizer=LatentNormalizer(1.0), start_batch=5
        )
    )
    for expected in reference[5:]:
        got = next(resumed)
        assert got["keys"] == expected["keys"] and torch.equal(got["latents"], expected["latents"])
