"""Elastic resume: continue an epoch on another number of ranks or workers, no sample repeated or lost in it.

The checkpoint holds every old slot's StreamPosition (gathered from all ranks by LatentDataModule). From them the
samples of the epoch that no batch consumed yet are known exactly: a slot's shuffled order is a function of its
sample count, buffer size and seed (slot_pass.py), so the samples it had not taken from its order at its position,
plus those waiting in its buckets, are what it still owed. Those *remaining* samples, in old-slot order and file
order within each slot, are cut into the new world's slots like a fresh epoch (partition.cut_into_slots): the
"transition epoch". Its tail (less than one new global batch) waits for the next epoch, which is planned for
the new world as usual. The result depends only on the checkpoint and the new world size, so every rank computes
the same plan, and a resume inside the transition epoch recomputes it from the same checkpointed transition.

The global batch (ranks x batch size x accumulation) must stay as it was: the new run sets data.batch_size or
trainer.accumulate_grad_batches to keep it, or stops with one line saying which values would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdtrain.data.partition import EpochPlan, SlotPlan, cut_into_slots
from sdtrain.data.slot_pass import StreamPosition
from sdtrain.errors import DataError


@dataclass(frozen=True, slots=True)
class StreamLayout:
    """What a stream's sample order depends on besides the data: checked before positions are reused."""

    world_size: int
    workers: int
    batch_size: int
    accumulate: int
    shuffle_buffer: int
    shuffle: bool
    seed: int
    total_samples: int
    mixture: str = ""  # data.sources' names and weights (Mixture.signature), "" for one shard set

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size * self.accumulate

    def same_order_as(self, other: StreamLayout) -> bool:
        fields = ("shuffle_buffer", "shuffle", "seed", "total_samples", "mixture")
        return all(getattr(self, f) == getattr(other, f) for f in fields)


def check_global_batch(old: StreamLayout, new: StreamLayout) -> None:
    if old.global_batch == new.global_batch:
        return
    per_rank = old.global_batch / (new.world_size * new.accumulate)
    hint = f"data.batch_size={int(per_rank)}" if per_rank == int(per_rank) else "a batch size and accumulation"
    raise DataError(
        f"resuming {old.world_size} rank(s) x batch {old.batch_size} x accumulation {old.accumulate} "
        f"(global batch {old.global_batch}) on {new.world_size} x {new.batch_size} x {new.accumulate} = "
        f"{new.global_batch}: set {hint} so the global batch stays {old.global_batch}"
    )


@dataclass(frozen=True, slots=True)
class Transition:
    """The epoch a world-size change happened in, and the samples of it the new world still has to read."""

    epoch: int
    runs: tuple[np.ndarray, np.ndarray, np.ndarray]  # (shard, start, stop) of each run of remaining samples

    @property
    def num_samples(self) -> int:
        return int((self.runs[2] - self.runs[1]).sum())

    def plan(self, num_slots: int, batch_size: int) -> EpochPlan | None:
        """The new world's plan for the rest of the epoch; None when less than one batch per slot is left."""
        if self.num_samples < num_slots * batch_size:
            return None
        return cut_into_slots(*self.runs, num_slots, batch_size)


def _remaining_numbers(position: StreamPosition | None, epoch: int, n: int, per_slot: int) -> list[int]:
    """Source numbers of a slot's part of `epoch` that no consumed batch of it holds."""
    if position is None or position.epoch < epoch:
        return list(range(n))
    if position.epoch > epoch or position.emitted == per_slot or position.cycle > 0:
        return []  # done, or already reading its part a second time (bad samples): it owes nothing
    return sorted(position.unread(n))


def _runs(slot_plan: SlotPlan, numbers: list[int]) -> list[tuple[int, int, int]]:
    """(shard, start, stop) runs of the slot's samples with these (sorted) source numbers."""
    runs: list[tuple[int, int, int]] = []
    offsets = np.cumsum([0] + [r.stop - r.start for r in slot_plan.ranges])
    for number in numbers:
        part = int(np.searchsorted(offsets, number, side="right")) - 1
        shard_range = slot_plan.ranges[part]
        ordinal = shard_range.start + number - int(offsets[part])
        if runs and runs[-1][0] == shard_range.shard and runs[-1][2] == ordinal:
            runs[-1] = (runs[-1][0], runs[-1][1], ordinal + 1)
        else:
            runs.append((shard_range.shard, ordinal, ordinal + 1))
    return runs


def plan_transition(
    state: list[dict[str, Any]],
    old: StreamLayout,
    plan_for: Callable[[int], EpochPlan],
    before: Transition | None = None,
) -> Transition:
    """The transition epoch for the gathered positions of `old`'s world (LatentDataModule.state_dict()['ranks']);
    `plan_for(epoch)` is the old world's plan of an epoch (LatentStream.epoch_plan with its slots and batch size),
    `before` the world-size change that world itself continued from, if any."""
    slots = old.world_size * old.workers

    def old_plan(epoch: int) -> EpochPlan | None:
        if before is not None and epoch == before.epoch:
            return before.plan(slots, old.batch_size)
        return plan_for(epoch)

    first_epoch = 0 if before is None else before.epoch + (old_plan(before.epoch) is None)
    positions = {
        rank * old.workers + int(worker): StreamPosition.from_dict(p)
        for rank, saved in enumerate(state)
        for worker, p in saved["workers"].items()
    }

    def next_epoch(slot: int) -> int:
        position = positions.get(slot)
        if position is None:  # the slot never emitted a batch of this stream: it stands at its start
            return first_epoch
        plan = old_plan(position.epoch)
        return position.epoch + (plan is None or position.emitted == plan.batches_per_slot)

    epoch = min(next_epoch(slot) for slot in range(slots))
    plan = old_plan(epoch)
    runs: list[tuple[int, int, int]] = []
    for slot in range(slots) if plan is not None else ():
        slot_plan = plan.slots[slot]
        numbers = _remaining_numbers(positions.get(slot), epoch, slot_plan.num_samples, plan.batches_per_slot)
        runs += _runs(slot_plan, numbers)
    table = np.asarray(runs, dtype=np.int64).reshape(-1, 3)
    return Transition(epoch, (table[:, 0], table[:, 1], table[:, 2]))
