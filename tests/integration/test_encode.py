"""sdtrain-encode on real images: encode -> doctor -> loader; round trip; SIGKILL + re-run; ranks; bad inputs."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from helpers import REPO, emoji_subset, write_raw_tar
from PIL import Image

from sdtrain.data.loader import LatentDataConfig, LatentStream
from sdtrain.data.normalizer import LatentNormalizer
from sdtrain.data.shards import resolve_shards
from sdtrain.demo.emoji_images import emoji_pairs, load_pixels
from sdtrain.models.text_encoder import build_tokenizer
from sdtrain.prep.doctor import main as doctor_main
from sdtrain.prep.encode_cli import main as encode_main
from sdtrain.vae.metrics import psnr

pytestmark = pytest.mark.slow


def _encode(out, inputs, vae, *extra):
    args = [*map(str, inputs), "--out", str(out), "--vae", vae, "--resolution", "32", "--samples-per-shard", "10"]
    return encode_main([*args, "--workers", "0", "--batch-size", "4", *map(str, extra)])


def _files(folder):
    return {
        os.path.relpath(os.path.join(root, f), folder): open(os.path.join(root, f), "rb").read()
        for root, _, files in os.walk(folder)
        for f in files
    }


def test_encode_doctor_loader_and_round_trip(tmp_path, raw_tars, vae_dir, capsys):
    out = tmp_path / "latents"
    assert _encode(out, raw_tars, vae_dir, "--min-aesthetic", "5") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    aesthetic = [4.0 + (i % 5) for i in range(96)]
    assert manifest["encode"]["filtered"] == {"min_aesthetic": sum(a < 5 for a in aesthetic)}
    assert sum(s["num_samples"] for s in manifest["shards"]) == sum(a >= 5 for a in aesthetic)
    assert all(s["num_samples"] <= 10 for s in manifest["shards"])
    assert doctor_main([str(out), "--vae", vae_dir]) == 0
    report = capsys.readouterr().out
    assert "OK" in report and "channel_mean" in report and "decoded_pixels" in report

    shard_set = resolve_shards(str(out))
    cfg = LatentDataConfig(shards=str(out), batch_size=8, num_workers=0, shuffle_buffer=0, caption_dropout=0)
    stream = LatentStream(shard_set, cfg, build_tokenizer(), latent_channels=4, normalizer=LatentNormalizer(1.0))
    batch = next(iter(stream))
    assert batch["latents"].shape == (8, 4, 8, 8) and batch["tokens"].shape == (8, 77)

    # Round trip: the posterior means decode to the (downscaled) input far better than the mean image.
    from diffusers import AutoencoderKL

    from sdtrain.data.shards import iter_raw_samples

    vae = AutoencoderKL.from_pretrained(vae_dir)
    means, originals = [], []
    by_key = {f"{i:09d}": p for i, p in enumerate(emoji_subset(96))}
    for raw in iter_raw_samples(shard_set.shards[0].url, print):
        moments = np.load(io.BytesIO(raw["moments.npy"]))
        means.append(torch.from_numpy(moments[:4].astype(np.float32)))
        with Image.open(by_key[raw["__key__"]].path) as im:  # what the encoder saw: 40 px PNG -> 32 px crop
            im = im.convert("RGBA").resize((40, 40))
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, im).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)
        originals.append(torch.from_numpy(np.asarray(rgb, np.float32).transpose(2, 0, 1) / 127.5 - 1))
    x = torch.stack(originals)
    with torch.no_grad():
        recon = vae.decode(torch.stack(means)).sample
    ours, baseline = psnr(recon, x), psnr(x.mean(0, keepdim=True).expand_as(x), x)
    assert ours > baseline + 3, (ours, baseline)


def test_photos_from_a_folder_and_a_parquet_table(tmp_path, vae_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import skimage.data

    folder = tmp_path / "photos"
    folder.mkdir()
    names = ["astronaut", "camera", "coffee", "chelsea", "rocket", "logo"]  # RGB, grey, wide, RGBA
    for name in names:
        Image.fromarray(getattr(skimage.data, name)()).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a photo: {name}")
    out = tmp_path / "from_folder"
    assert _encode(out, [folder], vae_dir, "--resolution", "64", "--max-aspect-ratio", "1.502") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["latent_shape"] == [8, 16, 16]
    assert manifest["encode"]["filtered"] == {"aspect_ratio": 1}  # chelsea 451x300 = 1.503; coffee 1.5, rocket 1.499
    table = pa.table({"caption": [f"a photo: {n}" for n in names], "image_path": [f"photos/{n}.png" for n in names]})
    pq.write_table(table, tmp_path / "captions.parquet")
    assert _encode(tmp_path / "from_table", [tmp_path / "captions.parquet"], vae_dir, "--resolution", "64") == 0
    assert json.loads((tmp_path / "from_table" / "manifest.json").read_text())["encode"]["kept"] == len(names)


def test_bad_inputs_are_counted_skips(tmp_path, vae_dir):
    def png(mode, size=(40, 40), **kw):
        buf = io.BytesIO()
        image = Image.new(mode, size, **kw)
        if mode == "P":
            image.info["transparency"] = 0
        image.save(buf, "PNG" if mode != "CMYK" else "JPEG")
        return buf.getvalue()

    samples = [
        ("000", png("RGB", color=(200, 0, 0)), b"red", {}, "png"),
        ("001", b"\x89PNG garbage", b"corrupt image", {}, "png"),
        ("002", png("RGB"), None, {}, "png"),  # no caption
        ("003", png("RGB"), b"\xff\xfe not utf-8", {}, "png"),
        ("004", png("RGB", size=(4, 4)), b"tiny", {}, "png"),
        ("005", png("CMYK", color=(0, 255, 0, 0)), b"cmyk", {}, "jpg"),
        ("006", png("RGBA", color=(0, 0, 255, 128)), b"rgba", {}, "png"),
        ("007", png("P"), b"palette", {}, "png"),
        ("008", png("L", color=128), b"grey", {}, "png"),
    ]
    good = write_raw_tar(tmp_path / "good.tar", samples)
    whole = write_raw_tar(tmp_path / "whole.tar", [(f"1{i:02d}", png("RGB"), b"x", {}, "png") for i in range(8)])
    data = whole.read_bytes()
    (tmp_path / "truncated.tar").write_bytes(data[: len(data) // 2 + 100])
    whole.unlink()
    out = tmp_path / "out"
    assert _encode(out, [good, tmp_path / "truncated.tar"], vae_dir) == 0
    info = json.loads((out / "manifest.json").read_text())["encode"]
    assert info["skipped"] == {
        "bad_image": 1,
        "missing_caption": 1,
        "bad_caption": 1,
        "too_small": 1,
        "truncated_tar": 1,
    }
    assert 5 + 3 <= info["kept"] <= 5 + 4  # 5 good/converted in good.tar + the samples before the damage
    assert doctor_main([str(out)]) == 0


def test_sigkill_then_rerun_equals_an_uninterrupted_run_and_ranks_are_disjoint(tmp_path, raw_tars, vae_dir):
    reference = tmp_path / "reference"
    assert _encode(reference, raw_tars, vae_dir) == 0

    killed = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "sdtrain.prep.encode_cli",
        *map(str, raw_tars),
        "--out",
        str(killed),
        "--vae",
        vae_dir,
        "--resolution",
        "32",
        "--samples-per-shard",
        "10",
        "--workers",
        "0",
        "--batch-size",
        "2",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list((killed / "parts").glob("*.json"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists()  # killed before the end
    assert _encode(killed, raw_tars, vae_dir) == 0
    assert _files(killed) == _files(reference)  # same shards, same bytes, no .tmp left, same manifest

    ranks = tmp_path / "ranks"
    assert _encode(ranks, raw_tars, vae_dir, "--rank", "0", "--world-size", "2") == 0
    assert not (ranks / "manifest.json").exists()  # rank 1's parts are missing
    rank0 = set(_files(ranks))
    assert _encode(ranks, raw_tars, vae_dir, "--rank", "1", "--world-size", "2") == 0
    rank1 = set(_files(ranks)) - rank0 - {"manifest.json"}
    assert rank0 & rank1 == set() and rank0 and rank1
    assert _files(ranks) == _files(reference)  # the union is the single-rank output, byte for byte


def test_doctor_flags_unnormalised_pixels_and_broken_sets(tmp_path, vae_dir, capsys):
    from diffusers import AutoencoderKL

    from sdtrain.prep.shard_writer import LatentSample, write_shards
    from sdtrain.vae.metrics import encode_moments

    vae = AutoencoderKL.from_pretrained(vae_dir)
    pairs = emoji_pairs()[::11][:48]
    pixels = load_pixels(pairs, 32)
    # the scaling factor a set records for its VAE (1 / latent std, as SD's 0.18215 was measured): this tiny VAE's
    # latent std depends on its 300 training steps, so no fixed factor fits it
    scale = None
    for name, x in (("normalised", pixels), ("zero_one", (pixels + 1) / 2)):  # MLPerf's mistake: [0, 1] pixels
        with torch.no_grad():
            moments = encode_moments(vae, torch.from_numpy(x)).numpy()
        scale = scale or float(1.0 / moments[:, :4].std())
        samples = (LatentSample(f"{i:04d}", m, p.caption) for i, (p, m) in enumerate(zip(pairs, moments, strict=True)))
        write_shards(samples, str(tmp_path / name), samples_per_shard=16, vae={"scaling_factor": scale})
    assert doctor_main([str(tmp_path / "normalised"), "--vae", vae_dir, "--strict"]) == 0
    capsys.readouterr()
    assert doctor_main([str(tmp_path / "zero_one"), "--vae", vae_dir]) == 0  # a warning, not an error
    assert "probably encoded without normalising pixels to [-1, 1]" in capsys.readouterr().out
    assert doctor_main([str(tmp_path / "zero_one"), "--vae", vae_dir, "--strict"]) == 1

    shard = tmp_path / "normalised" / "000001.tar"
    shard.write_bytes(shard.read_bytes()[:5000])  # truncated: fewer samples than the manifest says
    assert doctor_main([str(tmp_path / "normalised")]) == 1
    report = capsys.readouterr().out
    assert "manifest says 16 samples, the tar has" in report and "FAILED" in report


def test_mlperf_sd2_shards_are_read_unchanged(tmp_path, capsys):
    """MLPerf SD v2: `npy` moments (1, 8, 64, 64) float32 + txt, no manifest."""
    rng = np.random.default_rng(0)
    for t in range(2):
        samples = [(f"{t}{i:05d}", None, f"caption {i}".encode(), None, "npy") for i in range(6)]
        tar_samples = []
        for key, _, caption, _, _ in samples:
            buf = io.BytesIO()
            np.save(buf, rng.normal(size=(1, 8, 64, 64)).astype(np.float32) * 5)
            tar_samples.append((key, buf.getvalue(), caption, None, "npy"))
        write_raw_tar(tmp_path / f"{t:05d}.tar", tar_samples)
    pattern = str(tmp_path / "{00000..00001}.tar")
    shard_set = resolve_shards(pattern)
    assert shard_set.total_samples == 12
    cfg = LatentDataConfig(shards=pattern, batch_size=4, num_workers=0, latent_key="npy", caption_dropout=0)
    batch = next(
        iter(LatentStream(shard_set, cfg, build_tokenizer(), latent_channels=4, normalizer=LatentNormalizer(0.18215)))
    )
    assert batch["latents"].shape == (4, 4, 64, 64)
    assert doctor_main([pattern, "--latent-key", "npy"]) == 0
    assert "8x64x64" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--vae", "/nonexistent"], "--vae /nonexistent is not a diffusers AutoencoderKL folder"),
        (["--text-encoder", '{"colour": 1}'], "--text-encoder: "),
        (["--text-encoder", "{not json"], "--text-encoder is neither a pipeline folder nor JSON"),
        (["--buckets", "512by512"], "--buckets wants WxH"),
    ],
)
def test_encode_bad_arguments_are_one_line_before_any_worker_starts(tmp_path, raw_tars, vae_dir, capsys, args, message):
    base = [str(raw_tars[0]), "--out", str(tmp_path / "o"), "--vae", vae_dir, "--workers", "2"]
    assert encode_main(base + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    missing = encode_main([str(tmp_path / "missing.tar"), "--out", str(tmp_path / "o"), "--vae", vae_dir])
    assert missing == 2 and "input not found" in capsys.readouterr().err


def test_loss_masks_go_through_the_images_resize_and_crop(tmp_path, vae_dir, capsys):
    """NAME.mask.png beside an image becomes a latent-size mask.npy (averaged down after the image's own resize and
    crop); a mask of another size is a counted bad_loss_mask skip; an image without one gets none."""
    folder = tmp_path / "masked"
    folder.mkdir()
    half = np.zeros((64, 96), np.uint8)
    half[:, :48] = 255  # left half: learn
    for name, mask in [("left", half), ("wrong_size", half[:32]), ("none", None)]:
        Image.fromarray(np.full((64, 96, 3), 90, np.uint8)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(name)
        if mask is not None:
            Image.fromarray(mask).save(folder / f"{name}.mask.png")
    out = tmp_path / "out"
    assert _encode(out, [folder], vae_dir) == 0  # 96x64 -> 48x32 -> centre crop 32x32 -> latents 8x8
    info = json.loads((out / "manifest.json").read_text())["encode"]
    assert info["skipped"] == {"bad_loss_mask": 1} and info["kept"] == 2
    samples = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                samples[member.name] = tar.extractfile(member).read()
    assert not any(name.startswith("none.mask") for name in samples)
    mask = np.load(io.BytesIO(samples["left.mask.npy"]))
    assert mask.shape == (8, 8) and mask.dtype == np.float16
    # the crop keeps columns 8..40 of 48, the mask's edge at 24: latent columns 0-3 learn, 4-7 do not
    assert (mask[:, :3] == 1).all() and (mask[:, 5:] == 0).all() and mask.mean() == pytest.approx(0.5, abs=0.02)
    assert doctor_main([str(out)]) == 0
    assert "optional members: {'loss_mask': 1}" in capsys.readouterr().out
