"""The training stream: shards -> (rank, worker) slots -> shuffle buffer -> decoded, tokenised batches.

Batches are built inside the workers (decode, posterior sample, scaling, caption dropout, tokenisation) so the
main process only moves tensors. The stream is infinite over epochs; training length is `trainer.max_steps`.
Everything random is seeded by (seed, epoch, slot, batch index), so a resumed run can replay its position.
"""

from __future__ import annotations

import logging
import signal
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import count
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sdtrain.data.elastic import StreamLayout, Transition
from sdtrain.data.mixing import Mixture
from sdtrain.data.normalizer import LatentNormalizer
from sdtrain.data.partition import EpochPlan, SlotPlan, batches_per_slot, consumed_per_worker, plan_epoch
from sdtrain.data.samples import (
    LatentField,
    SampleError,
    checked_inpainting,
    checked_latent,
    decode_caption,
    decode_loss_mask,
    decode_pooled,
    decode_size_conditioning,
    decode_text,
    posterior_sample,
)
from sdtrain.data.shards import ShardSet, iter_shard_samples
from sdtrain.data.slot_pass import Raw, Reported, ShuffleOrder, StreamPosition, ordered_pass, read_window
from sdtrain.errors import DataError
from sdtrain.seeding import python_rng, seeded_generator

log = logging.getLogger(__name__)
Tokenizer = Callable[[list[str]], torch.Tensor]


@dataclass(kw_only=True, slots=True)
class LatentDataConfig:
    shards: Any = None
    """Manifest, brace pattern, glob, or a list of patterns (see sdtrain/data/shards.py)."""
    sources: Any = None
    """Instead of `shards`: several shard sets mixed by weight, [{shards: ..., weight: 0.7, name: laion}, ...]
    (sdtrain/data/mixing.py); per-source sample counts are logged as data/samples/<name>."""
    val_shards: Any = None
    """Held-out shards for callbacks.validation (same forms as `shards`); None = no validation loss."""
    batch_size: int = 32
    """Per-rank micro-batch size."""
    num_workers: int = 2
    """DataLoader worker processes per rank; 0 reads in the training process."""
    shuffle_buffer: int = 1000
    """Samples held for shuffling inside each worker (on top of the per-epoch shard permutation)."""
    shuffle: bool = True
    caption_dropout: float = 0.1
    """Probability that a caption is replaced by the empty prompt (trains the unconditional branch for CFG)."""
    latent_key: str = "auto"
    """auto | moments.npy | latent.npy | npy (MLPerf SD v2 moments)."""
    scaling_factor: float | None = None
    """Multiplies (latent - shift); None = the manifest's vae.scaling_factor, else 0.18215 (SD 1/2)."""
    shift_factor: Any = None
    """Subtracted before scaling: a number or one per channel; None = the manifest's vae.shift_factor, else 0."""
    text_embeddings: bool = False
    """Use the shards' pre-encoded `text.npy` instead of tokenising captions; the manifest's text_encoder must
    match the run's model.text_encoder (else a DataError)."""
    prefetch_factor: int = 2
    max_skip_fraction: float = 0.5
    """Stop with an error when more than this fraction of samples read by a worker is bad (after 100 reads)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if self.shards is not None and self.sources is not None:
            raise ValueError("give data.shards or data.sources, not both")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError("batch_size must be >= 1 and num_workers >= 0")


class Pending(NamedTuple):
    """A checked sample waiting in its bucket for a full batch."""

    latent: np.ndarray
    caption: str
    key: str
    text: np.ndarray | None  # data.text_embeddings: text.npy (L, D)
    inpaint: tuple[np.ndarray, np.ndarray] | None = None  # (K masks, K masked-image moments)
    loss_mask: np.ndarray | None = None  # (h, w) loss weights in [0, 1]; None = 1 everywhere
    source: int = 0  # index into data.sources
    size: tuple[int, int, int, int] | None = None  # SDXL: original (h, w), crop (top, left) from the json
    pooled: np.ndarray | None = None  # SDXL with data.text_embeddings: pooled.npy (P,)


class LatentStream(IterableDataset):
    """Yields dict batches forever: latents (B,C,h,w) float32, tokens (B,L) int64 (or with data.text_embeddings:
    context (B,L,D) float32 + dropped (B,) bool, + SDXL's pooled (B,P) float32), keys (sample keys), skipped
    ({reason: count} of samples dropped since the previous batch of this worker); with `inpainting`, also mask
    (B,1,h,w) float32 and masked_latents (B,C,h,w), normalised; with `masked_loss`, loss_mask (B,1,h,w) float32
    (ones for samples without a mask); with `micro_conditioning` (SDXL: pixels per latent), time_ids (B,6)
    float32 and dropped (B,) bool, the dropped captions' tokens left as they are (the model zeroes their
    embeddings, SDXL's convention). A batch holds one latent shape (aspect buckets)."""

    def __init__(
        self,
        shard_set: ShardSet,
        cfg: LatentDataConfig,
        tokenizer: Tokenizer,
        *,
        latent_channels: int,
        normalizer: LatentNormalizer,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_batch: int = 0,
        resume_positions: dict[int, dict[str, Any]] | None = None,
        transition: Transition | None = None,
        mixture: Mixture | None = None,
        inpainting: bool = False,
        masked_loss: bool = False,
        micro_conditioning: int = 0,
    ) -> None:
        self.shard_set = shard_set
        self.micro_conditioning = micro_conditioning
        self.inpainting = inpainting
        self.masked_loss = masked_loss
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.latent_channels = latent_channels
        self.normalizer = normalizer
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.place(start_batch, resume_positions, transition)
        self.mixture = mixture  # data.sources: the epoch's samples drawn from several shard sets (mixing.py)
        self.workers = max(1, cfg.num_workers)
        self.total_bad = 0  # per worker process and epoch, for the bad-sample rate check
        self.errors: list[str] = []  # shard-level problems (unreadable, truncated), already logged
        self.skipped: Counter[str] = Counter()  # reasons since the last batch; sent along with the next one

    def place(
        self,
        start_batch: int,
        resume_positions: dict[int, dict[str, Any]] | None = None,
        transition: Transition | None = None,
    ) -> None:
        """Where the stream starts: after `start_batch` batches of this rank; from each worker role's position
        after its last consumed batch where given (checkpointed by LatentDataModule); after a world-size change
        the epoch it happened in is planned from what it still owed (elastic.py), start_batch counting from it."""
        self.start_batch = start_batch
        self.resume_positions = {int(k): StreamPosition.from_dict(v) for k, v in (resume_positions or {}).items()}
        self.transition = transition

    def layout(self, accumulate: int = 1) -> StreamLayout:
        """What this stream's sample order depends on besides the data (kept with checkpointed positions)."""
        cfg = self.cfg
        return StreamLayout(
            world_size=self.world_size,
            workers=self.workers,
            batch_size=cfg.batch_size,
            accumulate=accumulate,
            shuffle_buffer=cfg.shuffle_buffer,
            shuffle=cfg.shuffle,
            seed=self.seed,
            total_samples=self.shard_set.total_samples,
            mixture=self.mixture.signature() if self.mixture is not None else "",
        )

    def epoch_plan(self, epoch: int, num_slots: int, batch_size: int) -> EpochPlan:
        """An epoch's plan for `num_slots` slots: the same on every rank (and for the world of a checkpoint)."""
        if self.mixture is not None:
            return self.mixture.plan(epoch, self.seed, self.cfg.shuffle, num_slots, batch_size)
        return plan_epoch(
            self.shard_set.sample_counts,
            world_size=num_slots,
            workers_per_rank=1,
            batch_size=batch_size,
            seed=self.seed,
            epoch=epoch,
            shuffle=self.cfg.shuffle,
        )

    def plan(self, epoch: int) -> EpochPlan:
        slots = self.world_size * self.workers
        if self.transition is not None and epoch == self.transition.epoch:
            plan = self.transition.plan(slots, self.cfg.batch_size)
            if plan is not None:
                return plan
        return self.epoch_plan(epoch, slots, self.cfg.batch_size)

    def _epochs(self) -> tuple[int, int, int]:
        """(first epoch of this stream, its batches per slot, batches per slot of a full epoch)."""
        slots = self.world_size * self.workers
        full = batches_per_slot(self.shard_set.total_samples, slots, self.cfg.batch_size)
        if self.transition is None:
            return 0, full, full
        first = self.transition.plan(slots, self.cfg.batch_size)
        return self.transition.epoch, first.batches_per_slot if first is not None else 0, full

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        # The DataLoader restarts its round-robin at worker 0; rotating roles keeps a resumed stream identical.
        worker = (physical + self.start_batch) % self.workers
        done = consumed_per_worker(self.start_batch, self.workers)[worker]
        first, first_batches, per_slot = self._epochs()
        lengths = lambda epoch: first_batches if epoch == first else per_slot  # noqa: E731
        if done < first_batches:
            epoch, skip_batches = first, done
        else:
            epoch, skip_batches = first + 1 + (done - first_batches) // per_slot, (done - first_batches) % per_slot
        position = self.resume_positions.get(worker)
        if position is not None:  # flat-cost resume: start where it stood, reading only the shuffle window
            before = 0 if position.epoch == first else first_batches + (position.epoch - first - 1) * per_slot
            if before + position.emitted != done:
                raise DataError(
                    f"the checkpoint's data position of worker {worker} ({position.emitted} batches into epoch "
                    f"{position.epoch}) disagrees with the {done} batches it produced: the checkpoint is damaged"
                )
            epoch, skip_batches = position.epoch, 0
            if position.emitted == lengths(epoch):
                epoch, position = epoch + 1, None
        while True:
            if lengths(epoch):
                yield from self._epoch_batches(epoch, worker, skip_batches, position)
            epoch, skip_batches, position = epoch + 1, 0, None

    # -- one slot, one epoch ----------------------------------------------------------------------------------
    def _epoch_batches(
        self, epoch: int, worker: int, skip_batches: int, start: StreamPosition | None
    ) -> Iterator[dict[str, Any]]:
        plan = self.plan(epoch)
        slot = self.rank * self.workers + worker
        slot_plan = plan.slots[slot]
        # Samples are grouped by latent shape (aspect buckets): a batch holds one shape. With one shape this is
        # plain consecutive batching. From a StreamPosition the pass starts where it stood and the samples that
        # waited in the buckets are read again. Without one (a checkpoint from before positions were kept) the
        # first `skip_batches` batches are replayed (read, checked, grouped, not sampled, tokenised or
        # collated). The posterior draw and caption dropout of batch k come from a generator seeded by
        # (seed, epoch, slot, k), so both ways continue bit for bit.
        groups: dict[tuple[Any, ...], list[tuple[int, Pending]]] = defaultdict(list)
        emitted, reads, self.total_bad = 0, 0, 0
        samples = self._shuffled(slot_plan, epoch, slot, start)
        if start is not None:
            emitted, reads, self.total_bad = start.emitted, start.epoch_reads, start.epoch_bad
            for number, raw in self._reread(slot_plan, start.pending):
                pending = self._checked(raw)
                groups[pending[0]].append((number, pending[1]))
        while emitted < plan.batches_per_slot:
            cycle, order, number, raw = next(samples)
            if raw is None:  # its shard went missing or was cut short: the reader counted and reported it
                continue
            reads += 1
            try:
                group_key, pending = self._checked(raw)
            except SampleError as exc:
                if emitted >= skip_batches:  # replayed skips were counted and logged by the first run
                    self.skipped[exc.reason] += 1
                    self._check_skip_rate(reads, raw, exc)
                continue
            group = groups[group_key]
            group.append((number, pending))
            if len(group) == self.cfg.batch_size:
                groups[group_key] = []
                emitted += 1
                if emitted > skip_batches:
                    generator = seeded_generator(self.seed, epoch, slot, emitted)
                    batch = self._collate([p for _, p in group], group_key[0], generator)
                    waiting = tuple(number for g in groups.values() for number, _ in g)
                    after = StreamPosition(epoch, emitted, cycle, order.state(), waiting, reads, self.total_bad, worker)
                    batch["position"] = Reported(after)
                    yield batch

    def _field(self, raw: dict[str, Any]) -> LatentField:
        return LatentField.detect(raw, self.cfg.latent_key)

    def _checked(self, raw: Raw) -> tuple[tuple[Any, ...], Pending]:
        """(bucket, sample) of a raw sample that passes every check; SampleError names what is wrong."""
        field = self._field(raw)
        latent = checked_latent(raw, field, self.latent_channels)
        caption = decode_caption(raw)
        text = decode_text(raw) if self.cfg.text_embeddings else None
        pooled = decode_pooled(raw) if self.cfg.text_embeddings and self.micro_conditioning else None
        inpaint = checked_inpainting(raw, latent.shape) if self.inpainting else None
        loss_mask = decode_loss_mask(raw, latent.shape[-2:]) if self.masked_loss else None
        source = raw.get("__source__", 0)
        size = decode_size_conditioning(raw) if self.micro_conditioning else None
        pending = Pending(latent, caption, raw["__key__"], text, inpaint, loss_mask, source, size, pooled)
        return (field.kind, latent.shape), pending

    def _check_skip_rate(self, reads: int, raw: dict[str, Any], exc: SampleError) -> None:
        log.warning("skipping sample %s in %s: %s", raw.get("__key__"), raw.get("__url__"), exc)
        self.total_bad += 1
        if reads >= 100 and self.total_bad > self.cfg.max_skip_fraction * reads:
            raise DataError(f"{self.total_bad} of {reads} samples read were bad (last: {exc}); check the shards")

    def _collate(self, batch: list[Pending], kind: str, generator: torch.Generator) -> dict[str, Any]:
        latents = posterior_sample(np.stack([p.latent for p in batch]), kind, generator)  # one vectorised draw
        latents = self.normalizer.normalize_(latents)
        dropped = (torch.rand(len(batch), generator=generator) < self.cfg.caption_dropout).numpy()
        skipped, self.skipped = dict(self.skipped), Counter()
        out = {"latents": latents, "keys": [p.key for p in batch], "skipped": skipped}
        if self.mixture is not None:
            out["sources"] = dict(Counter(self.mixture.names[p.source] for p in batch))
        if self.cfg.text_embeddings:  # hidden states instead of tokens; the module applies `dropped`
            out["context"] = torch.from_numpy(np.stack([p.text for p in batch]).astype(np.float32))
            if self.micro_conditioning:
                out["pooled"] = torch.from_numpy(np.stack([p.pooled for p in batch]).astype(np.float32))
            out["dropped"] = torch.from_numpy(dropped)
        elif self.micro_conditioning:  # SDXL: zeroed embeddings for dropped captions (the module applies them)
            out["tokens"] = self.tokenizer([p.caption for p in batch])
            out["dropped"] = torch.from_numpy(dropped)
        else:
            out["tokens"] = self.tokenizer(["" if d else p.caption for p, d in zip(batch, dropped, strict=True)])
        if self.micro_conditioning:
            out["time_ids"] = batch_time_ids([p.size for p in batch], latents.shape[-2:], self.micro_conditioning)
        if self.inpainting:  # drawn after everything above: a text-to-image run's draws stay as they were
            out.update(self._inpainting_inputs(batch, generator))
        if self.masked_loss:
            ones = np.ones(latents.shape[-2:], dtype=np.float32)
            masks = [ones if p.loss_mask is None else p.loss_mask for p in batch]
            out["loss_mask"] = torch.from_numpy(np.stack(masks)[:, None])
        return out

    def _inpainting_inputs(self, batch: list[Pending], generator: torch.Generator) -> dict[str, Any]:
        """One of each sample's K stored masks (seeded pick), and a posterior sample of its masked image."""
        picks = torch.rand(len(batch), generator=generator) * torch.tensor([len(p.inpaint[0]) for p in batch])
        picks = picks.long().tolist()
        masks = np.stack([p.inpaint[0][k] for p, k in zip(batch, picks, strict=True)])[:, None]
        moments = np.stack([p.inpaint[1][k] for p, k in zip(batch, picks, strict=True)])
        masked = self.normalizer.normalize_(posterior_sample(moments, "moments", generator))
        return {"mask": torch.from_numpy(masks.astype(np.float32)), "masked_latents": masked}

    def _read_source(
        self, slot_plan: SlotPlan, begin: int, wanted: Callable[[int], bool] | None
    ) -> Iterator[tuple[int, Raw]]:
        """(source number, raw) of the slot's samples from `begin` on, in file order (the parts of shards the
        epoch plan gave it); with `wanted`, only those numbers. Samples before a part's start are seeked past."""
        offset = 0
        for part in slot_plan.ranges:
            length = part.stop - part.start
            if offset + length <= begin:
                offset += length
                continue
            url = self.shard_set.shards[part.shard].url
            source = self.mixture.source_of(part.shard) if self.mixture is not None else 0
            base, first = offset - part.start, part.start + max(0, begin - offset)
            take = None
            if first > 0 or wanted is not None:

                def take(ordinal: int, base: int = base, first: int = first) -> bool:
                    return ordinal >= first and (wanted is None or wanted(base + ordinal))

            for ordinal, raw in iter_shard_samples(url, self._shard_error, take, stop=part.stop):
                raw["__url__"], raw["__source__"] = url, source
                yield base + ordinal, raw
            offset += length

    def _shard_error(self, reason: str) -> None:
        log.warning("%s", reason)
        self.errors.append(reason)
        self.skipped["shard_error"] += 1

    def _shuffled(
        self, slot_plan: SlotPlan, epoch: int, slot: int, start: StreamPosition | None
    ) -> Iterator[tuple[int, ShuffleOrder, int, Raw | None]]:
        """(cycle, order, source number, raw) of one shuffled pass over the slot's samples, then more passes if
        the slot must pad; from `start` on where given (see slot_pass.py). `order` is the pass's ShuffleOrder,
        whose state() is the position right after this sample.

        The buffer drains at the end of each pass, so a pass never mixes with the next: no sample is seen twice
        before every sample of the slot was seen once.
        """
        size = self.cfg.shuffle_buffer if self.cfg.shuffle else 0
        read = partial(self._read_source, slot_plan)
        first_cycle = start.cycle if start is not None else 0
        for cycle in count(first_cycle):
            resumed = start if cycle == first_cycle else None
            state = resumed.order if resumed is not None else None
            order = ShuffleOrder(slot_plan.num_samples, size, python_rng(self.seed, epoch, slot, cycle), state)
            window = read_window(read, set(order.buffer)) if resumed is not None else {}
            found = 0
            for number, raw in ordered_pass(read, order, window, order.next if resumed is not None else 0):
                found += raw is not None
                yield cycle, order, number, raw
            if found == 0 and resumed is None:
                raise DataError(f"no readable samples in this worker's shards ({'; '.join(self.errors[:3])})")

    def _reread(self, slot_plan: SlotPlan, numbers: tuple[int, ...]) -> Iterator[tuple[int, Raw]]:
        """The samples that waited in the buckets at a resume point, read again (they passed the checks once)."""
        found = read_window(partial(self._read_source, slot_plan), set(numbers))
        for number in numbers:
            if number not in found:
                raise DataError(f"sample {number} of this worker's shards is gone since the checkpoint was written")
            yield number, found[number]


def batch_time_ids(
    sizes: list[tuple[int, int, int, int] | None], latent_size: tuple[int, int], pixels_per_latent: int
) -> torch.Tensor:
    """SDXL's (B, 6) time ids: each sample's original size and crop, the batch's target size in pixels; a sample
    without size metadata counts as uncropped at the target size."""
    target = (latent_size[0] * pixels_per_latent, latent_size[1] * pixels_per_latent)
    rows = [(*(size or (*target, 0, 0)), *target) for size in sizes]
    return torch.tensor(rows, dtype=torch.float32)


def leave_termination_to_the_parent(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM: a SLURM requeue or scancel signals every process of the job, and a
    worker dying first made the training process raise "DataLoader worker ... killed by signal: Terminated".
    Workers still stop with their parent (PyTorch's worker watchdog sees it gone)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_dataloader(stream: LatentStream) -> DataLoader:
    """Batches are made in the workers (batch_size=None); persistent workers keep the epoch loop alive."""
    cfg = stream.cfg
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=cfg.num_workers > 0,
        worker_init_fn=leave_termination_to_the_parent if cfg.num_workers > 0 else None,
        prefetch_factor=cfg.prefetch_factor if cfg.num_workers > 0 else None,
        multiprocessing_context="spawn" if cfg.num_workers > 0 and torch.cuda.is_initialized() else None,
    )
