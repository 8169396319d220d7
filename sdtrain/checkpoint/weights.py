"""Weights for fine-tuning from any single file, sdtrain's own included (`model.unet.pretrained=FILE`).

Released formats (diffusers or original SD names) are models.pretrained's; on top of them this reads a training
checkpoint (its EMA U-Net weights, the raw ones when it has no EMA) and an `sdtrain-consolidate` file (its EMA,
else its raw weights). The launcher hands `read_weights` to the model builder.
"""

from __future__ import annotations

import logging

import torch

from sdtrain.checkpoint.format import (
    CONSOLIDATED_EMA,
    CONSOLIDATED_UNET,
    find_ema_state,
    is_consolidated,
    is_training_checkpoint,
    under_prefix,
)
from sdtrain.models.pretrained import flat_tensors, load_weights_file

log = logging.getLogger(__name__)


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """A flat {name: tensor}; the U-Net's under diffusers names without a prefix when the file is sdtrain's."""
    data = load_weights_file(path)
    if is_training_checkpoint(data) and any(k.startswith("unet.") for k in data["state_dict"]):
        state = data["state_dict"]
        ema = find_ema_state(data)
        log.info("%s is an sdtrain checkpoint: using its %s U-Net weights", path, "EMA" if ema else "raw")
        unet = ema["shadow"] if ema else under_prefix(state, "unet.")
        return {**{k: v for k, v in state.items() if not k.startswith("unet.")}, **unet}
    if isinstance(data, dict) and not is_training_checkpoint(data) and is_consolidated(data):
        ema = under_prefix(data, CONSOLIDATED_EMA)
        log.info("%s is an sdtrain-consolidate file: using its %s U-Net weights", path, "EMA" if ema else "raw")
        return ema or under_prefix(data, CONSOLIDATED_UNET)
    return flat_tensors(data, path)
