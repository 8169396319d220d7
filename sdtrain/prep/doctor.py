"""`sdtrain-doctor PATTERN`: check a latent shard set before spending GPU hours on it.

Reads every sample of every shard: readable tars, required keys, latent shapes/dtypes/finite values, UTF-8
captions, parseable json, text.npy shapes, inpainting members and loss masks where present; counts samples and
compares them (and the latent shape) with the manifest; prints per-channel latent mean/std and caption-length
stats. Latent statistics far from the VAE's normal range suggest pixels were not normalised to [-1, 1] (the MLPerf
SD v2 set is such a case); with --vae a few samples are decoded and the pixel range reported. Exit 1 on errors (2
on bad arguments), 0 otherwise; --strict makes warnings errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sdtrain.data.normalizer import SD_SCALING_FACTOR
from sdtrain.data.samples import (
    MASKS_MEMBER,
    MOMENTS_MEMBER,
    POOLED_MEMBER,
    TEXT_MEMBER,
    LatentField,
    SampleError,
    checked_inpainting,
    checked_latent,
    decode_caption,
    decode_loss_mask,
    decode_pooled,
    decode_text,
    latent_channels,
)
from sdtrain.data.shards import ShardSet, iter_raw_samples, resolve_shards
from sdtrain.errors import command_line

log = logging.getLogger("sdtrain.doctor")
SCALED_STD_RANGE = (0.5, 2.0)  # std of (z - mean) * scaling_factor for a healthy set is ~1


@dataclass
class Report:
    samples: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    bad: Counter[str] = field(default_factory=Counter)
    shapes: Counter[str] = field(default_factory=Counter)
    dtypes: Counter[str] = field(default_factory=Counter)
    members: Counter[str] = field(default_factory=Counter)  # samples holding each optional member kind
    caption_lengths: list[int] = field(default_factory=list)
    channel_sum: np.ndarray | None = None
    channel_sq: np.ndarray | None = None
    channel_count: int = 0
    latent_means: list[np.ndarray] = field(default_factory=list)  # a few, for decoding
    stats: dict[str, Any] = field(default_factory=dict)

    def add_latent(self, mean: np.ndarray) -> None:
        m = mean.astype(np.float64)
        if self.channel_sum is None or self.channel_sum.shape[0] != m.shape[0]:
            if self.channel_sum is not None:
                return  # other channel count: already an error
            self.channel_sum, self.channel_sq = np.zeros(m.shape[0]), np.zeros(m.shape[0])
        self.channel_sum += m.sum(axis=(1, 2))
        self.channel_sq += (m**2).sum(axis=(1, 2))
        self.channel_count += m.shape[1] * m.shape[2]


def check_sample(raw: dict[str, Any], field_: LatentField, report: Report, keep_for_decode: int) -> None:
    array = checked_latent(raw, field_, None)
    caption = decode_caption(raw)
    if "json" in raw:
        try:
            json.loads(raw["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SampleError("bad_json", "json metadata does not parse") from None
    if TEXT_MEMBER in raw:
        text = decode_text(raw)
        report.shapes[f"text {'x'.join(map(str, text.shape))}"] += 1
    if POOLED_MEMBER in raw:
        report.shapes[f"pooled {'x'.join(map(str, decode_pooled(raw).shape))}"] += 1
    if field_.kind == "moments" and (MASKS_MEMBER in raw or MOMENTS_MEMBER in raw):
        report.members[f"inpainting x{len(checked_inpainting(raw, array.shape)[0])}"] += 1
    if decode_loss_mask(raw, array.shape[-2:]) is not None:
        report.members["loss_mask"] += 1
    report.shapes["x".join(map(str, array.shape))] += 1
    report.dtypes[str(array.dtype)] += 1
    report.caption_lengths.append(len(caption))
    mean = array[: latent_channels(array, field_.kind)] if field_.kind == "moments" else array
    report.add_latent(mean)
    if len(report.latent_means) < keep_for_decode:
        report.latent_means.append(mean.astype(np.float32))


def examine(shard_set: ShardSet, latent_key: str = "auto", keep_for_decode: int = 0) -> Report:
    report = Report()
    field_: LatentField | None = None
    for shard in shard_set.shards:
        if not os.path.exists(shard.url) and "://" not in shard.url:
            report.errors.append(f"missing shard file {shard.url}")
            continue
        count = 0
        for raw in iter_raw_samples(shard.url, lambda reason: report.errors.append(reason)):
            count += 1
            try:
                field_ = field_ or LatentField.detect(raw, latent_key)
                check_sample(raw, field_, report, keep_for_decode)
            except SampleError as exc:
                report.bad[exc.reason] += 1
                if report.bad[exc.reason] <= 3:
                    report.errors.append(f"{shard.url} sample {raw.get('__key__')}: {exc}")
        report.samples += count
        if shard_set.manifest and count != shard.num_samples:
            report.errors.append(f"{shard.url}: manifest says {shard.num_samples} samples, the tar has {count}")
    return report


def summarise(report: Report, shard_set: ShardSet) -> None:
    manifest = shard_set.manifest or {}
    if len(report.shapes) > 1 and not any(k.startswith("text") for k in report.shapes):
        report.warnings.append(f"latent shapes differ: {dict(report.shapes)} (fine for aspect buckets)")
    expected = manifest.get("latent_shape")
    top = report.shapes.most_common(1)[0][0] if report.shapes else None
    if expected and top and top != "x".join(map(str, expected)) and not (manifest.get("encode") or {}).get("buckets"):
        report.errors.append(f"manifest latent_shape {expected} but the samples hold {top}")
    if report.channel_count:
        mean = report.channel_sum / report.channel_count
        std = np.sqrt(np.maximum(report.channel_sq / report.channel_count - mean**2, 0.0))
        scale = float((manifest.get("vae") or {}).get("scaling_factor") or SD_SCALING_FACTOR)
        pooled = float(np.sqrt(np.mean(std**2 + (mean - mean.mean()) ** 2)))
        report.stats.update(channel_mean=mean.round(4).tolist(), channel_std=std.round(4).tolist())
        report.stats["scaled_std"] = round(pooled * scale, 4)
        low, high = SCALED_STD_RANGE
        if not low <= pooled * scale <= high:
            report.warnings.append(
                f"latent std x scaling_factor = {pooled * scale:.3f} (expected ~1): wrong scaling_factor, or pixels "
                "not normalised to [-1, 1] when encoding; check with --vae"
            )
    if report.caption_lengths:
        lengths = np.asarray(report.caption_lengths)
        report.stats["caption_chars"] = {
            "mean": round(float(lengths.mean()), 1),
            "min": int(lengths.min()),
            "max": int(lengths.max()),
            "empty": int((lengths == 0).sum()),
        }


@torch.no_grad()
def decode_check(report: Report, vae_dir: str) -> None:
    """Decode the kept latent means; pixels of a set encoded from [-1, 1] images span about [-1, 1]."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True, low_cpu_mem_usage=False).eval()
    shapes = Counter(m.shape for m in report.latent_means)
    same = [m for m in report.latent_means if m.shape == shapes.most_common(1)[0][0]]
    pixels = vae.decode(torch.from_numpy(np.stack(same))).sample.float()
    p01, p99 = (float(torch.quantile(pixels.flatten()[:1_000_000], q)) for q in (0.01, 0.99))
    report.stats["decoded_pixels"] = {"p01": round(p01, 3), "p99": round(p99, 3), "images": len(same)}
    if p01 > -0.5 and p99 < 1.3:
        report.warnings.append(
            f"decoded pixels span [{p01:.2f}, {p99:.2f}] (1st-99th percentile), like [0, 1] images: the set was "
            "probably encoded without normalising pixels to [-1, 1]"
        )
    elif p01 < -1.6 or p99 > 1.6:
        report.warnings.append(f"decoded pixels span [{p01:.2f}, {p99:.2f}]: is --vae the VAE that encoded this set?")


def print_report(report: Report, shard_set: ShardSet) -> None:
    print(
        f"shards: {len(shard_set.shards)}  samples read: {report.samples}"
        + (f"  manifest: {shard_set.total_samples}" if shard_set.manifest else "")
    )
    print(f"latent shapes: {dict(report.shapes)}  dtypes: {dict(report.dtypes)}")
    if report.members:
        print(f"optional members: {dict(report.members)}")
    for key, value in report.stats.items():
        print(f"{key}: {value}")
    if report.bad:
        print(f"bad samples: {dict(report.bad)}")
    for w in report.warnings:
        print(f"WARNING: {w}")
    for e in report.errors[:20]:
        print(f"ERROR: {e}")
    if len(report.errors) > 20:
        print(f"... {len(report.errors) - 20} more errors")
    print("OK" if not report.errors else f"FAILED: {len(report.errors)} errors")


@command_line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", help="manifest.json, its folder, a brace pattern or a glob")
    parser.add_argument("--latent-key", default="auto", help="auto | moments.npy | latent.npy | npy (MLPerf)")
    parser.add_argument("--vae", help="decode a few samples with this diffusers VAE folder and report pixel range")
    parser.add_argument("--decode", type=int, default=16, help="samples to decode with --vae")
    parser.add_argument("--json", help="also write the report as JSON to this path")
    parser.add_argument("--strict", action="store_true", help="warnings count as errors")
    args = parser.parse_args(argv)
    shard_set = resolve_shards(args.shards)
    report = examine(shard_set, args.latent_key, keep_for_decode=args.decode if args.vae else 0)
    summarise(report, shard_set)
    if args.vae and report.latent_means:
        decode_check(report, args.vae)
    print_report(report, shard_set)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "samples": report.samples,
                    "errors": report.errors,
                    "warnings": report.warnings,
                    "bad": dict(report.bad),
                    "shapes": dict(report.shapes),
                    "members": dict(report.members),
                    **report.stats,
                },
                f,
                indent=1,
            )
    failed = bool(report.errors) or (args.strict and bool(report.warnings))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
