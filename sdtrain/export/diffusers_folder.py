"""Checkpoint -> a diffusers folder that any Stable Diffusion tooling loads, and back.

    OUT/unet, OUT/vae, OUT/scheduler        diffusers save_pretrained folders (safetensors)
    OUT/text_encoder, OUT/tokenizer         transformers folders: the run's own for a transformers encoder; an
                                            OpenCLIP tower as the CLIPTextModel diffusers' SD2 conversion makes
                                            (models/clip_layout.py), with a CLIPTokenizer padding with "!"
    OUT/text_encoder_unused.safetensors     OpenCLIP tensors the conditioning never uses (the last block when
                                            it takes the penultimate one), so importing gives the whole tower
    OUT/text_encoder_2, OUT/tokenizer_2     SDXL's second encoder (CLIPTextModelWithProjection); a from-scratch
                                            run's OpenCLIP towers are converted whole (sdxl_text_as_transformers)
    OUT/model_index.json                    StableDiffusionPipeline (StableDiffusionInpaintPipeline for an
                                            inpainting model, StableDiffusionXLPipeline for SDXL): plain
                                            diffusers loads and runs the folder
    OUT/unet.ldm.safetensors                the U-Net under original SD names (single-file tools)
    OUT/sdtrain.json                        step, which weights, latent normalisation, text-encoder reference

Latent normalisation: SD pipelines decode `latents / scaling_factor`. A per-channel shift (centred latents) is
folded into the VAE's 1x1 quant convs (encode gives z - shift, decode adds it back) so the folder is a standard
SD layout; the original biases are kept in sdtrain.json, so importing gives back every tensor exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from sdtrain.checkpoint.trained import TrainedModel
from sdtrain.diffusion.sampling import build_scheduler
from sdtrain.errors import CheckpointError
from sdtrain.export.ldm import text_encoder_to_ldm, unet_to_ldm, vae_to_ldm
from sdtrain.models.clip_layout import clip_to_open_clip, clip_tokenizer, open_clip_to_clip
from sdtrain.models.hf_text import FrozenHFText, HFTokenizer
from sdtrain.models.lora import adapter_state, merged
from sdtrain.models.sdxl_text import SDXLTextEncoders, TokenizerPair

FORMAT = "sdtrain-export/1"
UNUSED_TEXT_FILE = "text_encoder_unused.safetensors"


@torch.no_grad()
def fold_latent_shift(vae: AutoencoderKL, shift: list[float]) -> dict[str, list[float]]:
    """Make `vae` encode to z - shift and decode z + shift; returns the original biases (to undo it exactly)."""
    channels = vae.config.latent_channels
    if vae.quant_conv is None or vae.post_quant_conv is None:
        raise CheckpointError("the VAE has no quant convs to fold the latent shift into; export needs shift 0")
    shift_t = torch.tensor(shift, dtype=torch.float64).expand(channels)
    original = {
        "quant_conv.bias": vae.quant_conv.bias.tolist(),
        "post_quant_conv.bias": vae.post_quant_conv.bias.tolist(),
    }
    mean_bias = vae.quant_conv.bias[:channels]  # moments = [mean, logvar]: only the mean moves
    mean_bias.copy_((mean_bias.double() - shift_t).to(mean_bias.dtype))
    weight = vae.post_quant_conv.weight.double()[:, :, 0, 0]  # decode(z + shift) = W z + (W shift + b)
    vae.post_quant_conv.bias.copy_((vae.post_quant_conv.bias.double() + weight @ shift_t).float())
    return original


def export_diffusers(
    model: TrainedModel, out: str, *, sampler: str = "ddim", single_file: str | None = None, merge: bool = False
) -> str:
    """Write the folder OUT (and, with `single_file`, one original-layout .safetensors of the same tensors). A
    LoRA run writes its adapters in diffusers' LoRA format (export_lora), or with `merge` the full model with
    them folded into the U-Net."""
    if model.lora is not None:
        if not merge:
            if single_file:
                raise CheckpointError("--single-file of a LoRA run needs --merge (the file holds a whole model)")
            return export_lora(model, out)
        model = dataclasses.replace(model, unet=merged(model.unet), lora=None)
    os.makedirs(out, exist_ok=True)
    model = sdxl_text_as_transformers(model, out)
    text_ldm = text_encoder_to_ldm(model.text_encoder, model.text_config.kind) if single_file else None
    model.unet.save_pretrained(os.path.join(out, "unet"), safe_serialization=True)
    vae = AutoencoderKL.from_config(model.vae.config)
    vae.load_state_dict(model.vae.state_dict())
    shift = model.normalizer.shift
    original_biases = fold_latent_shift(vae, shift) if any(s != 0.0 for s in shift) else None
    vae.register_to_config(scaling_factor=model.normalizer.scale, shift_factor=None)
    vae.save_pretrained(os.path.join(out, "vae"), safe_serialization=True)
    build_scheduler(sampler, model.diffusion.scheduler_config()).save_pretrained(os.path.join(out, "scheduler"))
    text_parts = _save_text_encoder(model, out)
    ldm = unet_to_ldm(model.unet.state_dict(), dict(model.unet.config))
    save_file({k: v.contiguous() for k, v in ldm.items()}, os.path.join(out, "unet.ldm.safetensors"))
    if single_file:  # what StableDiffusionPipeline.from_single_file(FILE, config=OUT) loads
        everything = {**ldm, **vae_to_ldm(vae.state_dict(), dict(vae.config)), **text_ldm}
        save_file({k: v.contiguous() for k, v in everything.items()}, single_file)
    _write_json(os.path.join(out, "model_index.json"), _model_index(sampler, text_parts, model.diffusion.inpainting))
    _write_json(
        os.path.join(out, "sdtrain.json"),
        {
            "format": FORMAT,
            "step": model.step,
            "weights": model.weights,
            "latent_shape": list(model.latent_shape),
            "scaling_factor": model.normalizer.scale,
            "latent_shift": list(shift),
            "vae_shift_folded": original_biases,
            "diffusion": dataclasses.asdict(model.diffusion),
            "text_encoder": dataclasses.asdict(model.text_config),
            "text_encoder_2": dataclasses.asdict(model.text_config_2) if model.text_config_2 else None,
        },
    )
    return out


def export_lora(model: TrainedModel, out: str) -> str:
    """OUT/pytorch_lora_weights.safetensors, written by diffusers' own save_lora_weights: what
    `StableDiffusion(XL)Pipeline.from_pretrained(BASE).load_lora_weights(OUT)` loads."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline if model.text_config_2 is not None else StableDiffusionPipeline
    pipeline.save_lora_weights(
        out,
        unet_lora_layers=adapter_state(model.unet),
        unet_lora_adapter_metadata=model.unet.peft_config["default"].to_dict(),  # rank + alpha: the scale
        safe_serialization=True,
    )
    _write_json(
        os.path.join(out, "sdtrain.json"),
        {
            "format": FORMAT,
            "step": model.step,
            "weights": model.weights,
            "lora": dataclasses.asdict(model.lora),
            "latent_shape": list(model.latent_shape),
        },
    )
    return out


def _save_text_encoder(model: TrainedModel, out: str) -> dict[str, list[str | None]]:
    """text_encoder/ + tokenizer/ (SDXL: also text_encoder_2/ + tokenizer_2/) in transformers format and their
    model_index entries: a transformers encoder as itself, an OpenCLIP tower converted to CLIPTextModel (so plain
    diffusers runs every export)."""
    if model.text_config_2 is not None:  # transformers encoders by now (sdxl_text_as_transformers)
        pair, tokenizers = model.text_encoder, model.tokenizer
        return {
            **_save_hf_text(pair.first, tokenizers.first, model.text_config, out, ""),
            **_save_hf_text(pair.second, tokenizers.second, model.text_config_2, out, "_2"),
        }
    if model.text_config.kind == "transformers":
        return _save_hf_text(model.text_encoder, model.tokenizer, model.text_config, out, "")
    text_dir, tokenizer_dir = os.path.join(out, "text_encoder"), os.path.join(out, "tokenizer")
    hf_model, unused = open_clip_to_clip(model.text_encoder.tower, model.text_config.resolved_layer)
    save_file({k: v.contiguous() for k, v in unused.items()}, os.path.join(out, UNUSED_TEXT_FILE))
    tokenizer = clip_tokenizer(tokenizer_dir, pad_token="!", context_length=model.text_config.context_length)
    tokenizer.save_pretrained(tokenizer_dir)
    hf_model.save_pretrained(text_dir, safe_serialization=True)
    return {
        "text_encoder": ["transformers", type(hf_model).__name__],
        "tokenizer": ["transformers", type(tokenizer).__name__],
    }


def sdxl_text_as_transformers(model: TrainedModel, out: str) -> TrainedModel:
    """`model` with a from-scratch SDXL run's OpenCLIP towers as the CLIPTextModel + CLIPTextModelWithProjection
    SDXL pipelines load (every block kept: they read hidden_states[-2]; the second with its projection for
    text_embeds), each with a CLIPTokenizer written to OUT/tokenizer{,_2} that pads with "!" as open_clip does.
    Transformers encoders (runs from an SDXL folder) and SD 1.x/2.x models come back as they are."""
    if model.text_config_2 is None or {model.text_config.kind, model.text_config_2.kind} == {"transformers"}:
        return model
    encoders, tokenizers, configs = [], [], []
    pair, pair_tokenizer = model.text_encoder, model.tokenizer
    parts = [(pair.first, pair_tokenizer.first, model.text_config, "", False)]
    parts.append((pair.second, pair_tokenizer.second, model.text_config_2, "_2", True))
    for encoder, tokenizer, config, suffix, projection in parts:
        if config.kind != "transformers":
            hf_model, _ = open_clip_to_clip(encoder.tower, "last", with_projection=projection)
            folder = os.path.join(out, f"tokenizer{suffix}")
            clip_tokenizer(folder, pad_token="!", context_length=config.context_length).save_pretrained(folder)
            encoder, tokenizer = (
                FrozenHFText(hf_model, config.resolved_layer, 0),
                HFTokenizer(folder, config.context_length),
            )
            config = dataclasses.replace(config, kind="transformers", arch=None, pretrained=None, tokenizer=None)
        encoders.append(encoder)
        tokenizers.append(tokenizer)
        configs.append(config)
    return dataclasses.replace(
        model,
        text_encoder=SDXLTextEncoders(*encoders),
        tokenizer=TokenizerPair(*tokenizers),
        text_config=configs[0],
        text_config_2=configs[1],
    )


def _save_hf_text(encoder: Any, tokenizer: Any, config: Any, out: str, suffix: str) -> dict[str, list[str | None]]:
    """A transformers encoder (FrozenHFText) and its tokenizer as OUT/text_encoder{suffix}, OUT/tokenizer{suffix}."""
    text_dir, tokenizer_dir = os.path.join(out, f"text_encoder{suffix}"), os.path.join(out, f"tokenizer{suffix}")
    hf_tokenizer = tokenizer.tokenizer
    # diffusers pads prompts to model_max_length: the context length the run trained with (BERT-style folders
    # say 512)
    hf_tokenizer.model_max_length = config.context_length
    hf_tokenizer.save_pretrained(tokenizer_dir)
    encoder.model.save_pretrained(text_dir, safe_serialization=True)
    if not encoder.is_clip:
        _update_json(os.path.join(text_dir, "config.json"), use_attention_mask=True)  # as sdtrain encodes
    return {
        f"text_encoder{suffix}": ["transformers", type(encoder.model).__name__],
        f"tokenizer{suffix}": ["transformers", type(hf_tokenizer).__name__],
    }


def _model_index(sampler: str, text_parts: dict[str, list[str | None]], inpainting: bool) -> dict[str, Any]:
    scheduler = type(build_scheduler(sampler, {})).__name__
    if "text_encoder_2" in text_parts:  # SDXL: zeros for an empty negative prompt, as sdtrain trains and samples
        return {
            "_class_name": "StableDiffusionXLPipeline",
            "_diffusers_version": diffusers.__version__,
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", scheduler],
            **text_parts,
            "image_encoder": [None, None],
            "feature_extractor": [None, None],
            "force_zeros_for_empty_prompt": True,
        }
    return {
        "_class_name": "StableDiffusionInpaintPipeline" if inpainting else "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,  # as save_pretrained writes (diffusers' loaders read it)
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", scheduler],
        **text_parts,
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
    }


def _update_json(path: str, **values: Any) -> None:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    _write_json(path, {**data, **values})


def _write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def read_export_info(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "sdtrain.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder} is not an sdtrain export (no sdtrain.json)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def import_diffusers(folder: str) -> dict[str, dict[str, torch.Tensor]]:
    """The state dicts of an export: {"unet", "vae", "text_encoder"}, the VAE with its latent shift unfolded."""
    info = read_export_info(folder)
    unet = UNet2DConditionModel.from_pretrained(
        os.path.join(folder, "unet"), local_files_only=True, low_cpu_mem_usage=False
    )
    vae = AutoencoderKL.from_pretrained(os.path.join(folder, "vae"), local_files_only=True, low_cpu_mem_usage=False)
    vae_state = vae.state_dict()
    for key, values in (info.get("vae_shift_folded") or {}).items():
        vae_state[key] = torch.tensor(values, dtype=vae_state[key].dtype)
    text = load_file(os.path.join(folder, "text_encoder", "model.safetensors"))
    kind = export_text_kind(folder, info)
    if kind == "open_clip":  # converted to CLIPTextModel: back to the tower FrozenOpenCLIPText holds
        tower = clip_to_open_clip(text, load_file(os.path.join(folder, UNUSED_TEXT_FILE)))
        text = {f"tower.{k}": v for k, v in tower.items()}
    elif kind == "transformers":  # FrozenHFText holds it as .model
        text = {f"model.{k}": v for k, v in text.items()}
    return {"unet": unet.state_dict(), "vae": vae_state, "text_encoder": text}


def export_text_kind(folder: str, info: dict[str, Any]) -> str | None:
    """Which text encoder an export holds: sdtrain.json names it; older exports have transformers when
    model_index.json names one, else (None) the OpenCLIP tower in sdtrain's own text_encoder/ file."""
    kind = info.get("text_encoder", {}).get("kind")
    if kind:
        return kind
    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as f:
        return "transformers" if json.load(f).get("text_encoder", [None])[0] == "transformers" else None
