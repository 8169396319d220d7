"""`sdtrain-sample CKPT`: prompts -> PNGs + a grid, from a training checkpoint (EMA weights by default).

    sdtrain-sample run/checkpoints/last.ckpt --prompt "red heart" --prompt "cat face" --seeds 0 1 2 --out samples/
    sdtrain-sample last.ckpt --prompts-file prompts.txt --sampler dpm++ --steps 20 --guidance 6 --batch-size 16
    sdtrain-sample last.ckpt --prompt "a red heart" --init-image photo.png --strength 0.6     (img2img)
    sdtrain-sample inpaint.ckpt --prompt "a cat" --init-image photo.png --mask mask.png        (inpainting)

One image per (prompt, seed): the same seed gives the same image whatever the batch size or device, and the
exported diffusers folder (sdtrain-export) reproduces it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Sequence

import torch
from torchvision.utils import save_image
from tqdm import tqdm

from sdtrain.checkpoint.format import WEIGHTS
from sdtrain.checkpoint.trained import TrainedModel, load_trained
from sdtrain.diffusion.editing import EditInputs, load_edit_inputs
from sdtrain.diffusion.grid import labelled_grid
from sdtrain.diffusion.sampling import SCHEDULERS, SamplingConfig, generate
from sdtrain.errors import ConfigError, command_line
from sdtrain.models.diffusers_parts import vae_scale_factor

GRID = SamplingConfig()  # the CLI's sampling defaults are the training grids' (diffusion/sampling.py)
AUTOGUIDANCE = 2.0  # measured on the demo (README): its final checkpoint guided by its step-300 one (a quarter)
log = logging.getLogger("sdtrain.sample")


def read_prompts(path: str) -> list[str]:
    """One prompt per non-empty line; ConfigError for a missing or non-UTF-8 file."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise ConfigError(f"prompt file not found: {path}") from None
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise ConfigError(f"prompt file {path} is not valid UTF-8 (line {line}, byte {exc.start})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"prompt file {path} has no prompts")
    return prompts


def latent_shape_for(model: TrainedModel, height: int | None, width: int | None) -> tuple[int, ...]:
    """Latent (C, h, w) for an image size in pixels; the training size when none is given."""
    channels, h, w = model.latent_shape
    factor = vae_scale_factor(model.vae)
    if height is None and width is None:
        return channels, h, w
    height, width = height or h * factor, width or w * factor
    if height % factor or width % factor:
        raise ConfigError(f"image size {height}x{width} must be a multiple of the VAE's factor {factor}")
    return channels, height // factor, width // factor


def sample_images(
    model: TrainedModel,
    pairs: Sequence[tuple[str, int]],
    cfg: SamplingConfig,
    *,
    batch_size: int,
    latent_shape: tuple[int, ...],
    progress: bool = False,
    edit: EditInputs | None = None,
    guide: TrainedModel | None = None,
) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] for (prompt, seed) pairs, `batch_size` at a time; `edit` holds one init
    image (and mask) for all pairs; `guide` is the weaker model of `cfg.autoguidance` (load_guide)."""
    tokenizer = model.tokenizer
    out = []
    batches = range(0, len(pairs), batch_size)
    for start in tqdm(batches, desc="sampling", unit="batch", disable=not progress):
        chunk = pairs[start : start + batch_size]
        out.append(
            generate(
                unet=model.unet,
                vae=model.vae,
                text_encoder=model.text_encoder,
                tokenizer=tokenizer,
                normalizer=model.normalizer,
                prompts=[p for p, _ in chunk],
                seeds=[s for _, s in chunk],
                latent_shape=latent_shape,
                cfg=cfg,
                train_scheduler_config=model.diffusion.scheduler_config(),
                edit=repeated(edit, len(chunk)),
                inpainting=model.diffusion.inpainting,
                guide=guide.unet if guide is not None else None,
            ).cpu()
        )
    return torch.cat(out)


def load_guide(path: str, model: TrainedModel, weights: str, device: str) -> TrainedModel:
    """The weaker model for autoguidance: Karras et al. use a smaller and shorter-trained model of the same kind;
    an earlier checkpoint of the same run is the simplest. ConfigError when its latents, text conditioning or noise
    schedule differ."""
    guide = load_trained(path, weights, device)
    check_guide(guide, model, path)
    return guide


def check_guide(guide: TrainedModel, model: TrainedModel, path: str) -> None:
    """ConfigError when the guide loaded from PATH cannot guide MODEL (see load_guide)."""
    same = {
        "latent shape": guide.latent_shape == model.latent_shape,
        "text encoder": guide.text_config == model.text_config and guide.text_config_2 == model.text_config_2,
        "noise schedule": guide.diffusion.scheduler_config() == model.diffusion.scheduler_config(),
        "U-Net inputs": guide.unet.config.in_channels == model.unet.config.in_channels,
    }
    differing = [name for name, ok in same.items() if not ok]
    if differing:
        raise ConfigError(f"guide {path} cannot guide this checkpoint: they differ in {', '.join(differing)}")


def repeated(edit: EditInputs | None, n: int) -> EditInputs | None:
    """The one init image (and mask) of the command line, for each of `n` images of a batch."""
    if edit is None:
        return None
    masks = edit.masks.expand(n, -1, -1, -1) if edit.masks is not None else None
    return EditInputs(edit.pixels.expand(n, -1, -1, -1), masks, edit.strength)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "prompt"


def write_images(images: torch.Tensor, pairs: Sequence[tuple[str, int]], out: str, seeds_per_prompt: int) -> str:
    """PNG per image, grid.png (a row per prompt) and samples.jsonl (file, prompt, seed); returns the grid path."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "samples.jsonl"), "w", encoding="utf-8") as index:
        for i, (image, (prompt, seed)) in enumerate(zip(images, pairs, strict=True)):
            name = f"{i:04d}_{slug(prompt)}_s{seed}.png"
            save_image(image, os.path.join(out, name))
            index.write(json.dumps({"file": name, "prompt": prompt, "seed": seed}, ensure_ascii=False) + "\n")
    grid = os.path.join(out, "grid.png")
    prompts = [prompt for prompt, _ in pairs[::seeds_per_prompt]]
    labelled_grid(images, prompts, seeds_per_prompt).save(grid)
    return grid


def add_autoguidance_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--guide", help="autoguidance: a weaker checkpoint of the same run (e.g. an earlier step)")
    parser.add_argument(
        "--autoguidance", type=float, help=f"autoguidance weight with --guide (default {AUTOGUIDANCE}; 1 = off)"
    )


def autoguidance_weight(args: argparse.Namespace) -> float:
    """--autoguidance as SamplingConfig takes it: 1 (off) without --guide, which it needs."""
    if args.guide is None:
        if args.autoguidance is not None:
            raise ConfigError("--autoguidance needs --guide (the weaker checkpoint to guide against)")
        return 1.0
    return AUTOGUIDANCE if args.autoguidance is None else args.autoguidance


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a training checkpoint (.ckpt)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="a UTF-8 text file, one prompt per line")
    parser.add_argument("--out", default="samples", help="output folder (default: samples)")
    parser.add_argument("--seeds", type=int, nargs="+", default=GRID.seeds, help="one image per prompt and seed")
    parser.add_argument("--sampler", choices=sorted(SCHEDULERS), default=GRID.sampler)
    parser.add_argument("--steps", type=int, default=GRID.steps, help=f"default {GRID.steps}, as training grids")
    parser.add_argument("--guidance", type=float, default=GRID.guidance, help="CFG scale; 1 = conditional only")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--height", type=int, help="pixels (default: the training size)")
    parser.add_argument("--width", type=int, help="pixels (default: the training size)")
    parser.add_argument("--guidance-rescale", type=float, default=GRID.guidance_rescale, help="rescaled CFG, 0-1")
    parser.add_argument("--init-image", help="img2img: start from this image (resized to the sampling size)")
    parser.add_argument(
        "--strength",
        type=float,
        help=f"img2img: 0 = keep the image, 1 = pure noise (default {GRID.strength}; 1 with --mask)",
    )
    parser.add_argument("--mask", help="inpainting checkpoints: white = repaint, black = keep; the image's size")
    parser.add_argument("--weights", choices=WEIGHTS, default="ema", help="EMA (default) or raw U-Net weights")
    add_autoguidance_args(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> str:
    prompts = list(args.prompt) + (read_prompts(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise ConfigError("give prompts with --prompt or --prompts-file")
    if args.steps < 1 or args.batch_size < 1:
        raise ConfigError("--steps and --batch-size must be >= 1")
    if args.mask and not args.init_image:
        raise ConfigError("--mask needs --init-image (the image the mask applies to)")
    model = load_trained(args.checkpoint, args.weights, args.device)
    if args.mask and not model.diffusion.inpainting:
        raise ConfigError(
            f"--mask needs an inpainting checkpoint (diffusion.inpainting=true); {args.checkpoint} is text-to-image "
            "(use --init-image alone for img2img)"
        )
    shape = latent_shape_for(model, args.height, args.width)
    edit = None
    if args.init_image:
        factor = vae_scale_factor(model.vae)
        strength = args.strength if args.strength is not None else (1.0 if args.mask else GRID.strength)
        edit = load_edit_inputs(
            [args.init_image],
            [args.mask] if args.mask else [],
            height=shape[1] * factor,
            width=shape[2] * factor,
            strength=strength,
        )
    try:
        cfg = SamplingConfig(
            prompts=prompts,
            seeds=list(args.seeds),
            steps=args.steps,
            guidance=args.guidance,
            negative_prompt=args.negative_prompt,
            sampler=args.sampler,
            guidance_rescale=args.guidance_rescale,
            autoguidance=autoguidance_weight(args),
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    guide = load_guide(args.guide, model, args.weights, args.device) if args.guide else None
    pairs = [(p, s) for p in prompts for s in args.seeds]
    log.info(
        "step %d (%s weights): %d images, %s x %d steps", model.step, model.weights, len(pairs), cfg.sampler, cfg.steps
    )
    images = sample_images(
        model, pairs, cfg, batch_size=args.batch_size, latent_shape=shape, progress=True, edit=edit, guide=guide
    )
    return write_images(images, pairs, args.out, len(args.seeds))


@command_line
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    grid = run(args)
    log.info("wrote %s and one PNG per image in %s", grid, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
