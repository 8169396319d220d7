"""Encode raw image-text parts into latent shards: decode -> filter -> crop -> VAE moments (+ text embeddings).

Resumable and parallel by construction:
- the work is a fixed list of input parts (sources.plan_parts); rank r of W takes parts r, r+W, ...; a pool of
  worker processes encodes a rank's parts;
- part P writes OUT/PPPPPP_CCC.tar (each via a temp name + rename) and, last, OUT/parts/PPPPPP.json listing its
  shards and counts. A part with that file is done and skipped on a re-run; any other output of a part is
  removed and the part encoded again. A part's output depends only on its input and the config (fixed tar
  mtimes, crops seeded by key), so a killed and re-run job writes the same bytes as an uninterrupted one;
- `merge` writes OUT/manifest.json from the part files once every part is done (any rank may call it).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import tempfile
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from sdtrain.data import storage
from sdtrain.data.normalizer import SD_SCALING_FACTOR
from sdtrain.data.samples import LOSS_MASK_MEMBER, POOLED_MEMBER, SampleError, average_down
from sdtrain.data.shards import MANIFEST_NAME
from sdtrain.errors import ConfigError, DataError
from sdtrain.models.diffusers_parts import vae_scale_factor
from sdtrain.prep.filters import FilterConfig, rejection
from sdtrain.prep.images import decode_image, decode_mask, nearest_bucket, resize_and_crop
from sdtrain.prep.inpaint_masks import MASKS_MEMBER, MOMENTS_MEMBER, draw_mask, latent_mask, mask_rng
from sdtrain.prep.shard_writer import LatentSample, ShardSink, manifest, write_json_atomic
from sdtrain.prep.sources import InputPart, RawSample, iter_part, plan_parts
from sdtrain.seeding import crop_rng

log = logging.getLogger(__name__)
PARTS_DIR = "parts"


@dataclass(kw_only=True, slots=True)
class EncodeConfig:
    inputs: list[str]
    out: str
    vae: str
    """Local diffusers AutoencoderKL folder (SD's VAE, or one trained by sdtrain-demo)."""
    resolution: int = 512
    buckets: list[list[int]] | None = None
    """[[w, h], ...] aspect buckets (SDXL style); each image goes to the closest ratio. None = square crops."""
    random_crop: bool = False
    """Random instead of centre crop (seeded by the sample key, so re-runs crop the same)."""
    batch_size: int = 16
    samples_per_shard: int = 1000
    files_per_part: int = 1000
    dtype: str = "float16"
    workers: int = 1
    """Encoding processes on this rank; 0 = in this process."""
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    device: str = "cpu"
    text_encoder: dict[str, Any] | None = None
    """A TextEncoderConfig (arch, pretrained, layer, ...) to also store `text.npy` hidden states; None = no."""
    text_encoder_2: dict[str, Any] | None = None
    """SDXL's second text encoder: text.npy then holds both encoders' states concatenated, `pooled.npy` the
    second's pooled projection (as training encodes them: models/sdxl_text.py)."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    min_image_size: int = 8
    """Images with a side below this are skipped as `too_small` (never upscaled from nothing)."""
    inpainting_masks: int = 0
    """K > 0: also K random masks per sample and their masked images' moments (prep/inpaint_masks.py)."""

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {self.rank} of {self.world_size}")
        if not 0 <= self.inpainting_masks <= 16:
            raise ValueError(f"inpainting_masks must be in [0, 16], got {self.inpainting_masks}")
        if self.text_encoder_2 is not None and self.text_encoder is None:
            raise ValueError("text_encoder_2 (SDXL's second encoder) needs text_encoder as well")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be float16 or float32, got {self.dtype!r}")
        for bucket in self.buckets or []:
            if len(bucket) != 2 or bucket[0] % 8 or bucket[1] % 8:
                raise ValueError(f"buckets are [w, h] multiples of 8, got {bucket}")


def _in(out: str, name: str) -> str:
    return storage.join(out, name) if storage.is_remote(out) else os.path.join(out, name)


def part_record_path(out: str, index: int) -> str:
    return _in(out, f"{PARTS_DIR}/{index:06d}.json")


def part_done(out: str, index: int) -> bool:
    """The part's record is there and so is every shard it lists (in OUT, local or in object storage)."""
    path = part_record_path(out, index)
    if not storage.exists(path):
        return False
    record = json.loads(storage.read_text(path))
    return all(storage.exists(_in(out, s["url"])) for s in record["shards"])


def work_dir(cfg: EncodeConfig) -> str:
    """Where this process writes: OUT itself or, for an OUT in object storage (s3://...), a local staging folder
    from which each part is uploaded when it is done (its shards, then its record; the manifest last of all)."""
    if not storage.is_remote(cfg.out):
        return cfg.out
    return os.path.join(tempfile.gettempdir(), "sdtrain-encode-" + hashlib.sha1(cfg.out.encode()).hexdigest()[:12])


def publish_part(cfg: EncodeConfig, record: dict[str, Any]) -> None:
    """Upload a finished part from the staging folder to OUT (shards first, the record that marks it done last)
    and free the staging space."""
    work = work_dir(cfg)
    for entry in record["shards"]:
        storage.put(os.path.join(work, entry["url"]), _in(cfg.out, entry["url"]))
        os.remove(os.path.join(work, entry["url"]))
    storage.put(part_record_path(work, record["part"]), part_record_path(cfg.out, record["part"]))


def remove_part_outputs(out: str, index: int) -> None:
    for path in glob.glob(os.path.join(out, f"{index:06d}_*.tar*")):
        os.remove(path)


class Encoder:
    """The models of one worker: VAE (+ optional text encoder)."""

    def __init__(self, cfg: EncodeConfig) -> None:
        from diffusers import AutoencoderKL

        if not os.path.isfile(os.path.join(cfg.vae, "config.json")):
            raise ConfigError(f"--vae {cfg.vae} is not a diffusers AutoencoderKL folder (no config.json)")
        self.cfg = cfg
        self.vae = AutoencoderKL.from_pretrained(cfg.vae, local_files_only=True, low_cpu_mem_usage=False)
        self.vae.requires_grad_(False).eval().to(cfg.device)
        self.text = None
        if cfg.text_encoder is not None:
            from sdtrain.models.builder import build_text

            first, second = text_encoder_configs(cfg)
            self.tokenizer, text = build_text(first, second)
            self.text = text.to(cfg.device)

    @torch.no_grad()
    def moments(self, pixels: list[np.ndarray]) -> np.ndarray:
        x = torch.from_numpy(np.stack(pixels)).to(self.cfg.device)
        return self.vae.encode(x).latent_dist.parameters.float().cpu().numpy()

    def inpainting(self, keys: list[str], pixels: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Per sample: K masks at latent size and the moments of each masked image (one batched encode)."""
        k = self.cfg.inpainting_masks
        if not k:
            return [{} for _ in keys]
        factor = vae_scale_factor(self.vae)
        masks, masked = [], []
        for key, image in zip(keys, pixels, strict=True):
            for i in range(k):
                mask = draw_mask(image.shape[2], image.shape[1], mask_rng(self.cfg.seed, key, i))
                masks.append(latent_mask(mask, factor))
                masked.append(image * (mask < 1)[None].astype(image.dtype))
        moments = self.moments(masked)
        return [
            {
                MASKS_MEMBER: np.stack(masks[j * k : (j + 1) * k]),
                MOMENTS_MEMBER: moments[j * k : (j + 1) * k].astype(self.cfg.dtype),
            }
            for j in range(len(keys))
        ]

    def loss_masks(self, masks: list[np.ndarray | None]) -> list[dict[str, np.ndarray]]:
        """Per sample: its pixel loss mask averaged down to the latent size, as a `mask.npy` member (or none)."""
        factor = vae_scale_factor(self.vae)
        return [{} if m is None else {LOSS_MASK_MEMBER: average_down(m, factor).astype(np.float16)} for m in masks]

    @torch.no_grad()
    def text_states(self, captions: list[str]) -> list[tuple[np.ndarray | None, dict[str, np.ndarray]]]:
        """Per caption: its text.npy (None without a text encoder) and, for SDXL, {pooled.npy: ...}."""
        if self.text is None:
            return [(None, {})] * len(captions)
        states = self.text.encode(self.tokenizer(captions).to(self.cfg.device))
        context = states.context.to(torch.float16).cpu().numpy()
        if states.pooled is None:
            return [(c, {}) for c in context]
        pooled = states.pooled.to(torch.float16).cpu().numpy()
        return [(c, {POOLED_MEMBER: p}) for c, p in zip(context, pooled, strict=True)]


class Prepared(NamedTuple):
    key: str
    pixels: np.ndarray
    caption: str
    meta: dict[str, Any]
    bucket: tuple[int, int]
    loss_mask: np.ndarray | None  # (h, w) in [0, 1] at the pixel size, through the image's resize and crop


def prepare_sample(raw: RawSample, cfg: EncodeConfig) -> Prepared:
    """A raw sample -> pixels, caption, json meta, bucket (and loss mask); SampleError for bad data,
    ('filtered', name) too."""
    if raw.image is None:
        raise SampleError("missing_image", "no image file")
    if raw.caption is None:
        raise SampleError("missing_caption", "no caption")
    try:
        caption = raw.caption.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SampleError("bad_caption", "caption is not valid UTF-8") from None
    image = decode_image(raw.image)
    if min(image.size) < cfg.min_image_size:
        raise SampleError("too_small", f"{image.size[0]}x{image.size[1]} px")
    dropped = rejection(cfg.filters, raw.meta, caption, image.size)
    if dropped:
        raise SampleError(f"filtered:{dropped}", "")
    buckets = [tuple(b) for b in cfg.buckets] if cfg.buckets else [(cfg.resolution, cfg.resolution)]
    bucket = nearest_bucket(image.width, image.height, buckets) if len(buckets) > 1 else buckets[0]
    rng = crop_rng(cfg.seed, raw.key)
    mask = decode_mask(raw.mask, image.size) if raw.mask is not None else None
    pixels, crop, loss_mask = resize_and_crop(image, bucket, random_crop=cfg.random_crop, rng=rng, mask=mask)
    laion = {k: raw.meta[k] for k in ("url", "aesthetic", "punsafe", "similarity", "pwatermark") if k in raw.meta}
    meta = {**crop.meta(), **laion, **({"bucket": list(bucket)} if cfg.buckets else {})}
    return Prepared(raw.key, pixels, caption, meta, bucket, loss_mask)


def encode_part(part: InputPart, cfg: EncodeConfig, encoder: Encoder) -> dict[str, Any]:
    """Encode one part into its shards, then write its record (and upload both to an OUT in object storage);
    returns the record."""
    work = work_dir(cfg)
    remove_part_outputs(work, part.index)
    sink = ShardSink(
        work,
        samples_per_shard=cfg.samples_per_shard,
        dtype=cfg.dtype,
        name_for=lambda chunk: f"{part.index:06d}_{chunk:03d}.tar",
    )
    skipped: Counter[str] = Counter()
    filtered: Counter[str] = Counter()
    pending: dict[tuple[int, int], list[Prepared]] = defaultdict(list)
    shapes: Counter[str] = Counter()

    def flush(bucket: tuple[int, int]) -> None:
        batch, pending[bucket] = pending[bucket], []
        if not batch:
            return
        pixels = [b.pixels for b in batch]
        moments = encoder.moments(pixels)
        texts = encoder.text_states([b.caption for b in batch])
        inpainting = encoder.inpainting([b.key for b in batch], pixels)
        masks = encoder.loss_masks([b.loss_mask for b in batch])
        for b, m, (text, pooled), inpaint, mask in zip(batch, moments, texts, inpainting, masks, strict=True):
            sink.add(LatentSample(b.key, m, b.caption, b.meta), text, {**pooled, **inpaint, **mask})
            shapes["x".join(map(str, m.shape))] += 1

    for raw in iter_part(part, lambda reason: skipped.update([reason.split(":")[0]])):
        try:
            prepared = prepare_sample(raw, cfg)
        except SampleError as exc:
            if exc.reason.startswith("filtered:"):
                filtered[exc.reason.split(":", 1)[1]] += 1
            else:
                skipped[exc.reason] += 1
            continue
        pending[prepared.bucket].append(prepared)
        if len(pending[prepared.bucket]) == cfg.batch_size:
            flush(prepared.bucket)
    for bucket in sorted(pending):
        flush(bucket)
    entries = sink.close()
    record = {
        "part": part.index,
        "input": {"kind": part.kind, "location": part.location, "start": part.start, "stop": part.stop},
        "shards": entries,
        "kept": sum(e["num_samples"] for e in entries),
        "filtered": dict(filtered),
        "skipped": dict(skipped),
        "latent_shapes": dict(shapes),
    }
    os.makedirs(os.path.join(work, PARTS_DIR), exist_ok=True)
    write_json_atomic(part_record_path(work, part.index), record)
    if work != cfg.out:
        publish_part(cfg, record)
    return record


def text_encoder_configs(cfg: EncodeConfig) -> tuple[Any, Any]:
    """The TextEncoderConfig(s) text.npy is encoded with: (first, SDXL's second or None)."""
    from sdtrain.models.text_encoder import TextEncoderConfig

    second = TextEncoderConfig(**cfg.text_encoder_2) if cfg.text_encoder_2 is not None else None
    return TextEncoderConfig(**(cfg.text_encoder or {})), second


def text_encoder_identity(text_encoder: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the manifest records about an encoder of `text.npy` (the loader compares it with the run's)."""
    if text_encoder is None:
        return None
    from sdtrain.models.text_encoder import TextEncoderConfig

    return {**TextEncoderConfig(**text_encoder).identity(), "dtype": "float16"}


def text_encoder_records(cfg: EncodeConfig) -> dict[str, Any]:
    """The manifest's `text_encoder` (+ SDXL's `text_encoder_2`) records."""
    records = {"text_encoder": text_encoder_identity(cfg.text_encoder)}
    if cfg.text_encoder_2 is not None:
        records["text_encoder_2"] = text_encoder_identity(cfg.text_encoder_2)
    return records


def merge(cfg: EncodeConfig, parts: list[InputPart]) -> dict[str, Any] | None:
    """Write OUT/manifest.json from every part record; None (and a log line) while parts are missing."""
    missing = [p.index for p in parts if not part_done(cfg.out, p.index)]
    if missing:
        log.info("merge: %d of %d parts not done yet (first: %d)", len(missing), len(parts), missing[0])
        return None
    records = []
    for part in parts:
        records.append(json.loads(storage.read_text(part_record_path(cfg.out, part.index))))
    entries = [s for r in records for s in r["shards"]]
    if not entries:
        raise DataError("no sample survived decoding and filters; nothing to write")
    shapes: Counter[str] = Counter()
    report: dict[str, Counter[str]] = {"filtered": Counter(), "skipped": Counter()}
    for r in records:
        shapes.update(r["latent_shapes"])
        report["filtered"].update(r["filtered"])
        report["skipped"].update(r["skipped"])
    first_shape = [int(x) for x in shapes.most_common(1)[0][0].split("x")]
    from diffusers import AutoencoderKL

    from sdtrain.models.diffusers_parts import encoder_fingerprint, read_latent_statistics

    vae_config = AutoencoderKL.load_config(cfg.vae)
    statistics = read_latent_statistics(cfg.vae)
    result = manifest(
        entries,
        latent_shape=first_shape,
        vae={
            "name": os.path.basename(os.path.normpath(cfg.vae)),
            "scaling_factor": vae_config.get("scaling_factor", SD_SCALING_FACTOR),
            # per-channel means measured by sdtrain-train-vae (vae/export.py), else the config's (SD3: a number)
            "shift_factor": (statistics or {}).get("shift_factor", vae_config.get("shift_factor")),
            "latent_channels": vae_config.get("latent_channels"),
            "encoder_sha256": encoder_fingerprint(AutoencoderKL.from_pretrained(cfg.vae, local_files_only=True)),
        },
        **text_encoder_records(cfg),
        encode={
            "resolution": cfg.resolution,
            "buckets": cfg.buckets,
            "random_crop": cfg.random_crop,
            "dtype": cfg.dtype,
            "inpainting_masks": cfg.inpainting_masks,
            "filters": asdict(cfg.filters),
            "kept": sum(e["num_samples"] for e in entries),
            "filtered": dict(report["filtered"]),
            "skipped": dict(report["skipped"]),
            "latent_shapes": dict(shapes),
        },
    )
    write_json_atomic(os.path.join(work_dir(cfg), MANIFEST_NAME), result)
    if storage.is_remote(cfg.out):  # uploaded last: a reader that finds the manifest finds every shard
        storage.put(os.path.join(work_dir(cfg), MANIFEST_NAME), _in(cfg.out, MANIFEST_NAME))
    return result


def my_parts(cfg: EncodeConfig) -> tuple[list[InputPart], list[InputPart]]:
    """(all parts, this rank's parts not done yet)."""
    parts = plan_parts(cfg.inputs, cfg.files_per_part)
    todo = [p for p in parts[cfg.rank :: cfg.world_size] if not part_done(cfg.out, p.index)]
    return parts, todo
