"""What a checkpoint needs to rebuild its model without the run's config: saved as checkpoint["sdtrain"]["spec"].

The U-Net and VAE configs are the diffusers configs actually built (so a `pretrained` folder is not needed
again); the text encoder config is the architecture only (its weights are in the state dict, like the VAE's).
checkpoint/trained.py reads it back through the same model builder training used.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from sdtrain.config import from_values
from sdtrain.data.normalizer import LatentNormalizer
from sdtrain.diffusion.objective import DiffusionConfig
from sdtrain.models.builder import ModelConfig, ModelParts
from sdtrain.models.diffusers_parts import UNetConfig, VAEConfig
from sdtrain.models.hf_text import hf_config
from sdtrain.models.text_encoder import TextEncoderConfig, tokenizer_files


def diffusers_config(model: nn.Module) -> dict[str, Any]:
    """A diffusers model's config as plain data (no private `_` keys, tuples as lists)."""
    plain = {}
    for key, value in dict(model.config).items():
        if not key.startswith("_"):
            plain[key] = list(value) if isinstance(value, tuple) else value
    return plain


def build_spec(
    *,
    parts: ModelParts,
    diffusion: DiffusionConfig,
    normalizer: LatentNormalizer,
    latent_shape: tuple[int, ...],
    base_model: ModelConfig | None = None,
) -> dict[str, Any]:
    """`base_model`: a LoRA run's model config, kept so its small checkpoints find their base weights again."""
    text, text_2 = parts.text_config, parts.text_config_2
    spec = {
        "unet": diffusers_config(parts.unet),
        "vae": diffusers_config(parts.vae),
        "text_encoder": {**dataclasses.asdict(text), "pretrained": None, "tokenizer": None},
        "diffusion": dataclasses.asdict(diffusion),
        "normalizer": normalizer.as_dict(),
        "latent_shape": list(latent_shape),
    }
    # the architecture and the tokenizer's files: no folder needed to rebuild (a LoRA run's base is read
    # again from its own folder, so its small checkpoints leave them out: they are megabytes)
    describe = base_model is None
    first = parts.text_encoder.first if text_2 is not None else parts.text_encoder
    if text.kind == "transformers" and describe:
        spec["text_model"] = {"config": hf_config(first.model), "tokenizer_files": tokenizer_files(text)}
    if text_2 is not None:  # SDXL's second encoder, kept the same way
        spec["text_encoder_2"] = {**dataclasses.asdict(text_2), "pretrained": None, "tokenizer": None}
        if text_2.kind == "transformers" and describe:
            second = parts.text_encoder.second.model
            spec["text_model_2"] = {"config": hf_config(second), "tokenizer_files": tokenizer_files(text_2)}
    if base_model is not None:
        spec["lora"] = dataclasses.asdict(base_model.lora)
        spec["base_model"] = dataclasses.asdict(base_model)
    return spec


def model_config(spec: dict[str, Any]) -> ModelConfig:
    """The ModelConfig that rebuilds a spec's architecture (random init; the checkpoint's weights go in after);
    for a LoRA run, its base model config (the base weights are read from where training read them)."""
    if spec.get("base_model"):
        return from_values(ModelConfig, spec["base_model"], "the checkpoint's base model")
    return ModelConfig(
        unet=UNetConfig(config=spec["unet"]),
        vae=VAEConfig(config=spec["vae"]),
        text_encoder=TextEncoderConfig(**spec["text_encoder"]),
        text_encoder_2=TextEncoderConfig(**spec["text_encoder_2"]) if spec.get("text_encoder_2") else None,
    )
