"""`sdtrain-consolidate CKPT OUT.safetensors`: any training checkpoint -> one safetensors file of U-Net weights.

    sdtrain-consolidate run/checkpoints/last.ckpt unet.safetensors      # DeepSpeed / FSDP directory or a file

Works offline on one machine, whatever strategy and world size wrote the checkpoint. Keys: `unet.NAME` (the
trained weights, diffusers names) and `ema.NAME` (the EMA weights), float32; the file's metadata holds the
global step and the model spec (JSON). `model.unet.pretrained=OUT.safetensors` fine-tunes from its EMA weights;
`--no-ema` leaves them out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch
from safetensors.torch import save_file

from sdtrain.checkpoint.files import load_full_checkpoint
from sdtrain.checkpoint.format import (
    CONSOLIDATED_EMA,
    CONSOLIDATED_UNET,
    SPEC_KEY,
    find_ema_state,
    part_state,
    sdtrain_state,
)
from sdtrain.errors import CheckpointError, command_line

log = logging.getLogger("sdtrain.consolidate")


def consolidated_tensors(checkpoint: dict, with_ema: bool = True) -> dict[str, torch.Tensor]:
    unet = part_state(checkpoint, "unet")
    if not unet:
        raise CheckpointError("the checkpoint holds no U-Net weights (no 'unet.*' tensors)")
    tensors = {f"{CONSOLIDATED_UNET}{k}": v.float().contiguous() for k, v in unet.items()}
    ema = find_ema_state(checkpoint) if with_ema else None
    if ema:
        tensors.update({f"{CONSOLIDATED_EMA}{k}": v.float().contiguous() for k, v in ema["shadow"].items()})
    return tensors


@command_line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a training checkpoint: a .ckpt file or a DeepSpeed/FSDP directory")
    parser.add_argument("out", help="output .safetensors file")
    parser.add_argument("--no-ema", action="store_true", help="only the trained weights")
    args = parser.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        parser.error(f"out must end in .safetensors, got {args.out}")
    checkpoint = load_full_checkpoint(args.checkpoint)
    tensors = consolidated_tensors(checkpoint, with_ema=not args.no_ema)
    metadata = {
        "format": "pt",
        "global_step": str(checkpoint.get("global_step", -1)),
        "sdtrain_spec": json.dumps(sdtrain_state(checkpoint).get(SPEC_KEY) or {}),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = f"{args.out}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, args.out)
    ema = sum(k.startswith(CONSOLIDATED_EMA) for k in tensors)
    log.info(
        "wrote %s: %d U-Net tensors + %d EMA tensors (step %s)",
        args.out,
        len(tensors) - ema,
        ema,
        metadata["global_step"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
