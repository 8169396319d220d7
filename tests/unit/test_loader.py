import io
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from helpers import latent_stream, make_dataset, take_batches

from sdtrain.data.loader import LatentDataConfig, LatentStream
from sdtrain.data.normalizer import LatentNormalizer
from sdtrain.data.probe import probe_dataset
from sdtrain.data.shards import resolve_shards
from sdtrain.errors import DataError
from sdtrain.models.text_encoder import build_tokenizer
from sdtrain.prep.shard_writer import npy_bytes

TOKENIZER = build_tokenizer()


def stream(spec, rank=0, world=1, start_batch=0, **cfg):
    return latent_stream(spec, rank=rank, world=world, start_batch=start_batch, **cfg)


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(dataset):
    keys = []
    for rank in range(2):
        ds = stream(dataset, rank=rank, world=2, caption_dropout=0.0)
        per_rank = ds.plan(0).batches_per_slot * ds.workers  # one epoch of this rank
        batches = take_batches(ds, per_rank)
        assert all(b["latents"].shape == (4, 4, 8, 8) for b in batches)
        keys += [k for b in batches for k in b["keys"]]
    assert len(keys) == 64 and len(set(keys)) == 64


def test_every_rank_yields_the_same_number_of_batches_with_uneven_shards(tmp_path):
    """Shards of 16,16,16,16,6 over 2 ranks x 2 workers: each rank's real stream gives 70 // (4 slots x 4) = 4
    batches per epoch, full and of distinct samples; over the epoch no sample is read twice."""

    manifest = make_dataset(tmp_path, n=70, per_shard=16)
    per_rank_epoch = (70 // (4 * 4)) * 2  # batches per slot x workers
    seen = []
    for rank in range(2):
        batches = take_batches(stream(manifest, rank=rank, world=2, caption_dropout=0.0), per_rank_epoch + 2)
        first_epoch = batches[:per_rank_epoch]
        assert all(len(b["keys"]) == 4 for b in batches)
        keys = [k for b in first_epoch for k in b["keys"]]
        assert len(keys) == len(set(keys)) == per_rank_epoch * 4
        seen += keys
        # the stream goes on into the next epoch: the rank never runs short of its peers
        assert all(len(b["keys"]) == 4 for b in batches[per_rank_epoch:])
    assert len(seen) == len(set(seen)) == 64  # 6 samples (less than a global batch) wait for the next epoch


def test_caption_dropout_rate_within_tolerance(dataset):
    batches = take_batches(stream(dataset, caption_dropout=0.3), 320)  # 1,280 captions
    tokens = torch.cat([b["tokens"] for b in batches])
    empty = (tokens[:, 1] == TOKENIZER.eot_token_id).float().mean().item()
    assert abs(empty - 0.3) < 0.05  # 4 sigma of a binomial(1280, 0.3) rate


def test_resumed_stream_continues_exactly(dataset):
    full = take_batches(stream(dataset), 13)
    resumed = take_batches(stream(dataset, start_batch=5), 8)
    for a, b in zip(full[5:], resumed, strict=True):
        assert a["keys"] == b["keys"]
        assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["tokens"], b["tokens"])


def test_normalizer_applies_shift_then_scale(dataset):
    z = np.ones((4, 2, 2), np.float32) * 3
    norm = LatentNormalizer(scale=0.5, shift=[1.0, 2.0, 3.0, 4.0])
    x = norm.normalize(z)
    assert np.allclose(x[:, 0, 0], [1.0, 0.5, 0.0, -0.5])
    assert torch.allclose(norm.denormalize(torch.from_numpy(x)), torch.from_numpy(z))


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _bad_shard(path):
    good = np.zeros((8, 8, 8), np.float16)
    with tarfile.open(path, "w") as tar:
        for i in range(12):
            _add(tar, f"g{i:03d}.moments.npy", npy_bytes(good))
            _add(tar, f"g{i:03d}.txt", f"good {i}".encode())
        _add(tar, "b1.moments.npy", b"not a npy file")
        _add(tar, "b1.txt", b"bad npy")
        _add(tar, "b2.moments.npy", npy_bytes(good))  # no caption
        _add(tar, "b3.moments.npy", npy_bytes(good))
        _add(tar, "b3.txt", b"\xff\xfe bad utf8")
        _add(tar, "b4.moments.npy", npy_bytes(np.full((8, 8, 8), np.nan, np.float32)))
        _add(tar, "b4.txt", b"nan")
        _add(tar, "b5.moments.npy", npy_bytes(np.zeros((6, 8, 8), np.float32)))  # 3 channels
        _add(tar, "b5.txt", b"wrong channels")
        _add(tar, "b6.moments.npy", npy_bytes(np.zeros((8, 8), np.float32)))
        _add(tar, "b6.txt", b"wrong rank")
        _add(tar, "b7.moments.npy", npy_bytes(np.zeros((8, 8, 8), np.int32)))
        _add(tar, "b7.txt", b"int dtype")


def test_corrupt_samples_and_truncated_shard_are_skipped_and_counted(tmp_path):
    _bad_shard(tmp_path / "000000.tar")
    _bad_shard(tmp_path / "000001.tar")
    whole = (tmp_path / "000001.tar").read_bytes()
    (tmp_path / "000001.tar").write_bytes(whole[: len(whole) // 3])  # truncated mid-file
    ds = stream(f"{tmp_path}/*.tar", num_workers=0, shuffle_buffer=0, caption_dropout=0.0, batch_size=2)
    skipped = Counter()
    for batch in take_batches(ds, 12):
        skipped.update(batch["skipped"])
        assert torch.isfinite(batch["latents"]).all()
    assert skipped["bad_npy"] >= 1 and skipped["missing_caption"] >= 1 and skipped["bad_caption"] >= 1
    assert skipped["non_finite"] >= 1 and skipped["wrong_channels"] >= 1 and skipped["bad_shape"] >= 1
    assert skipped["bad_dtype"] >= 1


def test_probe_names_missing_caption_and_wrong_channels(tmp_path):
    with tarfile.open(tmp_path / "000000.tar", "w") as tar:
        _add(tar, "a.moments.npy", npy_bytes(np.zeros((8, 4, 4), np.float16)))
    cfg = LatentDataConfig(shards=str(tmp_path / "000000.tar"))
    with pytest.raises(DataError, match="000000.tar, sample 'a': missing_caption"):
        probe_dataset(resolve_shards(cfg.shards), cfg, latent_channels=4)
    with tarfile.open(tmp_path / "000000.tar", "w") as tar:
        _add(tar, "a.moments.npy", npy_bytes(np.zeros((8, 4, 4), np.float16)))
        _add(tar, "a.txt", b"caption")
    assert probe_dataset(resolve_shards(cfg.shards), cfg, latent_channels=4) == (4, 4, 4)
    with pytest.raises(DataError, match="4 latent channels, model expects 16"):
        probe_dataset(resolve_shards(cfg.shards), cfg, latent_channels=16)


def test_zero_byte_shard(tmp_path, dataset):
    import json
    import shutil

    for name in ("000000.tar", "000001.tar"):
        shutil.copy(dataset.parent / name, tmp_path / name)
    (tmp_path / "000002.tar").write_bytes(b"")
    with pytest.raises(DataError, match="cannot read shard .*000002.tar"):  # counted at start without a manifest
        resolve_shards(f"{tmp_path}/*.tar")
    manifest = json.loads(dataset.read_text())
    manifest["shards"] = [{"url": f"00000{i}.tar", "num_samples": 16} for i in range(3)]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    ds = stream(tmp_path / "manifest.json", num_workers=0, shuffle=False)  # one slot reads all three shards
    skipped = Counter()
    for batch in take_batches(ds, 24):  # two epochs
        skipped.update(batch["skipped"])
    assert skipped["shard_error"] >= 1


def test_resume_is_exact_with_bad_samples_in_the_consumed_part(tmp_path):
    good = np.zeros((8, 8, 8), np.float16)
    with tarfile.open(tmp_path / "000000.tar", "w") as tar:
        for i in range(30):  # every third sample has no caption
            _add(tar, f"s{i:03d}.moments.npy", npy_bytes(good + i))
            if i % 3:
                _add(tar, f"s{i:03d}.txt", f"caption {i}".encode())
    spec = f"{tmp_path}/*.tar"
    options = dict(num_workers=0, batch_size=2, caption_dropout=0.5, shuffle_buffer=4)
    full = take_batches(stream(spec, **options), 9)
    resumed = take_batches(stream(spec, start_batch=4, **options), 5)
    for a, b in zip(full[4:], resumed, strict=True):
        assert a["keys"] == b["keys"] and torch.equal(a["latents"], b["latents"])
        assert torch.equal(a["tokens"], b["tokens"])


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def test_loss_masks_are_read_at_latent_or_pixel_size_and_bad_ones_skipped(tmp_path, caplog):
    """diffusion.masked_loss: mask.npy (float or uint8) at latent size, mask.png at 8x (averaged down), none =
    ones; a mask of the wrong size, unreadable or outside [0, 1] is a counted bad_loss_mask skip."""
    moments = npy_bytes(np.zeros((8, 8, 8), np.float16))
    half = np.zeros((64, 64), np.uint8)
    half[:, :32] = 255
    with tarfile.open(tmp_path / "000000.tar", "w") as tar:
        for key, member, data in [
            ("b1", "mask.npy", npy_bytes(np.ones((5, 5), np.float32))),
            ("b2", "mask.png", b"not a png"),
            ("b3", "mask.npy", npy_bytes(np.full((8, 8), 2.0, np.float32))),
            ("s0", "mask.npy", npy_bytes(np.full((8, 8), 0.25, np.float32))),
            ("s1", "mask.png", _png(half)),
            ("s2", None, None),
            ("s3", "mask.npy", npy_bytes(np.full((8, 8), 255, np.uint8))),
            ("s4", None, None),  # 8 samples: the epoch plan reads whole batches of 4 (bad samples count)
        ]:
            _add(tar, f"{key}.moments.npy", moments)
            _add(tar, f"{key}.txt", key.encode())
            if member:
                _add(tar, f"{key}.{member}", data)
    spec = str(tmp_path / "000000.tar")
    cfg = LatentDataConfig(shards=spec, batch_size=4, num_workers=0, shuffle_buffer=0, caption_dropout=0.0)
    ds = LatentStream(
        resolve_shards(spec), cfg, TOKENIZER, latent_channels=4, normalizer=LatentNormalizer(), masked_loss=True
    )
    batch = take_batches(ds, 1)[0]
    assert batch["keys"] == ["s0", "s1", "s2", "s3"] and batch["skipped"] == {"bad_loss_mask": 3}
    mask = batch["loss_mask"]
    assert mask.shape == (4, 1, 8, 8) and mask.dtype == torch.float32
    assert torch.all(mask[0] == 0.25) and torch.all(mask[2] == 1.0) and torch.all(mask[3] == 1.0)
    assert torch.all(mask[1, 0, :, :4] == 1.0) and torch.all(mask[1, 0, :, 4:] == 0.0)
    with pytest.raises(DataError, match="sample 'b1': bad_loss_mask: mask.npy is"):
        probe_dataset(resolve_shards(spec), cfg, latent_channels=4, masked_loss=True)
    assert "loss_mask" not in take_batches(stream(spec, num_workers=0), 1)[0]  # off by default: no member is read
