"""An original-layout Stable Diffusion single file as the starting point: `model.pretrained=FILE`.

FILE (.safetensors / .ckpt) holds `model.diffusion_model.*` (U-Net), `first_stage_model.*` (VAE) and
`cond_stage_model.*` (SD 1.x: CLIP `transformer.text_model.*`; SD 2.x: the OpenCLIP tower `model.*`); SDXL files
`conditioner.embedders.0.transformer.*` (CLIP-L) and `conditioner.embedders.1.model.*` (OpenCLIP-bigG). It is
converted once by diffusers' own `StableDiffusion(XL)Pipeline.from_single_file` into a diffusers pipeline folder in
sdtrain's cache ($SDTRAIN_CACHE, default ~/.cache/sdtrain), which then starts the run like any released folder
(models/pipeline_folder.py). A single file carries no architecture, so the configs come from
`model.pretrained_config=DIR` (a diffusers folder of the same model: a release, an sdtrain export; its weights are
not read) or else from the `model=` preset (sd15, sd2, ...), with the text encoder's sizes read off the file
and its conventions those of the layout (SD 1.x: OpenAI CLIP, quick_gelu, EOT padding; SD 2.x: OpenCLIP, "!"
padding, the penultimate layer as diffusers' 23-layer conversion).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from sdtrain.errors import ConfigError, first_line
from sdtrain.models.clip_layout import CLIP_PREFIX, EOT, OPEN_CLIP_PREFIX, clip_tokenizer, open_clip_text_config
from sdtrain.models.pretrained import flat_tensors, load_weights_file

log = logging.getLogger(__name__)
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
SDXL_PREFIX = "conditioner.embedders."
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def cache_root() -> str:
    return os.environ.get("SDTRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sdtrain")


def pipeline_folder(cfg: Any) -> str:
    """The diffusers pipeline folder behind `cfg.pretrained` (a ModelConfig): the folder itself, or a single
    file's conversion (made once per file and config; concurrent ranks share it)."""
    path = cfg.pretrained
    if not os.path.isfile(path):
        return path
    if not path.endswith(SINGLE_FILE_SUFFIXES):
        raise ConfigError(f"model.pretrained={path} is a file but not a .safetensors/.ckpt single file")
    stat = os.stat(path)
    key = json.dumps(
        [os.path.realpath(path), stat.st_size, stat.st_mtime_ns, cfg.pretrained_config, _preset_record(cfg)],
        sort_keys=True,
        default=str,
    )
    folder = os.path.join(cache_root(), "single_file", hashlib.sha256(key.encode()).hexdigest()[:24])
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return folder
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    work = tempfile.mkdtemp(prefix=".converting-", dir=os.path.dirname(folder))
    try:
        _convert(path, cfg, work)
        try:
            os.rename(work, folder)  # atomic: another rank may have won, then its copy is the same
        except OSError:
            shutil.rmtree(work, ignore_errors=True)
    finally:
        if os.path.isdir(work):
            shutil.rmtree(work, ignore_errors=True)
    log.info("model.pretrained=%s: converted by diffusers' from_single_file to %s", path, folder)
    return folder


def _preset_record(cfg: Any) -> Any:
    if cfg.pretrained_config:
        return None
    return [cfg.unet.config, cfg.vae.config, cfg.text_encoder.arch, cfg.text_encoder.heads, cfg.text_encoder.layer]


def _convert(path: str, cfg: Any, out: str) -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    state = tensor_shapes(path)
    layout = _layout(state, path)
    config_dir = cfg.pretrained_config
    if layout == "sdxl" and config_dir is None:
        raise ConfigError(
            f"model.pretrained={path} is an SDXL single file: give its configs with model.pretrained_config=DIR "
            "(a diffusers SDXL folder of the same model; its weights are not read)"
        )
    pipeline = StableDiffusionXLPipeline if layout == "sdxl" else StableDiffusionPipeline
    extra = {} if layout == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    with tempfile.TemporaryDirectory() as generated:
        if config_dir is None:
            config_dir = generated
            write_preset_configs(cfg, state, layout, generated)
        elif not os.path.isfile(os.path.join(config_dir, "model_index.json")):
            raise ConfigError(f"model.pretrained_config={config_dir} is not a diffusers pipeline folder")
        try:
            pipe = pipeline.from_single_file(path, config=config_dir, local_files_only=True, **extra)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ConfigError(
                f"model.pretrained={path} does not load with the configs of "
                f"{cfg.pretrained_config or 'the model= preset'} ({first_line(exc)}): give the configs of this "
                "file's model with model.pretrained_config=DIR, or the matching model= preset"
            ) from None
        _check_complete(pipe, path)
        pipe.save_pretrained(out, safe_serialization=True)


def tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a weights file; a .safetensors header is read without loading any tensor."""
    if path.endswith(".safetensors"):
        try:
            with safe_open(path, "pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as exc:
            raise ConfigError(f"model.pretrained={path} is unreadable: {first_line(exc)}") from None
    return {k: tuple(v.shape) for k, v in flat_tensors(load_weights_file(path), path).items()}


def _layout(state: dict[str, tuple[int, ...]], path: str) -> str:
    """sd1 (CLIP text encoder), sd2 (OpenCLIP) or sdxl (both, as conditioner.embedders.*); one-line errors for
    what is not an SD 1.x/2.x/XL file."""
    missing = [p for p in (UNET_PREFIX, VAE_PREFIX) if not any(k.startswith(p) for k in state)]
    if missing:
        raise ConfigError(
            f"model.pretrained={path} is not an SD 1.x/2.x/XL single file (no {missing[0]}* tensors; first key: "
            f"{next(iter(state), 'none')})"
        )
    if any(k.startswith(SDXL_PREFIX) for k in state):
        return "sdxl"
    if any(k.startswith(CLIP_PREFIX) for k in state):
        return "sd1"
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in state):
        return "sd2"
    raise ConfigError(f"model.pretrained={path} has no text encoder (cond_stage_model.*): not a full SD file")


def _check_complete(pipe: Any, path: str) -> None:
    """from_single_file leaves tensors the file lacks on the meta device: a file of another model."""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        part = getattr(pipe, name, None)
        meta = [k for k, v in part.state_dict().items() if v.is_meta] if part is not None else []
        if meta:
            raise ConfigError(
                f"model.pretrained={path}: {len(meta)} {name} tensors are not in the file (first: {meta[0]}) - "
                "wrong model preset or model.pretrained_config?"
            )


SHAPE_KEYS = {  # layout -> (prefix, block prefix, token embedding, position embedding, first MLP)
    "sd1": (CLIP_PREFIX, "encoder.layers.", "embeddings.token_embedding.weight",
            "embeddings.position_embedding.weight", "encoder.layers.0.mlp.fc1.weight"),
    "sd2": (OPEN_CLIP_PREFIX, "transformer.resblocks.", "token_embedding.weight", "positional_embedding",
            "transformer.resblocks.0.mlp.c_fc.weight"),
}  # fmt: skip


def _text_config(tower: Any, state: dict[str, tuple[int, ...]], layout: str) -> Any:
    """The CLIPTextConfig of the file's text encoder: sizes from its tensors, heads (which no shape tells) from
    the preset's tower; SD 1.x keeps every layer, SD 2.x all but the last (diffusers' penultimate convention)."""
    prefix, blocks, tokens, positions, mlp = SHAPE_KEYS[layout]
    layers = 1 + max(int(k[len(prefix + blocks) :].split(".")[0]) for k in state if k.startswith(prefix + blocks))
    text = open_clip_text_config(tower, layers if layout == "sd1" else layers - 1)
    vocab, width = state[prefix + tokens]
    if width != text.hidden_size:
        raise ConfigError(
            f"the file's text encoder is {width} wide but the model= preset's is {text.hidden_size}: choose the "
            "preset of this file's model (model=sd15, model=sd2) or give model.pretrained_config=DIR"
        )
    text.vocab_size, text.max_position_embeddings = vocab, state[prefix + positions][0]
    text.intermediate_size = state[prefix + mlp][0]
    if layout == "sd1":  # OpenAI CLIP ViT-L/14, as SD 1.x used it
        text.hidden_act, text.pad_token_id = "quick_gelu", 1
    return text


def write_preset_configs(cfg: Any, state: dict[str, tuple[int, ...]], layout: str, out: str) -> None:
    """A diffusers pipeline folder of configs only (no weights) for `from_single_file(config=out)`: the U-Net and
    VAE from the model= preset, the text encoder sized from the file, the tokenizer from open_clip's BPE."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import SCHEDULER_DEFAULT_CONFIG

    from sdtrain.models.text_encoder import build_text_tower

    with torch.device("meta"):
        UNet2DConditionModel.from_config(cfg.unet.config).save_config(os.path.join(out, "unet"))
        AutoencoderKL.from_config(cfg.vae.config).save_config(os.path.join(out, "vae"))
        tower = build_text_tower(cfg.text_encoder)
    DDIMScheduler.from_config(SCHEDULER_DEFAULT_CONFIG).save_config(os.path.join(out, "scheduler"))
    text = _text_config(tower, state, layout)
    text.save_pretrained(os.path.join(out, "text_encoder"))
    tokenizer = clip_tokenizer(os.path.join(out, "tokenizer"), EOT if layout == "sd1" else "!")
    tokenizer.save_pretrained(os.path.join(out, "tokenizer"))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    with open(os.path.join(out, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
