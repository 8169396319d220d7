"""Generate from an exported folder with diffusers' own StableDiffusionPipeline, seeds meaning what they mean in
`sdtrain-sample` (each image's starting noise from its own seeded generator): same seeds -> same pixels.

Every export holds a transformers text encoder and tokenizer, so the pipeline encodes the prompts itself.
Exports written before OpenCLIP towers were converted (text_encoder/ in sdtrain's own format, model_index.json
naming no text encoder) are still read: `ExportedTextEncoder` encodes their prompts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from sdtrain.diffusion.sampling import image_generators, initial_noise
from sdtrain.errors import CheckpointError
from sdtrain.export.diffusers_folder import export_text_kind, read_export_info
from sdtrain.models.text_encoder import TextEncoderConfig, build_text_encoder, build_tokenizer


class ExportedTextEncoder:
    """prompts -> hidden states (B, L, width), from an older export's sdtrain-format OUT/text_encoder."""

    def __init__(self, folder: str, device: str | torch.device = "cpu") -> None:
        text_dir = os.path.join(folder, "text_encoder")
        if not os.path.isfile(os.path.join(text_dir, "config.json")):
            raise CheckpointError(f"{folder} has no text_encoder/config.json (not an sdtrain export)")
        with open(os.path.join(text_dir, "config.json"), encoding="utf-8") as f:
            config = {k: v for k, v in json.load(f).items() if k != "class"}
        self.config = TextEncoderConfig(**config)
        self.encoder = build_text_encoder(self.config)
        self.encoder.load_state_dict(load_file(os.path.join(text_dir, "model.safetensors")))
        self.encoder.to(device)
        self.tokenizer = build_tokenizer(self.config)
        self.device = torch.device(device)

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.encoder(self.tokenizer(list(prompts)).to(self.device))


@dataclass
class ExportedPipeline:
    """diffusers' StableDiffusionPipeline on the folder (+ the text encoder of an older export)."""

    pipe: StableDiffusionPipeline
    text: ExportedTextEncoder | None
    latent_shape: tuple[int, ...]

    @torch.no_grad()
    def __call__(
        self, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, guidance: float, negative_prompt: str = ""
    ) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1]; the starting noise is sdtrain's per-seed noise, so seeds mean the same."""
        factor = self.pipe.vae_scale_factor
        if self.text is None:
            prompt_args = {"prompt": list(prompts), "negative_prompt": [negative_prompt] * len(prompts)}
        else:
            prompt_args = {
                "prompt_embeds": self.text(prompts),
                "negative_prompt_embeds": self.text([negative_prompt] * len(prompts)),
            }
        generators = image_generators(seeds)  # the starting noise, then an ancestral sampler's step noise
        return self.pipe(
            **prompt_args,
            latents=initial_noise(seeds, self.latent_shape, self.pipe.device, generators),
            generator=generators,
            height=self.latent_shape[1] * factor,
            width=self.latent_shape[2] * factor,
            num_inference_steps=steps,
            guidance_scale=guidance,
            output_type="pt",
        ).images


def load_pipeline(folder: str, device: str | torch.device = "cpu") -> ExportedPipeline:
    """An sdtrain export as a pipeline called with (prompts, seeds) like `sdtrain-sample`. The folder itself is
    plain diffusers: `StableDiffusionPipeline.from_pretrained(folder)` runs it with no sdtrain code."""
    info = read_export_info(folder)
    legacy = export_text_kind(folder, info) is None  # the OpenCLIP tower in sdtrain's own format
    parts = {"text_encoder": None, "tokenizer": None} if legacy else {}
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, **parts, safety_checker=None, feature_extractor=None, local_files_only=True, low_cpu_mem_usage=False
    )
    pipe.set_progress_bar_config(disable=True)
    text = ExportedTextEncoder(folder, device) if legacy else None
    return ExportedPipeline(pipe.to(device), text, tuple(info["latent_shape"]))
