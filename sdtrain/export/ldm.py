"""diffusers names -> original ldm/SD single-file names, the layout ComfyUI/A1111-style files use:
U-Net `model.diffusion_model.*`, VAE `first_stage_model.*`, text encoder `cond_stage_model.*` (SD 1.x: a CLIP
`cond_stage_model.transformer.text_model.*`; SD 2.x: the OpenCLIP tower `cond_stage_model.model.*`).
The reverse (ldm -> diffusers) is diffusers' own (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`from_single_file`); tests check that it maps our output back to the very same tensors.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, LDM_UNET_KEY
from torch import nn

from sdtrain.errors import CheckpointError
from sdtrain.models.clip_layout import CLIP_PREFIX, OPEN_CLIP_PREFIX, clip_to_open_clip

LDM_VAE_KEY = "first_stage_model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

RESNET_RENAMES = [  # diffusers name -> ldm name inside a ResBlock
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]


def _prefix_map(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(diffusers prefix, ldm prefix) for every block of a UNet2DConditionModel with this config."""
    per_block = config["layers_per_block"]
    per_block = per_block if isinstance(per_block, int) else per_block[0]
    blocks = len(config["block_out_channels"])
    up_types = config["up_block_types"]
    pairs: list[tuple[str, str]] = []
    for i in range(blocks):
        for j in range(per_block):
            index = i * (per_block + 1) + j + 1
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{index}.0."))
            pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{index}.1."))
        if i < blocks - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (per_block + 1)}.0.op."))
        for j in range(per_block + 1):
            index = i * (per_block + 1) + j
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{index}.0."))
            pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{index}.1."))
        if i < blocks - 1:
            last = i * (per_block + 1) + per_block
            slot = 2 if "CrossAttn" in up_types[i] else 1  # ldm puts the upsampler after the block's attention
            pairs.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{last}.{slot}.conv."))
    pairs += [
        ("mid_block.resnets.0.", "middle_block.0."),
        ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.1.", "middle_block.2."),
    ]
    return pairs


def _renamed(key: str, prefixes: list[tuple[str, str]], renames: dict[str, list[tuple[str, str]]]) -> str | None:
    """`key` under the first matching (ours, theirs) prefix, its rest renamed by that prefix kind's renames."""
    for ours, theirs in prefixes:
        if key.startswith(ours):
            rest = key[len(ours) :]
            for marker, pairs in renames.items():
                if marker in ours:
                    for old, new in pairs:
                        if rest.startswith(old + "."):
                            rest = new + rest[len(old) :]
                            break
            return theirs + rest
    return None


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers U-Net state dict under ldm names (with the `model.diffusion_model.` prefix): SD 1.x/2.x, and
    SDXL's (its pooled-text + time-id embedding is ldm's `label_emb`)."""
    addition = config.get("addition_embed_type")
    if addition not in (None, "text_time") or config.get("class_embed_type"):
        raise ValueError("single-file export covers SD 1.x/2.x/XL U-Nets (no class or other addition embeddings)")
    mapping = DIFFUSERS_TO_LDM_MAPPING["unet"]
    fixed = {**mapping["layers"], **(mapping["addition_embed_type"] if addition else {})}
    prefixes = _prefix_map(config)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key in fixed:
            out[LDM_UNET_KEY + fixed[key]] = tensor
            continue
        name = _renamed(key, prefixes, {".resnets.": RESNET_RENAMES})
        if name is None:
            raise ValueError(f"no ldm name for U-Net tensor {key}")
        out[LDM_UNET_KEY + name] = tensor
    return out


VAE_ATTENTION_RENAMES = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict under ldm names (`first_stage_model.`; attention as 1x1 convs)."""
    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    blocks = len(config["down_block_types"])
    prefixes: list[tuple[str, str]] = []
    for i in range(blocks):
        up = blocks - 1 - i  # ldm numbers the decoder's levels from the bottom
        prefixes += [
            (f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."),
            (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."),
            (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{up}.block."),
            (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{up}.upsample."),
        ]
    for part in ("encoder", "decoder"):
        prefixes += [
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1."),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2."),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."),
        ]
    renames = {"resnets.": [("conv_shortcut", "nin_shortcut")], "attentions.": VAE_ATTENTION_RENAMES}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = fixed.get(key) or _renamed(key, prefixes, renames)
        if name is None:
            raise ValueError(f"no ldm name for VAE tensor {key}")
        if ".mid.attn_1." in name and name.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # ldm's attention projections are 1x1 convs
        out[LDM_VAE_KEY + name] = tensor
    return out


def sdxl_text_encoders_to_ldm(pair: nn.Module) -> dict[str, torch.Tensor]:
    """SDXL's pair under the names SDXL files use: CLIP-L as `conditioner.embedders.0.transformer.text_model.*`,
    the second (CLIPTextModelWithProjection) as the OpenCLIP tower `conditioner.embedders.1.model.*` (q/k/v
    joined into in_proj, the projection transposed), what diffusers' from_single_file converts back."""
    first, second = pair.first, pair.second
    if not all(getattr(e, "is_clip", False) for e in (first, second)) or not hasattr(second.model, "text_projection"):
        raise CheckpointError("--single-file holds SDXL's CLIPTextModel + CLIPTextModelWithProjection pair only")
    out = {SDXL_CLIP_PREFIX + k.removeprefix("text_model."): v for k, v in first.model.state_dict().items()}
    state = second.model.state_dict()
    projection = state.pop("text_projection.weight")
    tower = clip_to_open_clip(state, {})
    tower["text_projection"] = projection.T.contiguous()
    out.update({SDXL_OPEN_CLIP_PREFIX + k: v for k, v in tower.items()})
    return out


def text_encoder_to_ldm(text_encoder: nn.Module, kind: str) -> dict[str, torch.Tensor]:
    """The frozen text encoder under ldm names: an OpenCLIP tower as SD 2.x files hold it (the whole tower), a
    transformers CLIPTextModel as SD 1.x files do, SDXL's pair as SDXL files do. Other text models have no
    single-file layout."""
    if hasattr(text_encoder, "second"):
        return sdxl_text_encoders_to_ldm(text_encoder)
    if kind == "open_clip":
        return {OPEN_CLIP_PREFIX + k: v for k, v in text_encoder.tower.state_dict().items()}
    if not getattr(text_encoder, "is_clip", False) or type(text_encoder.model).__name__ != "CLIPTextModel":
        raise CheckpointError(
            f"--single-file holds SD 1.x/2.x text encoders (CLIPTextModel or OpenCLIP); this run's is a "
            f"{type(getattr(text_encoder, 'model', text_encoder)).__name__}: export the folder only"
        )
    return {CLIP_PREFIX + k.removeprefix("text_model."): v for k, v in text_encoder.model.state_dict().items()}
