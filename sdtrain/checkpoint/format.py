"""What an sdtrain checkpoint holds, named once. A checkpoint is a Lightning checkpoint dict:

    state_dict                  unet.* (trained), vae.* and text_encoder.* (frozen) under diffusers/OpenCLIP names
    callbacks[EMA_STATE_KEY]    {"shadow": {U-Net parameter name: fp32 tensor}, "num_updates", "last_step"}
    sdtrain                     spec (spec.py), latent_shape, skipped, nonfinite_skips, rng (per rank), wandb_run_id
    global_step, loops, optimizer_states, lr_schedulers   Lightning's own

A sharded strategy writes a directory instead (sharded.py) whose metadata file holds the same dict without weights.
`sdtrain-consolidate` writes one safetensors file of CONSOLIDATED_UNET + CONSOLIDATED_EMA tensors.
"""

from __future__ import annotations

from typing import Any

import torch

LAST_NAME = "last.ckpt"  # DIR/checkpoints/last.ckpt: always the newest state
STEP_NAME = "step_{step:06d}"  # DIR/checkpoints/step_000500.ckpt (Lightning's filename template)
SDTRAIN_KEY = "sdtrain"
SPEC_KEY = "spec"  # checkpoint["sdtrain"]["spec"]: rebuilds the model (spec.py)
WANDB_ID_KEY = "wandb_run_id"  # checkpoint["sdtrain"]["wandb_run_id"]: a resumed run logs into the same run
EMA_STATE_KEY = "EMACallback"  # the EMA callback's state_key (its class name, as Lightning's default gave it)
PARTS = ("unet", "vae", "text_encoder")  # state_dict prefixes: the LightningModule's attribute names
CONSOLIDATED_UNET, CONSOLIDATED_EMA = "unet.", "ema."
WEIGHTS = ("ema", "raw")


def under_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose names start with `prefix`, with it removed ("unet.conv_in.weight" -> "conv_in.weight")."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def part_state(checkpoint: dict[str, Any], part: str) -> dict[str, torch.Tensor]:
    """One model part's tensors ("unet", "vae", "text_encoder") from a checkpoint's state_dict."""
    return under_prefix(checkpoint["state_dict"], f"{part}.")


def sdtrain_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    return checkpoint.get(SDTRAIN_KEY) or {}


def find_ema_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The EMA state ({"shadow": {param name: tensor}, ...}) of a Lightning checkpoint, or None."""
    callbacks = checkpoint.get("callbacks") or {}
    state = callbacks.get(EMA_STATE_KEY)
    if state is None:  # a state_key with arguments appended (Lightning's form for configurable callbacks)
        state = next((v for k, v in callbacks.items() if str(k).startswith(EMA_STATE_KEY)), None)
    return state if isinstance(state, dict) and state.get("shadow") else None


def is_training_checkpoint(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("state_dict"), dict)


def is_consolidated(state: dict[str, torch.Tensor]) -> bool:
    """An `sdtrain-consolidate` file: unet.* tensors, optionally ema.*, nothing else."""
    prefixes = (CONSOLIDATED_UNET, CONSOLIDATED_EMA)
    return any(k.startswith(CONSOLIDATED_UNET) for k in state) and all(k.startswith(prefixes) for k in state)
