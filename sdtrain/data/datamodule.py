"""LightningDataModule around LatentStream: gives it this rank's place and, on resume, its stream position."""

from __future__ import annotations

import logging
from collections.abc import Callable

import lightning as L
from torch.utils.data import DataLoader

from sdtrain.data.loader import LatentStream, build_dataloader

log = logging.getLogger(__name__)


class LatentDataModule(L.LightningDataModule):
    def __init__(self, make_stream: Callable[..., LatentStream]) -> None:
        """`make_stream(rank=, world_size=, start_batch=)` builds this rank's stream (a partial of LatentStream)."""
        super().__init__()
        self.make_stream = make_stream

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        # Lightning restores loop state before asking for the dataloader, so global_step is the resumed one.
        consumed = trainer.global_step * trainer.accumulate_grad_batches if trainer is not None else 0
        if consumed:
            log.info("data stream resumes after %d batches of this rank", consumed)
        stream = self.make_stream(
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
            start_batch=consumed,
        )
        return build_dataloader(stream)
