"""diffusers U-Net keys -> original ldm/SD single-file keys ("model.diffusion_model.input_blocks..."), the layout
ComfyUI/A1111-style files use. The reverse (ldm -> diffusers) is diffusers' own `convert_ldm_unet_checkpoint`;
tests check that it maps our output back to the very same tensors.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, LDM_UNET_KEY

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


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers U-Net state dict under ldm names (with the `model.diffusion_model.` prefix)."""
    if config.get("addition_embed_type") or config.get("class_embed_type"):
        raise ValueError("single-file export covers SD1/SD2-style U-Nets (no class or addition embeddings)")
    fixed = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    prefixes = _prefix_map(config)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key in fixed:
            out[LDM_UNET_KEY + fixed[key]] = tensor
            continue
        for ours, theirs in prefixes:
            if key.startswith(ours):
                rest = key[len(ours) :]
                if ".resnets." in ours:
                    for old, new in RESNET_RENAMES:
                        if rest.startswith(old + "."):
                            rest = new + rest[len(old) :]
                            break
                out[LDM_UNET_KEY + theirs + rest] = tensor
                break
        else:
            raise ValueError(f"no ldm name for U-Net tensor {key}")
    return out
