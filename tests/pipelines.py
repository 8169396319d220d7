"""Tiny released-layout Stable Diffusion pipelines, built and saved by diffusers/transformers themselves (random
weights, real folder layout): SD 1.x (CLIP-L-like CLIPTextModel, quick_gelu, EOT padding, epsilon) and SD 2.x
(CLIPTextModel as converted from OpenCLIP: gelu, "!" padding, linear projections, v-prediction). The CLIP
tokenizer's vocab.json/merges.txt are made from open_clip's BPE vocabulary (in its wheel)."""

from __future__ import annotations

from pathlib import Path

import torch

from sdtrain.models.clip_layout import clip_tokenizer

TINY_VAE = dict(  # both layouts' AutoencoderKL: 2x downsampling, 4 latent channels
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
    vae = AutoencoderKL.from_pretrained(vae) if vae else AutoencoderKL(**TINY_VAE)
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


def save_tiny_sdxl_pipeline(out: Path, seed: int = 0, *, drop: str | None = None) -> Path:
    """A tiny StableDiffusionXLPipeline folder: CLIPTextModel + CLIPTextModelWithProjection (each with its own
    tokenizer: EOT and "!" padding; widths 32 and 48 differ as CLIP-L's and bigG's do, which diffusers'
    from_single_file tells them apart by), a text_time U-Net (cross-attention 32 + 48, pooled 40 + 6 x 8 time ids),
    an AutoencoderKL with SDXL's scaling factor 0.13025, Euler scheduler. `drop`: a part folder to delete."""
    import shutil

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)

    def text_config(pad: int, width: int, projection: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            hidden_size=width,
            intermediate_size=2 * width,
            num_attention_heads=4,
            num_hidden_layers=3,
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_act="gelu",
            pad_token_id=pad,
            projection_dim=projection,
        )

    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=32 + 48,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=40 + 6 * 8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(**TINY_VAE, scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config(1, 32, 32)),
        text_encoder_2=CLIPTextModelWithProjection(text_config(0, 48, 40)),
        tokenizer=clip_tokenizer(str(out.parent / f"{out.name}-tokenizer-src"), "<|endoftext|>"),
        tokenizer_2=clip_tokenizer(str(out.parent / f"{out.name}-tokenizer-2-src"), "!"),
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(out)
    if drop:
        shutil.rmtree(out / drop)
    return out
