"""What the demo's FID goal asks for: FIDs against the demo's 200 reference images that no U-Net has to beat.

    .venv/bin/python bench/fid_floor.py demo_out [--groups 3]

Side by side, against the same 200 reference images (demo_out/real) and as ratios to the mean-colour baseline:
- other real images: 200 images of the same set with other captions. A generator that samples the data perfectly,
  but not these very images, scores here.
- the VAE's reconstructions of those other images: the same, through the demo's first stage. A U-Net that samples
  its latent distribution perfectly scores here unless it reproduces the reference images themselves.
- the VAE's reconstructions of the reference images (sdtrain-eval --reconstruction): the floor for a U-Net that
  reproduces every reference image exactly.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from diffusers import AutoencoderKL

sys.path.insert(0, os.path.dirname(__file__))
from _util import table  # noqa: E402

from sdtrain.demo.cli import demo_vae_folder  # noqa: E402
from sdtrain.evaluate.images import mean_colour_images, read_image_folder  # noqa: E402
from sdtrain.models.inception import InceptionFeatures, fid  # noqa: E402
from sdtrain.seeding import numpy_rng  # noqa: E402
from sdtrain.vae.metrics import reconstruct  # noqa: E402


def reconstructed(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """The VAE's reconstructions of [0, 1] images, in [0, 1] (reconstruct() works in [-1, 1])."""
    with torch.no_grad():
        return (reconstruct(vae, images * 2 - 1).clamp(-1, 1) + 1) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo_out", help="a finished sdtrain-demo folder")
    parser.add_argument("--groups", type=int, default=3, help="disjoint groups of other images (default: 3)")
    args = parser.parse_args()
    real = read_image_folder(os.path.join(args.demo_out, "real"), 32)
    pool = read_image_folder(os.path.join(args.demo_out, "images"), 32)
    references = set(real.captions)
    others = [i for i in numpy_rng(5).permutation(len(pool.names)) if pool.captions[i] not in references]
    count = len(real.names)
    if len(others) < args.groups * count:
        raise SystemExit(f"only {len(others)} other images: too few for {args.groups} groups of {count}")
    vae = AutoencoderKL.from_pretrained(demo_vae_folder(args.demo_out), local_files_only=True).eval()
    inception = InceptionFeatures(None, "cpu")
    reference = inception(real.images)
    baseline = fid(inception(mean_colour_images(real.images)), reference)
    rows: list[list[object]] = [["mean colour images (the baseline)", baseline, 1.0]]
    paired = fid(inception(reconstructed(vae, real.images)), reference)
    rows.append(["VAE reconstructions of the reference images", paired, paired / baseline])
    for label, transform in (("other real images", None), ("VAE reconstructions of other images", vae)):
        scores = []
        for group in range(args.groups):
            images = pool.images[others[group * count : (group + 1) * count]]
            scores.append(fid(inception(images if transform is None else reconstructed(transform, images)), reference))
        rows.append([f"{label} ({args.groups} groups of {count})", float(np.mean(scores)), np.mean(scores) / baseline])
        rows.append(["  range", f"{min(scores):.1f}-{max(scores):.1f}", ""])
    print(table(["images", "FID", "x baseline"], rows))


if __name__ == "__main__":
    main()
