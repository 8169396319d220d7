"""Flat-cost resume (issue 16): a stream started from the StreamPositions its batches reported continues bit for
bit like the uninterrupted stream, and reads only the shuffle window, wherever in the epoch it resumes.

The datasets mix two latent shapes (aspect buckets, so samples wait in buckets across the resume point), bad
samples (skipped, counted), shards split between workers, and a shuffle buffer; the bench for the cost at LAION
size is bench/resume.py.
"""

import json

import pytest
import torch
from helpers import latent_stream, mixed_shape_dataset, take_batches

import sdtrain.data.loader as loader_module
from sdtrain.data.slot_pass import ShuffleOrder, shuffle_buffer
from sdtrain.models.text_encoder import build_tokenizer
from sdtrain.seeding import python_rng

TOKENIZER = build_tokenizer()


def _stream(manifest, start_batch=0, positions=None, **cfg):
    options = {"shuffle_buffer": 16, "caption_dropout": 0.3, **cfg}
    return latent_stream(manifest, seed=3, start_batch=start_batch, resume_positions=positions, **options)


def _positions(batches):
    """What LatentDataModule keeps: each worker role's position after its last consumed batch."""
    last = {}
    for batch in batches:
        position = batch["position"].position
        last[position.worker] = position.to_dict()
    return last


def _same(a, b):
    assert a["keys"] == b["keys"]
    assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["tokens"], b["tokens"])


def test_the_order_is_the_shuffle_buffers_on_the_numbers_and_continues_from_its_state():
    for n, size in [(0, 8), (5, 8), (100, 8), (100, 0), (37, 1)]:
        items = [f"x{i}" for i in range(n)]
        reference = list(shuffle_buffer(iter(items), size, python_rng(1, 2)))
        assert [items[i] for i in ShuffleOrder(n, size, python_rng(1, 2))] == reference
        for cut in range(n + 1):  # a saved state continues the same sequence, draining included
            order = ShuffleOrder(n, size, python_rng(1, 2))
            head = [next(order) for _ in range(cut)]
            tail = list(ShuffleOrder(n, size, python_rng(9), state=json.loads(json.dumps(order.state()))))
            assert [items[i] for i in head + tail] == reference, (n, size, cut)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_positions_is_bit_for_bit_at_any_point(tmp_path, workers):
    manifest = mixed_shape_dataset(tmp_path)
    full = take_batches(_stream(manifest, num_workers=workers), 40)  # 115 samples, ~25 batches an epoch: two epochs
    assert len({b["latents"].shape for b in full}) == 2  # both buckets
    for k in (1, 6, 13, 24, 31):
        resumed = take_batches(_stream(manifest, start_batch=k, positions=_positions(full[:k]), num_workers=workers), 6)
        for a, b in zip(full[k : k + 6], resumed, strict=True):
            _same(a, b)


def test_resume_with_a_bucket_waiting_from_the_previous_pass(tmp_path):
    """Many bad samples make a slot read its samples twice in an epoch (cycle 1); resuming inside it is exact."""
    manifest = mixed_shape_dataset(tmp_path, shards=2, per_shard=20)
    options = dict(num_workers=0, batch_size=8, shuffle_buffer=6, max_skip_fraction=0.9)
    full = take_batches(_stream(manifest, **options), 12)
    assert any(b["position"].position.cycle > 0 for b in full)
    for k in range(1, 11):
        resumed = take_batches(_stream(manifest, start_batch=k, positions=_positions(full[:k]), **options), 2)
        for a, b in zip(full[k : k + 2], resumed, strict=True):
            _same(a, b)


def test_a_resume_reads_the_shuffle_window_not_the_epoch_so_far(tmp_path, monkeypatch):
    """Samples whose data is read (not seeked past) before the first batch after a resume: the same early and
    late in the epoch, and about the shuffle buffer's size, not the position."""
    manifest = mixed_shape_dataset(tmp_path, shards=20, per_shard=50)  # 1,000 samples, one worker
    options = dict(num_workers=0, batch_size=4, shuffle_buffer=32)
    full = take_batches(_stream(manifest, **options), 230)  # ~245 batches an epoch
    original = loader_module.iter_shard_samples
    reads = []

    def counting(*args, **kwargs):
        for item in original(*args, **kwargs):
            reads[-1] += 1
            yield item

    monkeypatch.setattr(loader_module, "iter_shard_samples", counting)
    for k in (10, 220):
        reads.append(0)
        first = take_batches(_stream(manifest, start_batch=k, positions=_positions(full[:k]), **options), 1)[0]
        _same(full[k], first)
    early, late = reads
    assert early <= 32 + 3 * 4 + 8 and late <= 32 + 3 * 4 + 8, reads  # buffer + waiting buckets + a batch


def test_a_position_that_disagrees_with_the_step_count_is_one_error(tmp_path):
    from sdtrain.errors import DataError

    manifest = mixed_shape_dataset(tmp_path)
    full = take_batches(_stream(manifest, num_workers=0), 5)
    with pytest.raises(DataError, match="data position of worker 0 .* disagrees"):
        next(iter(_stream(manifest, start_batch=3, positions=_positions(full), num_workers=0)))
