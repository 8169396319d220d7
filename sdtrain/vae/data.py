"""The first stage's data: raw images (what `sdtrain-encode` reads, captions not needed) -> pixel batches.

Inputs are the encoder's parts (prep/sources.py): image folders, img2dataset / LAION tars, tables. Each part is
one "shard" of the latent loader's epoch plan (data/partition.py), so the image stream partitions, shuffles and
resumes exactly as the U-Net's does: everything random is seeded by (seed, epoch, slot, batch), and a resumed run
replays its position (skipping whole epochs by arithmetic, replaying the batches of the current one).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count, islice
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from sdtrain.data.partition import EpochPlan, consumed_per_worker, plan_epoch
from sdtrain.data.samples import SampleError
from sdtrain.data.slot_pass import shuffle_buffer
from sdtrain.errors import DataError
from sdtrain.prep.images import decode_image, resize_and_crop
from sdtrain.prep.sources import InputPart, iter_part, plan_parts
from sdtrain.seeding import python_rng

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class ImageDataConfig:
    images: Any = None
    """Training images: a folder (with subfolders), img2dataset/LAION tars (path or glob), a .parquet/.jsonl/.csv
    table with an image-path column, or a list of these."""
    val_images: Any = None
    """Held-out images (same forms) for reconstruction grids, PSNR and rFID; None = none."""
    resolution: int = 256
    """Square training crops of this many pixels (images are resized to cover it first)."""
    random_crop: bool = True
    """Random crops (seeded) for training; centre crops otherwise. Held-out images are always centre-cropped."""
    random_flip: bool = True
    batch_size: int = 8
    """Per-rank micro-batch size."""
    num_workers: int = 2
    shuffle_buffer: int = 256
    shuffle: bool = True
    files_per_part: int = 256
    """Folder/table images per part (the unit the epoch plan shuffles and splits over ranks and workers)."""
    prefetch_factor: int = 2
    max_skip_fraction: float = 0.5
    """Stop with an error when more than this fraction of images read by a worker is bad (after 100 reads)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_workers < 0 or self.resolution < 8:
            raise ValueError("batch_size must be >= 1, num_workers >= 0 and resolution >= 8")


def _as_list(spec: Any) -> list[str]:
    if spec is None or spec == "":
        raise DataError("data.images is not set (a folder, tars or a table of images)")
    return [str(s) for s in spec] if isinstance(spec, list | tuple) else [str(spec)]


def _tar_count(path: str) -> int:
    """Samples in a tar: img2dataset's `NNNNN_stats.json` says (successes) without reading it; else counted."""
    stats = path[: -len(".tar")] + "_stats.json"
    if os.path.isfile(stats):
        try:
            with open(stats, encoding="utf-8") as f:
                return int(json.load(f)["successes"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return sum(1 for s in iter_part(InputPart(0, "tar", path), lambda _: None) if s.image is not None)


@dataclass(frozen=True, slots=True)
class ImageSet:
    parts: list[InputPart]
    counts: list[int]  # images per part (what the epoch plan splits)

    @classmethod
    def open(cls, spec: Any, files_per_part: int = 256) -> ImageSet:
        parts = plan_parts(_as_list(spec), files_per_part)
        counts = [_tar_count(p.location) if p.kind == "tar" else p.stop - p.start for p in parts]
        if sum(counts) == 0:
            raise DataError(f"no images in {spec}")
        return cls(parts, counts)

    @property
    def total(self) -> int:
        return sum(self.counts)

    def iter_images(self, part: int, on_error: Any) -> Iterator[tuple[str, bytes | None]]:
        """(key, image bytes) of one part in reading order; tar members without an image are not samples."""
        for raw in iter_part(self.parts[part], on_error):
            if raw.image is not None or self.parts[part].kind != "tar":
                yield raw.key, raw.image


def load_image(data: bytes | None, resolution: int, rng: Any | None = None, flip: bool = False) -> np.ndarray:
    """(3, R, R) float32 in [-1, 1]; SampleError for a missing or undecodable image."""
    if data is None:
        raise SampleError("missing_image", "no image file")
    pixels, _, _ = resize_and_crop(decode_image(data), (resolution, resolution), random_crop=rng is not None, rng=rng)
    return np.ascontiguousarray(pixels[:, :, ::-1]) if flip else pixels


def read_held_out(spec: Any, resolution: int, limit: int) -> tuple[torch.Tensor, list[str]]:
    """Up to `limit` held-out images, centre-cropped, in a fixed order: (N, 3, R, R) in [-1, 1] and their keys."""
    image_set = ImageSet.open(spec)
    pixels, keys = [], []
    for part in range(len(image_set.parts)):
        for key, data in image_set.iter_images(part, log.warning):
            try:
                pixels.append(load_image(data, resolution))
                keys.append(key)
            except SampleError as exc:
                log.warning("held-out image %s skipped: %s", key, exc)
            if len(pixels) == limit:
                return torch.from_numpy(np.stack(pixels)), keys
    if not pixels:
        raise DataError(f"no readable held-out images in {spec}")
    return torch.from_numpy(np.stack(pixels)), keys


class ImageStream(IterableDataset):
    """Yields {"pixels": (B, 3, R, R) float32 in [-1, 1], "keys", "skipped"} forever (see module docstring)."""

    def __init__(
        self,
        image_set: ImageSet,
        cfg: ImageDataConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_batch: int = 0,
    ) -> None:
        self.image_set = image_set
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_batch = start_batch
        self.workers = max(1, cfg.num_workers)
        self.skipped: Counter[str] = Counter()

    def plan(self, epoch: int) -> EpochPlan:
        return plan_epoch(
            self.image_set.counts,
            world_size=self.world_size,
            workers_per_rank=self.workers,
            batch_size=self.cfg.batch_size,
            seed=self.seed,
            epoch=epoch,
            shuffle=self.cfg.shuffle,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        worker = (physical + self.start_batch) % self.workers  # as LatentStream: a resumed stream stays identical
        done = consumed_per_worker(self.start_batch, self.workers)[worker]
        epoch, skip = divmod(done, self.plan(0).batches_per_slot)
        while True:
            yield from self._epoch_batches(epoch, worker, skip)
            epoch, skip = epoch + 1, 0

    def _epoch_batches(self, epoch: int, worker: int, skip: int) -> Iterator[dict[str, Any]]:
        plan = self.plan(epoch)
        slot = self.rank * self.workers + worker
        samples = self._shuffled(plan, epoch, slot)
        pending: list[np.ndarray] = []
        keys: list[str] = []
        emitted = reads = bad = 0
        while emitted < plan.batches_per_slot:
            key, data = next(samples)
            reads += 1
            rng = python_rng(self.seed, epoch, slot, reads)  # crop and flip of this read, the same on a replay
            try:
                flip = self.cfg.random_flip and rng.random() < 0.5
                pixels = load_image(data, self.cfg.resolution, rng if self.cfg.random_crop else None, flip)
            except SampleError as exc:
                bad += 1
                if emitted >= skip:  # replayed skips were counted and logged by the first run
                    self.skipped[exc.reason] += 1
                    log.warning("skipping image %s: %s", key, exc)
                if reads >= 100 and bad > self.cfg.max_skip_fraction * reads:
                    raise DataError(f"{bad} of {reads} images read were bad (last: {exc}); check data.images") from None
                continue
            pending.append(pixels)
            keys.append(key)
            if len(pending) == self.cfg.batch_size:
                emitted += 1
                if emitted > skip:
                    skipped, self.skipped = dict(self.skipped), Counter()
                    yield {"pixels": torch.from_numpy(np.stack(pending)), "keys": keys, "skipped": skipped}
                pending, keys = [], []

    def _shuffled(self, plan: EpochPlan, epoch: int, slot: int) -> Iterator[tuple[str, bytes | None]]:
        """The slot's images, shuffled within a buffer; passes repeat if the slot needs more (see partition.py)."""
        size = self.cfg.shuffle_buffer if self.cfg.shuffle else 0
        for cycle in count():
            one_pass = (
                sample
                for r in plan.slots[slot].ranges
                for sample in islice(self.image_set.iter_images(r.shard, self._part_error), r.start, r.stop)
            )
            yielded = 0
            for sample in shuffle_buffer(one_pass, size, python_rng(self.seed, epoch, slot, cycle)):
                yielded += 1
                yield sample
            if yielded == 0:
                raise DataError("no readable images in this worker's parts of data.images")

    def _part_error(self, reason: str) -> None:
        log.warning("%s", reason)
        self.skipped["part_error"] += 1
