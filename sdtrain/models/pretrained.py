"""Start from pretrained weights: a local diffusers folder, an sdtrain export, or a single weights file.

Single files may be diffusers-named (`conv_in.weight`) or original ldm/SD checkpoints (`model.diffusion_model.*`,
mapped by diffusers' own `convert_ldm_unet_checkpoint`); sdtrain's own checkpoints are read through
sdtrain.checkpoint.weights, which the launcher hands to the model builder (models/builder.py). Every load
reports what it matched; a tensor of the wrong shape (wrong model size) is a ConfigError.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Callable
from typing import Any

import torch
from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from sdtrain.errors import CheckpointError, ConfigError, first_line

log = logging.getLogger(__name__)
WeightsReader = Callable[[str], dict[str, torch.Tensor]]


def model_folder(path: str, part: str) -> str | None:
    """The diffusers folder of `part` ("unet"/"vae") at `path`: the folder itself or its `part/` subfolder."""
    for folder in (os.path.join(path, part), path):
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder
    return None


def load_weights_file(path: str) -> Any:
    """What a .safetensors / .ckpt / .pt / .bin file holds (a dict of tensors, or a checkpoint dict); unsafe
    pickles are refused (weights_only=True). CheckpointError if unreadable."""
    if not os.path.isfile(path):
        raise CheckpointError(f"weights file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        first = first_line(exc)
        raise CheckpointError(f"weights file {path} is unreadable: {first}") from None


def flat_tensors(data: Any, path: str) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from a loaded weights file (a checkpoint's `state_dict` when it has one)."""
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"weights file {path} does not hold a flat dict of tensors")
    return data


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from a released-format file (diffusers or original SD names). sdtrain's own files
    (training checkpoints, consolidated U-Nets) are read by sdtrain.checkpoint.weights.read_weights."""
    return flat_tensors(load_weights_file(path), path)


def unet_state(path: str, config: dict[str, Any], read: WeightsReader = read_weights) -> dict[str, torch.Tensor]:
    """U-Net tensors under diffusers names from any supported single file."""
    state = read(path)
    if any(k.startswith(LDM_UNET_KEY) for k in state):
        log.info("%s has original SD (ldm) names: converting with diffusers' convert_ldm_unet_checkpoint", path)
        return convert_ldm_unet_checkpoint(state, config)
    return state


def load_matching(module: nn.Module, state: dict[str, torch.Tensor], source: str, where: str) -> None:
    """Load `state` into `module`, reporting missing/unexpected keys; wrong shapes and no overlap are errors."""
    own = module.state_dict()
    mismatched = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if mismatched:
        k = mismatched[0]
        raise ConfigError(
            f"{source} does not fit {where}: {len(mismatched)} tensors differ in shape (first: {k} is "
            f"{tuple(state[k].shape)} there, {tuple(own[k].shape)} here) - wrong model size or config?"
        )
    matched = [k for k in state if k in own]
    if not matched:
        raise ConfigError(f"{source} has no tensor of {where} (first key there: {next(iter(state), 'none')})")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    module.load_state_dict({k: state[k] for k in matched}, strict=False)
    log.info(
        "%s: loaded %d/%d tensors from %s; missing %d%s; unexpected %d%s",
        where,
        len(matched),
        len(own),
        source,
        len(missing),
        f" (first: {missing[0]})" if missing else "",
        len(unexpected),
        f" (first: {unexpected[0]})" if unexpected else "",
    )
    if missing:
        log.warning("%s: %d tensors keep their random init (not in %s)", where, len(missing), source)
