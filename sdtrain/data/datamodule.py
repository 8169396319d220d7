"""LightningDataModule around LatentStream: gives it this rank's place and, on resume, its stream position."""

from __future__ import annotations

import logging

import lightning as L
from torch.utils.data import DataLoader

from sdtrain.data.loader import LatentDataConfig, LatentNormalizer, LatentStream, Tokenizer, build_dataloader
from sdtrain.data.shards import ShardSet

log = logging.getLogger(__name__)


class LatentDataModule(L.LightningDataModule):
    def __init__(
        self,
        shard_set: ShardSet,
        cfg: LatentDataConfig,
        tokenizer: Tokenizer,
        *,
        latent_channels: int,
        normalizer: LatentNormalizer,
        seed: int,
    ) -> None:
        super().__init__()
        self.shard_set = shard_set
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.latent_channels = latent_channels
        self.normalizer = normalizer
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        # Lightning restores loop state before asking for the dataloader, so global_step is the resumed one.
        consumed = trainer.global_step * trainer.accumulate_grad_batches if trainer is not None else 0
        if consumed:
            log.info("data stream resumes after %d batches of this rank", consumed)
        stream = LatentStream(
            self.shard_set,
            self.cfg,
            self.tokenizer,
            latent_channels=self.latent_channels,
            normalizer=self.normalizer,
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
            seed=self.seed,
            start_batch=consumed,
        )
        return build_dataloader(stream)
