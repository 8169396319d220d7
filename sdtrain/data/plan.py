"""Which shards each (rank, worker) reads in an epoch, and how many batches it yields.

A pure function of (sample counts, world size, workers, batch size, seed, epoch): no processes, no I/O, so every
rank computes the same plan on its own and the planner can be tested at 1024 ranks x 8 workers.

The unit of work is a *slot* = rank * workers_per_rank + worker. Every slot yields exactly `batches_per_slot`
batches per epoch, so every rank yields the same number of batches (no collective can hang on a short rank).
- shards >= slots: a seeded per-epoch permutation of the shards is dealt round-robin to slots; no shard is read
  twice or dropped within an epoch.
- shards < slots: every slot reads every shard and keeps samples `i % slots == slot` (documented fallback; it
  costs extra reads but never drops or repeats a sample).
A slot whose shards hold more than `batches_per_slot * batch_size` samples drops its tail this epoch; one that
holds fewer wraps around to its first samples (like DistributedSampler's padding). With the equal-size shards the
encode tool writes, neither happens beyond the last partial batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdtrain.errors import DataError


@dataclass(frozen=True, slots=True)
class SlotPlan:
    shards: tuple[int, ...]  # indices into the dataset's shard list, in reading order
    stride: int  # keep every `stride`-th sample of the concatenated shards...
    offset: int  # ...starting at this one (stride 1, offset 0 = keep all)
    num_samples: int  # samples this slot owns this epoch


@dataclass(frozen=True, slots=True)
class EpochPlan:
    slots: tuple[SlotPlan, ...]
    batches_per_slot: int


def batches_per_slot(total_samples: int, num_slots: int, batch_size: int) -> int:
    per_slot = total_samples // (num_slots * batch_size)
    if per_slot == 0:
        raise DataError(
            f"dataset has {total_samples} samples, fewer than one batch per loader slot "
            f"({num_slots} slots x batch_size {batch_size}): use fewer workers/ranks or a smaller batch"
        )
    return per_slot


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(num_shards)
    return np.random.default_rng([seed, epoch, 0x5D]).permutation(num_shards)


def plan_epoch(
    sample_counts: list[int],
    *,
    world_size: int,
    workers_per_rank: int,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
) -> EpochPlan:
    """The plan for one epoch; identical on every rank for the same arguments."""
    num_slots = world_size * max(1, workers_per_rank)
    counts = np.asarray(sample_counts, dtype=np.int64)
    per_slot = batches_per_slot(int(counts.sum()), num_slots, batch_size)
    order = shard_order(len(counts), seed, epoch, shuffle)
    slots = []
    if len(counts) >= num_slots:
        for slot in range(num_slots):
            mine = order[slot::num_slots]
            slots.append(SlotPlan(tuple(int(i) for i in mine), 1, 0, int(counts[mine].sum())))
    else:
        total = int(counts.sum())
        everything = tuple(int(i) for i in order)
        for slot in range(num_slots):
            owned = (total - slot + num_slots - 1) // num_slots
            slots.append(SlotPlan(everything, num_slots, slot, owned))
    return EpochPlan(tuple(slots), per_slot)


def consumed_per_worker(batches_consumed: int, workers_per_rank: int) -> list[int]:
    """How many batches each worker of a rank produced, given the rank consumed `batches_consumed` in total.

    torch's DataLoader takes batches from workers round-robin (0, 1, ..., W-1, 0, ...), so batch k came from
    worker k % W.
    """
    w = max(1, workers_per_rank)
    return [(batches_consumed - i + w - 1) // w for i in range(w)]
