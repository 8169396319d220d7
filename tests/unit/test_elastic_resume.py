"""Elastic resume (issue 16): a checkpoint of 2 ranks resumed on 1 (and 1 on 2), global batch kept, finishes the
epoch it was in with no sample repeated or lost beyond the new plan's tail (less than one global batch), the
same way every time; a resume inside that transition epoch is bit for bit; the epoch after it is a full one.

Streams stand in for ranks here (what LatentDataModule gathers is built the same way); the Lightning path is
tests/distributed/test_elastic.py.
"""

from collections import Counter

import pytest
import torch
from helpers import latent_stream, make_dataset, mixed_shape_dataset, take_batches

from sdtrain.data.elastic import StreamLayout, check_global_batch, plan_transition
from sdtrain.errors import DataError
from sdtrain.models.text_encoder import build_tokenizer

TOKENIZER = build_tokenizer()


def _stream(manifest, rank, world, batch, **kwargs):
    return latent_stream(manifest, rank=rank, world=world, seed=11, batch_size=batch, shuffle_buffer=16, **kwargs)


def _saved(batches):
    workers = {}
    for batch in batches:
        position = batch["position"].position
        workers[str(position.worker)] = position.to_dict()
    return {"batches": len(batches), "workers": workers}


def _keys(batches):
    return [k for b in batches for k in b["keys"]]


@pytest.mark.parametrize(("old_world", "new_world"), [(2, 1), (1, 2)])
def test_the_epoch_goes_on_in_the_new_world_without_repeats(tmp_path, old_world, new_world):
    manifest = make_dataset(tmp_path, n=230, per_shard=23)
    global_batch = 16
    old_batch, new_batch = global_batch // old_world, global_batch // new_world
    old = [_stream(manifest, r, old_world, old_batch) for r in range(old_world)]
    per_epoch = old[0].plan(0).batches_per_slot * 2  # batches of a rank in one epoch
    uninterrupted = Counter(k for ds in old for k in _keys(take_batches(ds, per_epoch)))
    assert max(uninterrupted.values()) == 1 and len(uninterrupted) > 230 - global_batch

    k = per_epoch // 2 + 1  # each old rank consumed k batches, then the world changed
    first_part = [take_batches(ds, k) for ds in old]
    layout = StreamLayout(old_world, 2, old_batch, 1, 16, True, 11, 230)
    old_plan = lambda epoch: old[0].epoch_plan(epoch, old_world * 2, old_batch)  # noqa: E731 - what the module passes
    transition = plan_transition([_saved(b) for b in first_part], layout, old_plan)
    assert transition.epoch == 0
    again = plan_transition([_saved(b) for b in first_part], layout, old_plan)
    assert [r.tolist() for r in again.runs] == [r.tolist() for r in transition.runs]  # deterministic

    new = [_stream(manifest, r, new_world, new_batch, transition=transition) for r in range(new_world)]
    rest_per_rank = new[0].plan(0).batches_per_slot * 2
    rest = [take_batches(ds, rest_per_rank + per_epoch) for ds in new]  # the transition epoch, then a full one
    elastic = Counter(
        _keys([b for part in first_part for b in part]) + _keys([b for r in rest for b in r[:rest_per_rank]])
    )
    assert max(elastic.values()) == 1  # nothing seen twice in the epoch
    assert set(elastic) <= set(uninterrupted) and len(uninterrupted) - len(elastic) < global_batch
    assert all(len(b["keys"]) == new_batch for r in rest for b in r)
    next_epoch = Counter(_keys([b for r in rest for b in r[rest_per_rank:]]))
    assert max(next_epoch.values()) == 1 and len(next_epoch) > 230 - global_batch


def test_samples_waiting_in_buckets_go_on_in_the_new_world_and_a_resume_there_is_exact(tmp_path):
    """Two latent shapes: at the change some samples wait in half-full buckets; the new world reads them, and
    nothing any old batch held. Resuming inside the transition epoch (same new world) is bit for bit."""
    manifest = mixed_shape_dataset(tmp_path, shards=10, per_shard=23, bad_every=0)
    old = [_stream(manifest, r, 2, 4) for r in range(2)]
    first_part = [take_batches(ds, 9) for ds in old]
    saved = [_saved(b) for b in first_part]
    waiting = set()  # keys of the samples in half-full buckets when the world changed
    for rank, state in enumerate(saved):
        for worker, position in state["workers"].items():
            slot_plan = old[rank].plan(position["epoch"]).slots[rank * 2 + int(worker)]
            in_file_order = [(r.shard, i) for r in slot_plan.ranges for i in range(r.start, r.stop)]
            waiting |= {f"k{shard * 23 + i:05d}" for shard, i in (in_file_order[n] for n in position["pending"])}
    assert waiting
    layout = StreamLayout(2, 2, 4, 1, 16, True, 11, 230)
    transition = plan_transition(saved, layout, lambda epoch: old[0].epoch_plan(epoch, 4, 4))
    new = _stream(manifest, 0, 1, 8, transition=transition)
    rest_batches = new.plan(transition.epoch).batches_per_slot * 2
    rest = take_batches(new, rest_batches)
    before, after = set(_keys([b for part in first_part for b in part])), set(_keys(rest))
    shards, starts, stops = (r.tolist() for r in transition.runs)
    owed = {f"k{s * 23 + i:05d}" for s, a, b in zip(shards, starts, stops, strict=True) for i in range(a, b)}
    assert waiting <= owed and not before & owed and after <= owed  # owed: the waiting ones, none an old batch held
    assert len(before) + len(after) > 230 - 3 * 16
    for j in (1, rest_batches // 2):
        positions = {int(w): p for w, p in _saved(rest[:j])["workers"].items()}
        resumed = _stream(manifest, 0, 1, 8, start_batch=j, transition=transition, resume_positions=positions)
        for a, b in zip(rest[j : j + 3], take_batches(resumed, 3), strict=True):
            assert a["keys"] == b["keys"] and torch.equal(a["latents"], b["latents"])


def test_another_global_batch_is_one_line_naming_the_batch_size_that_keeps_it():
    old = StreamLayout(2, 2, 8, 1, 16, True, 0, 1000)
    check_global_batch(old, StreamLayout(1, 2, 16, 1, 16, True, 0, 1000))
    check_global_batch(old, StreamLayout(1, 2, 8, 2, 16, True, 0, 1000))  # accumulation keeps it too
    with pytest.raises(DataError, match=r"global batch 16\) on 1 x 8 x 1 = 8: set data.batch_size=16") as info:
        check_global_batch(old, StreamLayout(1, 2, 8, 1, 16, True, 0, 1000))
    assert "\n" not in str(info.value)
