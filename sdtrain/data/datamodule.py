"""LightningDataModule around the training stream: gives it this rank's place and, on resume, its position.

Each training batch carries its worker's StreamPosition (data/slot_pass.py). The module keeps the last one per
worker of the batches the model consumed and saves them, gathered from every rank, in the checkpoint with the
stream's layout (world size, workers, batch size, shuffle settings). On resume:
- same layout: each worker starts where it stood, reading only its shuffle window (flat cost);
- another world size or worker count, same global batch: the epoch goes on with what it still owed, cut for
  the new world (data/elastic.py); another global batch is a one-line error naming the batch size that keeps it;
- no positions (an older checkpoint, or the VAE job's image stream) or other shuffle settings: the stream
  replays the epoch so far from the step count (the latter with a warning: its sample order changes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import lightning as L
import numpy as np
import torch.distributed as dist
from torch.utils.data import DataLoader

from sdtrain.data.elastic import StreamLayout, Transition, check_global_batch, plan_transition
from sdtrain.data.loader import build_dataloader

log = logging.getLogger(__name__)


class LatentDataModule(L.LightningDataModule):
    def __init__(self, make_stream: Callable[..., Any]) -> None:
        """`make_stream(rank=, world_size=, start_batch=)` builds this rank's stream (a partial of LatentStream
        or ImageStream)."""
        super().__init__()
        self.make_stream = make_stream
        self.consumed = 0  # training batches this rank's model took
        self.positions: dict[int, dict[str, Any]] = {}  # worker role -> position after its last consumed batch
        self.layout: StreamLayout | None = None
        self.transition: dict[str, Any] | None = None  # the world-size change this run continues from, if any
        self.restored: dict[str, Any] | None = None

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        # Lightning restores loop state before asking for the dataloader, so global_step is the resumed one.
        self.consumed = trainer.global_step * accumulate if trainer is not None else 0
        stream = self.make_stream(rank=rank, world_size=world, start_batch=self.consumed)
        state, self.restored = self.restored, None
        how = "by replaying the epoch so far"
        if hasattr(stream, "place"):
            self.layout = stream.layout(accumulate)
            how = self._place(stream, state, rank) or how
        if self.consumed:
            log.info("data stream resumes after %d batches of this rank, %s", self.consumed, how)
        return build_dataloader(stream)

    def _place(self, stream: Any, state: dict[str, Any] | None, rank: int) -> str | None:
        """Put the stream where the checkpoint's positions say; how it resumes, or None for the replay."""
        self.positions, self.transition = {}, None
        if not state or "layout" not in state:
            return None
        old, new = StreamLayout(**state["layout"]), self.layout
        if not old.same_order_as(new):
            log.warning("the data settings differ from the checkpoint's (%s): the sample order changes", old)
            return None
        if (old.world_size, old.workers, old.batch_size) == (new.world_size, new.workers, new.batch_size):
            saved = state["ranks"][rank]
            self.consumed, self.transition = saved["batches"], state.get("transition")
            self.positions = {int(k): v for k, v in saved["workers"].items()}
            how = "from each worker's saved position"
        else:
            check_global_batch(old, new)
            before = _transition(state.get("transition"))
            slots = old.world_size * old.workers
            moved = plan_transition(state["ranks"], old, lambda e: stream.epoch_plan(e, slots, old.batch_size), before)
            self.transition = {"epoch": moved.epoch, "runs": [r.tolist() for r in moved.runs], "start": self.consumed}
            how = (
                f"on {new.world_size} rank(s) x {new.workers} worker(s) instead of {old.world_size} x "
                f"{old.workers}: epoch {moved.epoch} goes on with the {moved.num_samples} samples it still owed"
            )
        start = self.consumed - (self.transition["start"] if self.transition else 0)
        stream.place(start, self.positions, _transition(self.transition))
        return how

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training and isinstance(batch, dict):
            reported = batch.pop("position", None)
            if reported is not None:
                self.positions[reported.position.worker] = reported.position.to_dict()
            self.consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Every rank's positions (a collective: Lightning dumps checkpoints on every rank)."""
        if self.layout is None:
            return {"batches": self.consumed}
        mine = {"batches": self.consumed, "workers": {str(k): v for k, v in self.positions.items()}}
        ranks = [mine]
        if self.layout.world_size > 1 and dist.is_available() and dist.is_initialized():
            ranks = [None] * self.layout.world_size
            dist.all_gather_object(ranks, mine)
        return {"layout": asdict(self.layout), "ranks": ranks, "transition": self.transition}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.restored = state_dict


def _transition(saved: dict[str, Any] | None) -> Transition | None:
    if saved is None:
        return None
    shards, starts, stops = (np.asarray(r, dtype=np.int64) for r in saved["runs"])
    return Transition(saved["epoch"], (shards, starts, stops))
