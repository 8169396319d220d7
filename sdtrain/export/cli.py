"""`sdtrain-export CKPT OUT`: a training checkpoint -> a diffusers folder (+ an ldm single-file U-Net).

    sdtrain-export run/checkpoints/last.ckpt exported/            # EMA weights (default)
    sdtrain-export run/checkpoints/last.ckpt exported-raw/ --weights raw
    sdtrain-export run/checkpoints/last.ckpt exported/ --single-file model.safetensors
    sdtrain-export lora-run/checkpoints/last.ckpt lora/           # a LoRA run: diffusers' LoRA format
    sdtrain-export lora-run/checkpoints/last.ckpt merged/ --merge # ... or the full model, LoRA folded in

Load it with plain diffusers: `StableDiffusionPipeline.from_pretrained("exported/")` (or
`StableDiffusionPipeline.from_single_file("model.safetensors", config="exported/")` for the single file, which
holds `model.diffusion_model.*`, `first_stage_model.*` and `cond_stage_model.*` as SD 1.x/2.x files do);
continue training from it with `model.pretrained=exported/` (or `model.pretrained=model.safetensors`). A LoRA
export loads onto its base: `StableDiffusionPipeline.from_pretrained(BASE).load_lora_weights("lora/")`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from sdtrain.checkpoint.format import WEIGHTS
from sdtrain.checkpoint.trained import load_trained
from sdtrain.diffusion.sampling import SCHEDULERS
from sdtrain.errors import command_line
from sdtrain.export.diffusers_folder import export_diffusers

log = logging.getLogger("sdtrain.export")


@command_line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a training checkpoint (.ckpt)")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--weights", choices=WEIGHTS, default="ema", help="EMA (default) or raw U-Net weights")
    parser.add_argument("--sampler", choices=sorted(SCHEDULERS), default="ddim", help="the folder's scheduler")
    parser.add_argument(
        "--single-file", metavar="FILE.safetensors", help="also write one original-layout SD file (ComfyUI, A1111)"
    )
    parser.add_argument("--merge", action="store_true", help="a LoRA run: write the full model, adapters folded in")
    args = parser.parse_args(argv)
    if args.single_file and not args.single_file.endswith(".safetensors"):
        parser.error("--single-file must name a .safetensors file")
    model = load_trained(args.checkpoint, args.weights)
    export_diffusers(model, args.out, sampler=args.sampler, single_file=args.single_file, merge=args.merge)
    log.info("exported step %d (%s weights) to %s", model.step, model.weights, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
