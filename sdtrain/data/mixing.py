"""Weighted mixing of several shard sets (`data.sources`), e.g. LAION-aesthetic 0.7 + a curated set 0.3.

An epoch holds as many samples as all sources together; source i contributes round(w_i x total) of them
(largest remainders, so they add up). A source asked for fewer than it has contributes whole shards in a seeded
per-epoch order, the last one cut short, so each epoch takes another subset; one asked for more repeats itself,
pass after pass, each pass in its own order. The chosen runs of samples from all sources are put in one seeded
order and cut into the slots like any epoch (partition.cut_into_slots), so every batch mixes the sources in
proportion on average, and everything downstream (shuffle buffer, stream positions, flat-cost and elastic
resume) works on the mixture as on one set: it is a deterministic function of (seed, epoch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from sdtrain.data.partition import EpochPlan, cut_into_slots
from sdtrain.data.shards import ShardSet, resolve_shards
from sdtrain.errors import DataError
from sdtrain.seeding import numpy_rng

# what must agree between the manifests of mixed sources: latents of different VAEs or scalings cannot mix
VAE_KEYS = ("encoder_sha256", "scaling_factor", "shift_factor")


@dataclass(frozen=True, slots=True)
class Source:
    name: str
    shards: Any
    weight: float


@dataclass(frozen=True, slots=True)
class Mixture:
    """The sources of a mixed ShardSet: its shards are theirs, concatenated in this order."""

    names: tuple[str, ...]
    weights: tuple[float, ...]  # normalised to sum to 1
    first_shard: tuple[int, ...]  # index of each source's first shard in the combined set
    sample_counts: tuple[tuple[int, ...], ...]  # per source, per shard

    def signature(self) -> str:
        return ",".join(f"{n}:{w:.6g}" for n, w in zip(self.names, self.weights, strict=True))

    def source_of(self, shard: int) -> int:
        return int(np.searchsorted(self.first_shard, shard, side="right")) - 1

    def targets(self) -> list[int]:
        """Samples each source contributes to an epoch (of the sources' total size)."""
        total = sum(sum(c) for c in self.sample_counts)
        exact = [w * total for w in self.weights]
        targets = [math.floor(x) for x in exact]
        by_remainder = sorted(range(len(exact)), key=lambda i: targets[i] - exact[i])
        for i in by_remainder[: total - sum(targets)]:
            targets[i] += 1
        return targets

    def runs(self, epoch: int, seed: int, shuffle: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard, start, stop) of this epoch's runs of samples, all sources, in reading order."""
        runs: list[tuple[int, int, int]] = []
        for source, need in enumerate(self.targets()):
            counts = self.sample_counts[source]
            for repeat in range(need // sum(counts) + 1):
                if need <= 0:
                    break
                order = numpy_rng(seed, epoch, 0x3A, source, repeat).permutation(len(counts))
                for shard in order if shuffle else range(len(counts)):
                    take = min(counts[shard], need)
                    if take:
                        runs.append((self.first_shard[source] + int(shard), 0, take))
                        need -= take
                    if need <= 0:
                        break
        if shuffle:  # the sources interleaved, shard by shard
            runs = [runs[i] for i in numpy_rng(seed, epoch, 0x3B).permutation(len(runs))]
        table = np.asarray(runs, dtype=np.int64).reshape(-1, 3)
        return table[:, 0], table[:, 1], table[:, 2]

    def plan(self, epoch: int, seed: int, shuffle: bool, num_slots: int, batch_size: int) -> EpochPlan:
        return cut_into_slots(*self.runs(epoch, seed, shuffle), num_slots, batch_size)


def parse_sources(raw: Any) -> list[Source]:
    """`data.sources`: a list of {shards, weight (default 1), name (default source<i>)}."""
    if isinstance(raw, DictConfig | ListConfig):
        raw = OmegaConf.to_container(raw, resolve=True)
    if not isinstance(raw, list) or not raw:
        raise DataError("data.sources must be a non-empty list of {shards: ..., weight: ...}")
    sources = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or not entry.get("shards"):
            raise DataError(f"data.sources[{i}] needs shards: (a manifest, pattern or list of shards)")
        unknown = sorted(set(entry) - {"shards", "weight", "name"})
        if unknown:
            raise DataError(f"data.sources[{i}] has unknown key {unknown[0]!r} (keys: shards, weight, name)")
        weight = entry.get("weight", 1.0)
        if not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
            raise DataError(f"data.sources[{i}].weight must be a number > 0, got {weight!r}")
        sources.append(Source(str(entry.get("name") or f"source{i}"), entry["shards"], float(weight)))
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise DataError(f"data.sources names must differ: {names}")
    return sources


def resolve_sources(raw: Any) -> tuple[ShardSet, Mixture]:
    """The sources' shards as one ShardSet (the first source's manifest describes the latents) and the Mixture."""
    sources = parse_sources(raw)
    sets = [resolve_shards(s.shards) for s in sources]
    first_vae = (sets[0].manifest.get("vae") or {}) if sets[0].manifest else {}
    for source, shard_set in zip(sources[1:], sets[1:], strict=True):
        vae = (shard_set.manifest.get("vae") or {}) if shard_set.manifest else {}
        differ = [k for k in VAE_KEYS if vae.get(k) != first_vae.get(k)]
        if differ:
            raise DataError(
                f"data.sources: {source.name}'s latents differ from {sources[0].name}'s in vae.{differ[0]} "
                f"({vae.get(differ[0])!r} vs {first_vae.get(differ[0])!r}): only latents of one VAE can mix"
            )
    total_weight = sum(s.weight for s in sources)
    firsts = np.cumsum([0] + [len(s.shards) for s in sets])[:-1]
    mixture = Mixture(
        names=tuple(s.name for s in sources),
        weights=tuple(s.weight / total_weight for s in sources),
        first_shard=tuple(int(f) for f in firsts),
        sample_counts=tuple(tuple(s.sample_counts) for s in sets),
    )
    combined = ShardSet(tuple(shard for s in sets for shard in s.shards), sets[0].manifest)
    return combined, mixture
