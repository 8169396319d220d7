"""Tiny released-layout Stable Diffusion pipelines, built and saved by diffusers/transformers themselves (random
weights, real folder layout): SD 1.x (CLIP-L-like CLIPTextModel, quick_gelu, EOT padding, epsilon) and SD 2.x
(CLIPTextModel as converted from OpenCLIP: gelu, "!" padding, linear projections, v-prediction). The CLIP
tokenizer's vocab.json/merges.txt are made from open_clip's BPE vocabulary (in its wheel)."""

from __future__ import annotations

from pathlib import Path

import torch

from sdtrain.models.clip_layout import clip_tokenizer


def save_tiny_pipeline(
    out: Path, version: str = "sd1", seed: int = 0, *, inpainting: bool = False, vae: str | None = None
) -> Path:
    """`inpainting`: a 9-channel U-Net in a StableDiffusionInpaintPipeline folder; `vae`: this VAE folder's."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    sd2 = version == "sd2"
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=3,
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_act="gelu" if sd2 else "quick_gelu",
            pad_token_id=0 if sd2 else 1,
            projection_dim=32,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=9 if inpainting else 4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4) if sd2 else 8,
        use_linear_projection=sd2,
        norm_num_groups=8,
    )
    vae = (
        AutoencoderKL.from_pretrained(vae)
        if vae
        else AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=16,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if sd2 else "epsilon",
    )
    tokenizer = clip_tokenizer(str(out.parent / f"{out.name}-tokenizer-src"), "!" if sd2 else "<|endoftext|>")
    pipe = (StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline)(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    return out
