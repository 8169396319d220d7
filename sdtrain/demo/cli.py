"""`sdtrain-demo`: the whole story on CPU with real captioned images, in 23-34 min on 2 cores with the install.

1. build a raw image-text set from installed packages (twemoji PNGs + emoji names, 32x32 px);
2. train a tiny VAE with `sdtrain-train-vae experiment=vae_demo` (a fixed number of steps) so latents decode to
   real pictures (DIR/vae_run: checkpoints, reconstruction grids, held-out PSNR/rFID, vae/ + latent statistics),
   then fine-tune its decoder with a perceptual term and latent noise, the encoder frozen
   (`experiment=vae_demo_decoder`, DIR/vae_decoder_run/vae: the VAE the rest of the demo uses);
3. encode the set into latent shards + manifest.json (moments, with measured scaling/shift, and each caption's
   hidden states from the real pretrained all-MiniLM-L6-v2 text model as text.npy);
4. train the tiny U-Net with EMA (`experiment=demo`), writing checkpoints and sample grids;
5. leave DIR/samples_final.png next to DIR/real_grid.png (the real images of the same prompts);
6. sdtrain-eval: FID of the first and the final checkpoint vs DIR/real (FID vs step), the final one again with
   autoguidance against the first, a mean-colour baseline and the VAE's reconstructions of DIR/real, the floor no
   U-Net on this VAE can beat (DIR/eval/);
7. sdtrain-report: DIR/run/report.html, the curves (loss, val loss, img/s, FID) and every sample grid on one page.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL
from torchvision.utils import make_grid, save_image

from sdtrain.checkpoint.files import load_checkpoint_meta
from sdtrain.checkpoint.format import LAST_NAME, STEP_NAME
from sdtrain.demo.emoji_images import CaptionedImage, emoji_pairs, load_pixels, write_image_folder
from sdtrain.evaluate.report import write_report
from sdtrain.models.diffusers_parts import encoder_fingerprint, read_latent_statistics
from sdtrain.prep.shard_writer import LatentSample, write_shards
from sdtrain.seeding import numpy_rng
from sdtrain.vae.metrics import encode_moments

log = logging.getLogger("sdtrain.demo")
FID_IMAGES = 200  # reference images = samples per evaluated checkpoint
# FID's sampling, measured on a 1,700-step demo checkpoint (200 samples): Euler a 30 steps at CFG 2 gave 165, DDIM 20
# steps 171 at CFG 2 and 173 at CFG 3 (189 at CFG 6 at 1,400 steps). The grids keep DDIM at CFG 6: clearer shapes.
# The final checkpoint is also sampled with autoguidance against the step-300 one: with the demo's decoder CFG 1.5 +
# AG 2.5 gave 128.9 (AG 3: 130.6); with a 500-step one of the same noise, 136.3 (CFG 2 + AG 2: 140.5, CFG 1.5 +
# AG 2 / 3: 139.6 / 137.6; conf/experiment/vae_demo_decoder.yaml).
FID_SAMPLING = ["--sampler", "euler_a", "--steps", "30", "--guidance", "1.5"]
FID_AUTOGUIDANCE = "2.5"


def demo_config() -> Any:
    """conf/experiment/demo.yaml as the U-Net run composes it (one place for its prompts and text encoder)."""
    from sdtrain.launch.config import compose_config

    return compose_config(["experiment=demo"])


def demo_prompts() -> list[str]:
    """The sample-grid prompts of the demo, for the matching grid of real images."""
    return list(demo_config().callbacks.sampling.prompts)


def text_states(captions: list[str]) -> tuple[Callable[[str], np.ndarray], dict[str, Any]]:
    """The demo's text encoder (all-MiniLM-L6-v2) run once over every distinct caption: (caption -> hidden
    states as text.npy stores them, the identity the manifest records so the run checks it is the same model)."""
    from sdtrain.config import to_object
    from sdtrain.models.text_encoder import TextEncoderConfig, build_text_encoder, build_tokenizer
    from sdtrain.prep.encode import text_encoder_identity

    text_cfg = to_object(demo_config().model.text_encoder, "model.text_encoder", TextEncoderConfig)
    tokenizer = build_tokenizer(text_cfg)
    encoder = build_text_encoder(text_cfg, pad_token_id=tokenizer.pad_token_id)
    distinct = sorted(set(captions))
    table: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for start in range(0, len(distinct), 256):
            chunk = distinct[start : start + 256]
            states = encoder(tokenizer(chunk)).to(torch.float16).numpy()
            table.update(zip(chunk, states, strict=True))
    return table.__getitem__, text_encoder_identity(dataclasses.asdict(text_cfg))


def write_reference_images(pairs: list[CaptionedImage], pixels: np.ndarray, folder: str, count: int, seed: int) -> None:
    """`count` random images of the set as NNNN.png + NNNN.txt (caption): the FID reference for sdtrain-eval."""
    chosen = sorted(numpy_rng(seed).choice(len(pairs), size=min(count, len(pairs)), replace=False))
    write_image_folder([pairs[i] for i in chosen], pixels[chosen], folder, names="{index:04d}")


def demo_vae_folder(out: str) -> str:
    """The VAE the demo's U-Net trains on: the decoder-tuned one (older demo folders: the first job's)."""
    tuned = os.path.join(out, "vae_decoder_run", "vae")
    return tuned if os.path.isdir(tuned) else os.path.join(out, "vae_run", "vae")


def run_vae_job(out: str, run_name: str, image_size: int, overrides: list[str]) -> str:
    """One `sdtrain-train-vae` job on the demo's image folders into DIR/run_name; returns its vae/ folder."""
    run_dir = os.path.abspath(os.path.join(out, run_name))
    cmd = [
        sys.executable,
        "-m",
        "sdtrain.train_vae",
        f"data.images={os.path.abspath(os.path.join(out, 'images'))}",
        f"data.val_images={os.path.abspath(os.path.join(out, 'images_val'))}",
        f"data.resolution={image_size}",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    log.info("training the VAE: %s", " ".join(cmd))
    if subprocess.call(cmd) != 0:
        raise SystemExit(f"the VAE job {run_name} failed (its log is above)")
    return os.path.join(run_dir, "vae")


def train_demo_vae(out: str, image_size: int, steps: int | None, overrides: list[str]) -> str:
    """Step 2: `sdtrain-train-vae experiment=vae_demo` (DIR/vae_run), then its decoder fine-tuned with the perceptual
    term, the encoder frozen (`experiment=vae_demo_decoder`, DIR/vae_decoder_run); returns the final vae/ folder."""
    steps_override = [f"trainer.max_steps={steps}"] if steps else []
    first = run_vae_job(out, "vae_run", image_size, ["experiment=vae_demo", *steps_override, *overrides])
    tuning = ["experiment=vae_demo_decoder", f"model.pretrained={first}", *overrides]
    return run_vae_job(out, "vae_decoder_run", image_size, tuning)


def prepare(out: str, image_size: int, vae_steps: int | None, vae_overrides: list[str]) -> tuple[str, str]:
    """Steps 1-3; returns (vae folder, manifest path); the validation set is OUT/latents_val."""
    pairs = emoji_pairs()
    pixels = load_pixels(pairs, image_size)
    log.info("raw set: %d captioned images at %dpx", len(pairs), image_size)
    rng = numpy_rng(0)
    held_out = rng.choice(len(pairs), size=min(128, len(pairs) // 10), replace=False)
    train_mask = np.ones(len(pairs), bool)
    train_mask[held_out] = False
    for folder, mask in (("images", train_mask), ("images_val", ~train_mask)):
        chosen = [p for p, keep in zip(pairs, mask, strict=True) if keep]
        write_image_folder(chosen, pixels[mask], os.path.join(out, folder))

    vae_dir = train_demo_vae(out, image_size, vae_steps, vae_overrides)
    vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True).eval()
    statistics = read_latent_statistics(vae_dir) or {}
    moments = encode_moments(vae, torch.from_numpy(pixels)).numpy()
    vae_info = {
        "name": "sdtrain-demo-vae",
        "scaling_factor": vae.config.scaling_factor,
        "shift_factor": statistics.get("shift_factor"),
        "latent_channels": moments.shape[1] // 2,
        "encoder_sha256": encoder_fingerprint(vae),
    }
    text_for, text_identity = text_states([p.caption for p in pairs])
    # The held-out images (unseen by the VAE and the U-Net) become the validation-loss set.
    for folder, mask in (("latents", train_mask), ("latents_val", ~train_mask)):
        samples = (
            LatentSample(p.key, m, p.caption, {"width": image_size, "height": image_size, "source": "twemoji"})
            for p, m, keep in zip(pairs, moments, mask, strict=True)
            if keep
        )
        write_shards(
            samples,
            os.path.join(out, folder),
            samples_per_shard=256,
            vae=vae_info,
            text_for=text_for,
            text_encoder=text_identity,
        )
    write_reference_images(pairs, pixels, os.path.join(out, "real"), count=FID_IMAGES, seed=1)
    by_caption = {p.caption: i for i, p in enumerate(pairs)}
    real = [torch.from_numpy(pixels[by_caption[c]]) for c in demo_prompts() if c in by_caption]
    save_image(
        make_grid((torch.stack(real) + 1) / 2, nrow=1, padding=2, pad_value=1.0), os.path.join(out, "real_grid.png")
    )
    return vae_dir, os.path.join(out, "latents", "manifest.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument(
        "--vae-steps", type=int, default=None, help="VAE training steps (default: experiment=vae_demo's max_steps)"
    )
    parser.add_argument(
        "--vae-override", action="append", default=[], help="a Hydra override for both VAE jobs (repeatable)"
    )
    parser.add_argument("--skip-eval", action="store_true", help="no FID evaluation after training")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the U-Net run, e.g. trainer.max_steps=200")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.makedirs(args.out, exist_ok=True)
    vae_dir, manifest = prepare(args.out, args.image_size, args.vae_steps, args.vae_override)
    run_dir = os.path.abspath(os.path.join(args.out, "run"))
    cmd = [
        sys.executable,
        "-m",
        "sdtrain.train",
        "experiment=demo",
        f"data.shards={os.path.abspath(manifest)}",
        f"data.val_shards={os.path.abspath(os.path.join(args.out, 'latents_val', 'manifest.json'))}",
        f"model.vae.pretrained={os.path.abspath(vae_dir)}",
        f"hydra.run.dir={run_dir}",
        *args.overrides,
    ]
    log.info("training the U-Net: %s", " ".join(cmd))
    code = subprocess.call(cmd)
    if code != 0:
        return code
    grids = sorted(f for f in os.listdir(os.path.join(run_dir, "samples")) if f.endswith(".png"))
    final = os.path.join(args.out, "samples_final.png")
    shutil.copyfile(os.path.join(run_dir, "samples", grids[-1]), final)
    log.info("done: %s (generated, one row per prompt) vs %s (real)", final, os.path.join(args.out, "real_grid.png"))
    eval_dir = None
    if not args.skip_eval:
        code = evaluate_run(run_dir, args.out)
        if code != 0:
            return code
        eval_dir = os.path.join(args.out, "eval")
    log.info("report: %s", write_report(run_dir, eval_dir))
    return 0


def evaluate_run(run_dir: str, out: str) -> int:
    """Step 6: FID vs the real images of the run's first step checkpoint and of its final weights (FID vs step),
    the final weights again with autoguidance against that first checkpoint (the weaker model of Karras et al.
    2024 is an earlier checkpoint of the same run), a mean-colour baseline and the VAE's reconstructions of the
    real images (the floor of any U-Net on this VAE). Checkpoints in between are kept, not scored: each costs a
    sampling pass (~1 min on 2 cores)."""
    from sdtrain.evaluate.cli import main as eval_main

    ckpt_dir = os.path.join(run_dir, "checkpoints")
    steps = sorted(f for f in os.listdir(ckpt_dir) if f.startswith("step_") and f.endswith(".ckpt"))
    # the last step is often a step checkpoint too (1,200 = 4 x 300): its FID would be sampled twice
    final_name = STEP_NAME.format(step=int(load_checkpoint_meta(os.path.join(ckpt_dir, LAST_NAME))["global_step"]))
    final = os.path.join(ckpt_dir, final_name + ".ckpt" if final_name + ".ckpt" in steps else LAST_NAME)
    first = os.path.join(ckpt_dir, steps[0]) if steps and os.path.join(ckpt_dir, steps[0]) != final else None
    checkpoints = [first, final] if first else [final]
    guide = ["--guide", first, "--autoguidance", FID_AUTOGUIDANCE] if first else []
    return eval_main(
        [*checkpoints, "--real", os.path.join(out, "real"), "--out", os.path.join(out, "eval"), "--baseline"]
        + ["--reconstruction", "--num-images", str(FID_IMAGES), *FID_SAMPLING, *guide]
    )


if __name__ == "__main__":
    sys.exit(main())
