"""A held-out latent set, read once into memory for validation: fixed order, fixed posterior draws, no caption
dropout, so every evaluation sees exactly the same inputs (only the model changes between evaluations). Samples
may differ in latent shape (aspect buckets): `groups` gives the indices of each shape, batches hold one."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch

from sdtrain.data.loader import Tokenizer
from sdtrain.data.normalizer import LatentNormalizer
from sdtrain.data.samples import LatentField, SampleError, decode_caption, decode_latent, decode_size_conditioning
from sdtrain.data.shards import ShardSet, iter_raw_samples
from sdtrain.errors import DataError
from sdtrain.seeding import seeded_generator

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class HoldoutSet:
    latents: list[torch.Tensor]
    """N tensors (C, h, w), normalised like training latents."""
    tokens: torch.Tensor
    """(N, L) (SDXL: (N, 2, L))."""
    sizes: list[tuple[int, int, int, int] | None] = field(default_factory=list)
    """Each sample's original size and crop from its json (SDXL's micro-conditioning), None where absent."""
    skipped: Counter[str] = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.latents)

    def groups(self) -> list[list[int]]:
        """Sample indices by latent shape, in order of each shape's first sample."""
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, latent in enumerate(self.latents):
            by_shape.setdefault(tuple(latent.shape), []).append(index)
        return list(by_shape.values())

    def stacked(self, indices: list[int]) -> torch.Tensor:
        return torch.stack([self.latents[i] for i in indices])


def load_holdout(
    shard_set: ShardSet,
    *,
    tokenizer: Tokenizer,
    latent_channels: int,
    normalizer: LatentNormalizer,
    latent_key: str = "auto",
    max_samples: int = 512,
    seed: int = 0,
) -> HoldoutSet:
    """The first `max_samples` good samples of `shard_set` in shard order; bad ones are skipped and counted."""
    latents: list[torch.Tensor] = []
    captions: list[str] = []
    sizes: list[tuple[int, int, int, int] | None] = []
    skipped: Counter[str] = Counter()
    for shard in shard_set.shards:
        for raw in iter_raw_samples(shard.url, lambda reason: skipped.update(["shard_error"])):
            if len(latents) >= max_samples:
                break
            generator = seeded_generator(seed, len(latents))
            try:
                latent = decode_latent(raw, LatentField.detect(raw, latent_key), latent_channels, generator)
                caption, size = decode_caption(raw), decode_size_conditioning(raw)
            except SampleError as exc:
                skipped[exc.reason] += 1
                continue
            latents.append(normalizer.normalize(latent))
            captions.append(caption)
            sizes.append(size)
    if not latents:
        raise DataError(f"validation set has no usable sample (skipped: {dict(skipped) or 'none read'})")
    if skipped:
        log.warning("validation set: skipped %s", dict(skipped))
    return HoldoutSet(latents=latents, tokens=tokenizer(captions), sizes=sizes, skipped=skipped)
