import pytest

from sdtrain.data.plan import consumed_per_worker, plan_epoch
from sdtrain.errors import DataError


@pytest.mark.parametrize("num_shards", [4, 7, 8, 13])
def test_two_ranks_two_workers_cover_every_shard_once(num_shards):
    counts = [10] * num_shards
    for epoch in range(3):
        plan = plan_epoch(counts, world_size=2, workers_per_rank=2, batch_size=2, seed=1, epoch=epoch)
        read = [s for slot in plan.slots for s in slot.shards]
        assert sorted(read) == list(range(num_shards))  # no duplicate, no missing shard
        assert len(plan.slots) == 4 and plan.batches_per_slot == sum(counts) // (4 * 2)


def test_shard_order_changes_per_epoch_but_is_identical_on_every_rank():
    args = dict(world_size=2, workers_per_rank=2, batch_size=1, seed=3)
    e0 = plan_epoch([5] * 16, epoch=0, **args)
    assert e0 == plan_epoch([5] * 16, epoch=0, **args)
    assert e0.slots != plan_epoch([5] * 16, epoch=1, **args).slots


def test_fewer_shards_than_slots_splits_by_sample():
    plan = plan_epoch([7, 6], world_size=2, workers_per_rank=2, batch_size=1, seed=0, epoch=0)
    owned = []
    for slot in plan.slots:
        assert slot.stride == 4
        owned.extend(i for i in range(13) if i % slot.stride == slot.offset)
    assert sorted(owned) == list(range(13))
    assert sum(s.num_samples for s in plan.slots) == 13


def test_dataset_smaller_than_a_global_batch_is_an_error():
    with pytest.raises(DataError, match="fewer than one batch"):
        plan_epoch([3], world_size=2, workers_per_rank=2, batch_size=4, seed=0, epoch=0)


def test_consumed_per_worker_matches_round_robin():
    for consumed in range(0, 20):
        for workers in (1, 2, 3):
            expect = [sum(1 for k in range(consumed) if k % workers == w) for w in range(workers)]
            assert consumed_per_worker(consumed, workers) == expect
