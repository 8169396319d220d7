"""Weighted mixing (`data.sources`, issue 16): each epoch holds each source's share exactly, subsamples and
repeats by whole shards in a per-epoch order, interleaves the sources, and streams from it are exactly resumable
from their positions like one shard set; bad source lists are one-line errors."""

import json
from collections import Counter
from pathlib import Path

import pytest
from helpers import latent_stream, make_dataset, take_batches

from sdtrain.data.mixing import resolve_sources
from sdtrain.data.partition import plan_epoch
from sdtrain.errors import DataError


@pytest.fixture
def two_sources(tmp_path):
    big = make_dataset(tmp_path / "big", n=120, per_shard=20)  # 6 shards
    small = make_dataset(tmp_path / "small", n=30, per_shard=10, start=5000)  # 3 shards
    return [{"shards": str(big), "weight": 0.5, "name": "big"}, {"shards": str(small), "weight": 0.5, "name": "small"}]


def _per_source(mixture, runs):
    counts = Counter()
    for shard, start, stop in zip(*(r.tolist() for r in runs), strict=True):
        counts[mixture.names[mixture.source_of(shard)]] += stop - start
    return counts


def test_each_epoch_holds_each_sources_share_subsampling_and_repeating_by_shards(two_sources):
    shard_set, mixture = resolve_sources(two_sources)
    assert len(shard_set.shards) == 9 and mixture.targets() == [75, 75]  # 150 samples, half each
    subsets = set()
    for epoch in range(4):
        runs = mixture.runs(epoch, seed=1, shuffle=True)
        assert _per_source(mixture, runs) == {"big": 75, "small": 75}  # small (30) repeats 2.5x, big gives 75/120
        big_shards = tuple(s for s in runs[0].tolist() if s < 6)
        subsets.add(tuple(sorted(big_shards)))
        assert runs[0].tolist() == mixture.runs(epoch, seed=1, shuffle=True)[0].tolist()  # deterministic
    assert len(subsets) > 1  # another subset of the big source each epoch
    plan = mixture.plan(0, 1, True, num_slots=4, batch_size=4)
    assert all(s.num_samples == plan.batches_per_slot * 4 for s in plan.slots)
    one_set = plan_epoch([150], world_size=4, workers_per_rank=1, batch_size=4, seed=0, epoch=0)
    assert plan.batches_per_slot == one_set.batches_per_slot


def test_a_mixed_stream_counts_its_sources_and_resumes_exactly(two_sources):
    shard_set, mixture = resolve_sources(two_sources)

    def make(**kwargs):
        return latent_stream(shard_set, mixture=mixture, seed=5, shuffle_buffer=16, **kwargs)

    full = take_batches(make(), 48)
    per_epoch = make().plan(0).batches_per_slot * 2
    first_epoch = Counter()
    for batch in full[:per_epoch]:
        first_epoch.update(batch["sources"])
        assert sum(batch["sources"].values()) == len(batch["keys"])
    assert abs(first_epoch["big"] - first_epoch["small"]) <= 2 * 4 * 2 and sum(first_epoch.values()) > 150 - 8
    for k in (3, per_epoch + 2):
        positions = {}
        for batch in full[:k]:
            positions[batch["position"].position.worker] = batch["position"].position.to_dict()
        for a, b in zip(full[k : k + 4], take_batches(make(start_batch=k, resume_positions=positions), 4), strict=True):
            assert a["keys"] == b["keys"] and a["sources"] == b["sources"]


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        ([], "data.sources must be a non-empty list"),
        ([{"weight": 1}], r"data.sources\[0\] needs shards"),
        ([{"shards": "x", "weight": 0}], r"data.sources\[0\].weight must be a number > 0"),
        ([{"shards": "x", "share": 1}], "unknown key 'share'"),
        ([{"shards": "A", "name": "a"}, {"shards": "A", "name": "a"}], "names must differ"),
    ],
)
def test_bad_source_lists_are_one_line(sources, message, tmp_path):
    with pytest.raises(DataError, match=message) as info:
        resolve_sources(sources)
    assert "\n" not in str(info.value)


def test_sources_of_different_vaes_do_not_mix(two_sources, tmp_path):
    manifest = json.loads(Path(two_sources[1]["shards"]).read_text())
    manifest["vae"] = {**(manifest.get("vae") or {}), "scaling_factor": 0.13025}
    (tmp_path / "small" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="small's latents differ from big's in vae.scaling_factor"):
        resolve_sources(two_sources)
