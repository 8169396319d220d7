"""A released diffusers Stable Diffusion pipeline folder as the starting point: `model.pretrained=DIR`.

DIR holds `model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/` and `scheduler/` (what
`StableDiffusionPipeline.save_pretrained` writes and what SD 1.x / 2.x releases ship). The U-Net, VAE, text
encoder (transformers) and tokenizer are loaded from it with diffusers'/transformers' own `from_pretrained`; the
noise schedule comes from `scheduler/scheduler_config.json` (diffusion/objective.py). A `model.unet.pretrained`,
`model.vae.pretrained` or `model.text_encoder.pretrained` given as well takes the place of the folder's part.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Any

from sdtrain.errors import ConfigError

PIPELINES = ("StableDiffusionPipeline",)  # SD 1.x / 2.x layouts
PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def read_model_index(path: str) -> dict[str, Any]:
    """The folder's model_index.json, checked to be an SD 1.x/2.x pipeline with every part; one-line errors."""
    if os.path.isfile(path):
        raise ConfigError(
            f"model.pretrained={path} is a single file: give a diffusers pipeline folder (single-file checkpoints "
            "load through model.unet.pretrained=FILE for the U-Net)"
        )
    index_file = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_file):
        raise ConfigError(f"model.pretrained={path} is not a diffusers pipeline folder (no model_index.json)")
    index = _read_json(index_file, f"model.pretrained={path}")
    kind = index.get("_class_name")
    if kind not in PIPELINES:
        raise ConfigError(f"model.pretrained={path} is a {kind}; sdtrain trains {', '.join(PIPELINES)} folders")
    missing = [p for p in PARTS if not os.path.isdir(os.path.join(path, p))]
    if missing:
        raise ConfigError(f"model.pretrained={path} has no {missing[0]}/ folder (a pipeline needs {', '.join(PARTS)})")
    return index


def from_pipeline(cfg: Any) -> Any:
    """`cfg` (a ModelConfig) with every part not given explicitly taken from the pipeline folder `cfg.pretrained`."""
    path = cfg.pretrained
    read_model_index(path)
    text = cfg.text_encoder
    if not text.pretrained:
        text = replace(
            text,
            kind="transformers",
            pretrained=os.path.join(path, "text_encoder"),
            tokenizer=text.tokenizer or os.path.join(path, "tokenizer"),
        )
    return replace(
        cfg,
        unet=replace(cfg.unet, pretrained=cfg.unet.pretrained or os.path.join(path, "unet")),
        vae=replace(cfg.vae, pretrained=cfg.vae.pretrained or os.path.join(path, "vae")),
        text_encoder=text,
    )


def scheduler_config(path: str) -> dict[str, Any]:
    """The pipeline's training schedule (betas, prediction type) from scheduler/scheduler_config.json."""
    return _read_json(os.path.join(path, "scheduler", "scheduler_config.json"), f"model.pretrained={path}")


def _read_json(path: str, where: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {os.path.basename(path)} ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: {os.path.basename(path)} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {os.path.basename(path)} is not a JSON object")
    return data
