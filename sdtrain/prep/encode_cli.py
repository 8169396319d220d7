"""`sdtrain-encode INPUT... --out DIR --vae VAE_DIR`: raw image-text data -> latent shards + manifest.json.

    sdtrain-encode '/laion/{00000..00999}.tar' --out /latents --vae /weights/sd2-vae --resolution 512 \\
        --min-size 512 --min-aesthetic 5 --max-punsafe 0.1 --max-pwatermark 0.5 --workers 8
    srun -N 4 --ntasks-per-node 8 sdtrain-encode ...      # rank/world from SLURM (or torchrun's RANK/WORLD_SIZE)
    sdtrain-encode ... --merge-only                         # write manifest.json once all ranks are done

Inputs: img2dataset tars, folders of images with .txt captions, or .parquet/.jsonl/.csv tables (caption + image
path columns). Re-running the same command resumes: finished parts are skipped (see sdtrain/prep/encode.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict
from typing import Any

import torch
from tqdm import tqdm

from sdtrain.config import from_values
from sdtrain.errors import ConfigError, command_line
from sdtrain.prep.encode import EncodeConfig, Encoder, encode_part, merge, my_parts, work_dir
from sdtrain.prep.filters import FilterConfig
from sdtrain.prep.sources import InputPart

log = logging.getLogger("sdtrain.encode")
_worker: Encoder | None = None


def env_rank() -> tuple[int, int]:
    for rank, world in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank in os.environ and world in os.environ:
            return int(os.environ[rank]), int(os.environ[world])
    return 0, 1


def parse_buckets(text: str | None) -> list[list[int]] | None:
    if not text:
        return None
    try:
        return [[int(v) for v in item.lower().split("x")] for item in text.split(",")]
    except ValueError:
        raise ConfigError(f"--buckets wants WxH,WxH,... (e.g. 512x512,576x448), got {text!r}") from None


def parse_args(argv: list[str] | None) -> tuple[EncodeConfig, bool]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="tars (globs ok), image folders, or .parquet/.jsonl/.csv tables")
    p.add_argument("--out", required=True)
    p.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--buckets", help="aspect buckets WxH,WxH,... (SDXL style) instead of square crops")
    p.add_argument("--random-crop", action="store_true")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--files-per-part", type=int, default=1000, help="folder/table inputs: images per part")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--workers", type=int, default=1, help="encoding processes on this rank (0 = in process)")
    p.add_argument("--rank", type=int, help="default: RANK or SLURM_PROCID, else 0")
    p.add_argument("--world-size", type=int, help="default: WORLD_SIZE or SLURM_NTASKS, else 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--text-encoder",
        help="also store text.npy: a diffusers SD/SDXL pipeline folder (its text encoder(s), as "
        "model.pretrained=DIR trains with them; SDXL adds pooled.npy) or a JSON TextEncoderConfig, e.g. "
        '\'{"arch": "ViT-H-14", "pretrained": "/w/open_clip.bin"}\'',
    )
    p.add_argument(
        "--text-encoder-2",
        help="with a JSON --text-encoder: SDXL's second text encoder, a JSON TextEncoderConfig (text.npy then "
        "holds both encoders' states, pooled.npy the second's pooled embedding)",
    )
    p.add_argument(
        "--inpainting-masks",
        type=int,
        default=0,
        metavar="K",
        help="also store K random inpainting masks per sample and the moments of each masked image (for "
        "diffusion.inpainting=true; see sdtrain/prep/inpaint_masks.py)",
    )
    p.add_argument("--merge-only", action="store_true", help="only write manifest.json from finished parts")
    filters = p.add_argument_group("filters (metadata from the sample's json; a missing field passes)")
    filters.add_argument("--min-size", type=int, default=0, help="shorter side of the original image, px")
    filters.add_argument("--max-aspect-ratio", type=float)
    filters.add_argument("--min-aesthetic", type=float)
    filters.add_argument("--max-punsafe", type=float)
    filters.add_argument("--max-pwatermark", type=float)
    filters.add_argument("--min-similarity", type=float)
    filters.add_argument("--min-caption-chars", type=int, default=0)
    filters.add_argument("--max-caption-chars", type=int)
    filters.add_argument("--require-fields", action="store_true", help="drop samples that lack a filtered field")
    a = p.parse_args(argv)
    rank, world = env_rank()
    text_encoder, text_encoder_2 = text_encoder_options(a.text_encoder, a.text_encoder_2)
    filter_cfg = from_values(
        FilterConfig,
        {
            k: getattr(a, k)
            for k in (
                "min_size",
                "max_aspect_ratio",
                "min_aesthetic",
                "max_punsafe",
                "max_pwatermark",
                "min_similarity",
                "min_caption_chars",
                "max_caption_chars",
                "require_fields",
            )
        },
        "filters",
    )
    values: dict[str, Any] = {
        "inputs": a.inputs,
        "out": a.out,
        "vae": a.vae,
        "resolution": a.resolution,
        "buckets": parse_buckets(a.buckets),
        "random_crop": a.random_crop,
        "batch_size": a.batch_size,
        "samples_per_shard": a.samples_per_shard,
        "files_per_part": a.files_per_part,
        "dtype": a.dtype,
        "workers": a.workers,
        "rank": a.rank if a.rank is not None else rank,
        "world_size": a.world_size if a.world_size is not None else world,
        "seed": a.seed,
        "device": a.device,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "inpainting_masks": a.inpainting_masks,
    }
    cfg = from_values(EncodeConfig, values, "encode")
    cfg.filters = filter_cfg
    return cfg, a.merge_only


def text_encoder_options(first: str | None, second: str | None) -> tuple[dict | None, dict | None]:
    """--text-encoder / --text-encoder-2 as TextEncoderConfig dicts: a pipeline folder gives its encoder(s)."""
    if first and os.path.isdir(first):
        if second:
            raise ConfigError("--text-encoder-2 goes with a JSON --text-encoder (a pipeline folder names both)")
        if not os.path.isfile(os.path.join(first, "model_index.json")):
            raise ConfigError(f"--text-encoder {first} is not a diffusers pipeline folder (no model_index.json)")
        from sdtrain.models.pipeline_folder import folder_text_encoders

        text, text_2 = folder_text_encoders(first)
        return asdict(text), asdict(text_2) if text_2 is not None else None
    parsed = []
    for flag, value in (("--text-encoder", first), ("--text-encoder-2", second)):
        try:
            parsed.append(json.loads(value) if value else None)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{flag} is neither a pipeline folder nor JSON: {exc}") from None
    if parsed[1] is not None and parsed[0] is None:
        raise ConfigError("--text-encoder-2 (SDXL's second encoder) needs --text-encoder as well")
    return parsed[0], parsed[1]


def _init_worker(cfg: EncodeConfig, threads: int) -> None:
    global _worker
    torch.set_num_threads(threads)
    _worker = Encoder(cfg)


def _run_part(args: tuple[InputPart, EncodeConfig]) -> dict[str, Any]:
    part, cfg = args
    assert _worker is not None
    return encode_part(part, cfg, _worker)


def check_models(cfg: EncodeConfig) -> None:
    """Fail here, in one line, before worker processes start (a pool whose initializer fails respawns forever)."""
    if not os.path.isfile(os.path.join(cfg.vae, "config.json")):
        raise ConfigError(f"--vae {cfg.vae} is not a diffusers AutoencoderKL folder (no config.json)")
    for flag, text in (("--text-encoder", cfg.text_encoder), ("--text-encoder-2", cfg.text_encoder_2)):
        if text is not None:
            from sdtrain.models.text_encoder import TextEncoderConfig

            try:
                TextEncoderConfig(**text)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{flag}: {exc}") from None


def encode(cfg: EncodeConfig) -> dict[str, Any] | None:
    check_models(cfg)
    parts, todo = my_parts(cfg)
    mine = len(parts[cfg.rank :: cfg.world_size])
    log.info("rank %d/%d: %d parts of %d, %d left to encode", cfg.rank, cfg.world_size, mine, len(parts), len(todo))
    os.makedirs(work_dir(cfg), exist_ok=True)
    kept, start = 0, time.perf_counter()
    bar = tqdm(total=len(todo), unit="part", desc=f"encode rank {cfg.rank}", dynamic_ncols=True)
    if cfg.workers == 0:
        encoder = Encoder(cfg)
        results = (encode_part(p, cfg, encoder) for p in todo)
        pool = None
    else:
        threads = max(1, (os.cpu_count() or 1) // cfg.workers)
        pool = mp.get_context("spawn").Pool(cfg.workers, initializer=_init_worker, initargs=(cfg, threads))
        results = pool.imap_unordered(_run_part, [(p, cfg) for p in todo])
    try:
        for record in results:
            kept += record["kept"]
            bar.update(1)
            bar.set_postfix(images_per_s=f"{kept / max(1e-9, time.perf_counter() - start):.1f}", kept=kept)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    return merge(cfg, parts)


@command_line
def main(argv: list[str] | None = None) -> int:
    cfg, merge_only = parse_args(argv)
    result = merge(cfg, my_parts(cfg)[0]) if merge_only else encode(cfg)
    if result is None:
        log.info("this rank is done; manifest.json is written when every part is (or run with --merge-only)")
        return 0
    info = result["encode"]
    log.info(
        "manifest: %d samples in %d shards; filtered %s; skipped %s",
        info["kept"],
        len(result["shards"]),
        info["filtered"] or "none",
        info["skipped"] or "none",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
