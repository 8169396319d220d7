"""A released diffusers Stable Diffusion pipeline folder as the starting point: `model.pretrained=DIR`.

DIR holds `model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/` and `scheduler/` (what
`StableDiffusionPipeline.save_pretrained` writes and what SD 1.x / 2.x releases ship). The U-Net, VAE, text
encoder (transformers) and tokenizer are loaded from it with diffusers'/transformers' own `from_pretrained`; the
noise schedule comes from `scheduler/scheduler_config.json` (diffusion/objective.py). A `model.unet.pretrained`,
`model.vae.pretrained` or `model.text_encoder.pretrained` given as well takes the place of the folder's part.
An original-layout single file is converted to such a folder first (models/single_file.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Any

from sdtrain.errors import ConfigError
from sdtrain.models.single_file import pipeline_folder

PIPELINES = ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline", "StableDiffusionXLPipeline")
SDXL = "StableDiffusionXLPipeline"
PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_PARTS = ("text_encoder_2", "tokenizer_2")  # SDXL's second text encoder (OpenCLIP-bigG) and its tokenizer


def read_model_index(path: str) -> dict[str, Any]:
    """The folder's model_index.json, checked to be an SD 1.x/2.x/XL pipeline with every part; one-line errors."""
    index_file = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_file):
        raise ConfigError(f"model.pretrained={path} is not a diffusers pipeline folder (no model_index.json)")
    index = _read_json(index_file, f"model.pretrained={path}")
    kind = index.get("_class_name")
    if kind not in PIPELINES:
        raise ConfigError(f"model.pretrained={path} is a {kind}; sdtrain trains {', '.join(PIPELINES)} folders")
    parts = (*PARTS, *SDXL_PARTS) if kind == SDXL else PARTS
    missing = [p for p in parts if not os.path.isdir(os.path.join(path, p))]
    if missing:
        raise ConfigError(f"model.pretrained={path} has no {missing[0]}/ folder (a {kind} needs {', '.join(parts)})")
    return index


def from_pipeline(cfg: Any) -> Any:
    """`cfg` (a ModelConfig) with every part not given explicitly taken from the pipeline folder `cfg.pretrained`
    (a single file's conversion, models/single_file.py)."""
    path = pipeline_folder(cfg)
    sdxl = is_sdxl_folder(path)
    text, text_2 = folder_text_encoders(path, cfg.text_encoder, cfg.text_encoder_2)
    return replace(
        cfg,
        unet=replace(cfg.unet, pretrained=cfg.unet.pretrained or os.path.join(path, "unet")),
        vae=replace(cfg.vae, pretrained=cfg.vae.pretrained or os.path.join(path, "vae")),
        text_encoder=text,
        text_encoder_2=text_2 if sdxl else cfg.text_encoder_2,
    )


def folder_text_encoders(path: str, text: Any = None, text_2: Any = None) -> tuple[Any, Any]:
    """The folder's TextEncoderConfig(s), as training encodes with them: (text_encoder, text_encoder_2 or None
    for SD 1.x / 2.x); `text` / `text_2` given with their own weights are kept (sdtrain-encode --text-encoder DIR
    stores text.npy from these)."""
    sdxl = is_sdxl_folder(path)
    # SDXL reads both encoders' penultimate states (models/sdxl_text.py) unless a layer is given
    layer = "penultimate" if sdxl else None
    first = _folder_text_encoder(text, path, "text_encoder", "tokenizer", layer)
    return first, _folder_text_encoder(text_2, path, "text_encoder_2", "tokenizer_2", layer) if sdxl else None


def _folder_text_encoder(text: Any, path: str, model: str, tokenizer: str, layer: str | None) -> Any:
    """A TextEncoderConfig for the folder's `model`/`tokenizer` parts, unless the user gave its weights."""
    from sdtrain.models.text_encoder import TextEncoderConfig

    text = text or TextEncoderConfig()
    if text.pretrained:
        return text
    return replace(
        text,
        kind="transformers",
        pretrained=os.path.join(path, model),
        tokenizer=text.tokenizer or os.path.join(path, tokenizer),
        layer=text.layer or layer,
    )


def architecture(cfg: Any) -> tuple[Any, dict[str, Any] | None]:
    """(`cfg` with the U-Net/VAE configs of its pretrained folders, the transformers text model's description as
    a checkpoint keeps it) - what `build_model(pretrained=False, text_model=...)` counts on the meta device
    without reading any weights (sdtrain-plan; SDXL's second encoder: describe_text_model). A single file is
    counted by its configs folder or the preset."""
    from sdtrain.models.pretrained import model_folder

    if cfg.pretrained and os.path.isfile(cfg.pretrained):
        cfg = replace(cfg, pretrained=cfg.pretrained_config)
    if cfg.pretrained:
        cfg = from_pipeline(cfg)
    parts = {}
    for name in ("unet", "vae"):
        part = getattr(cfg, name)
        folder = model_folder(part.pretrained, name) if part.pretrained else None
        if folder:
            parts[name] = replace(part, config=_read_json(os.path.join(folder, "config.json"), f"model.{name}"))
    cfg = replace(cfg, **parts)
    return cfg, describe_text_model(cfg.text_encoder)


def describe_text_model(text: Any) -> dict[str, Any] | None:
    """A transformers text encoder's class, config and tokenizer files as a checkpoint keeps them (None for
    OpenCLIP, whose architecture is its config)."""
    from transformers import AutoConfig

    from sdtrain.models.hf_text import text_model_class
    from sdtrain.models.text_encoder import tokenizer_files

    if text is None or text.kind != "transformers":
        return None
    config = AutoConfig.from_pretrained(text.pretrained, local_files_only=True)
    name = text_model_class(config).__name__  # the class training loads it as (models/hf_text.py)
    return {"config": {"class": name, **config.to_dict()}, "tokenizer_files": tokenizer_files(text)}


def is_sdxl_folder(path: str) -> bool:
    return read_model_index(path).get("_class_name") == SDXL


def is_inpainting_folder(path: str) -> bool:
    """Whether the pipeline folder is an SD inpainting model (its U-Net takes latents + mask + masked image)."""
    return read_model_index(path).get("_class_name") == "StableDiffusionInpaintPipeline"


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
