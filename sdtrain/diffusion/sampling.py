"""Text-to-image sampling: seeded latent noise -> denoise with classifier-free guidance -> VAE decode.

Used by the periodic sample grid during training (and by the sampling CLI). The scheduler is a diffusers one
(DDIM by default) built from the training schedule, so prediction type and betas always match training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from torch import nn

from sdtrain.seeding import image_generator

SCHEDULERS = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm++": DPMSolverMultistepScheduler}


@dataclass(kw_only=True, slots=True)
class SamplingConfig:
    prompts: list[str] = field(default_factory=lambda: ["a photo of a cat", "a red apple on a table"])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    """One image per (prompt, seed); the grid has a row per prompt."""
    steps: int = 50
    guidance: float = 4.0
    """Classifier-free guidance scale; 1.0 runs the conditional branch only."""
    negative_prompt: str = ""
    sampler: str = "ddim"

    def __post_init__(self) -> None:
        if self.sampler not in SCHEDULERS:
            raise ValueError(f"sampler must be one of {sorted(SCHEDULERS)}, got {self.sampler!r}")


def build_scheduler(sampler: str, train_scheduler_config: dict):  # noqa: ANN201 - a diffusers SchedulerMixin
    # steps_offset=1 is the SD convention (diffusers pipelines rewrite any other value); with the default
    # "linspace"/"leading" spacing of these schedulers it only shifts DDIM's timesteps, as SD's DDIM does.
    kwargs = {"set_alpha_to_one": False, "steps_offset": 1} if sampler == "ddim" else {"steps_offset": 1}
    return SCHEDULERS[sampler].from_config({**train_scheduler_config, **kwargs})


def initial_noise(seeds: Sequence[int], shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """Per-image CPU generators, so a seed gives the same picture on any device and in any batch."""
    noise = [torch.randn(tuple(shape), generator=image_generator(s)) for s in seeds]
    return torch.stack(noise).to(device)


@torch.no_grad()
def denoise(
    unet: nn.Module,
    context: torch.Tensor,
    uncond_context: torch.Tensor | None,
    noise: torch.Tensor,
    scheduler,  # noqa: ANN001 - any diffusers scheduler
    steps: int,
    guidance: float,
) -> torch.Tensor:
    """Run the reverse process from `noise`; returns final (normalised) latents."""
    scheduler.set_timesteps(steps, device=noise.device)
    latents = noise * scheduler.init_noise_sigma
    use_cfg = guidance != 1.0 and uncond_context is not None
    both = torch.cat([uncond_context, context]) if use_cfg else context
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([latents] * 2) if use_cfg else latents, t)
        pred = unet(model_in, t, encoder_hidden_states=both).sample
        if use_cfg:
            uncond, cond = pred.chunk(2)
            pred = uncond + guidance * (cond - uncond)
        latents = scheduler.step(pred, t, latents).prev_sample
    return latents


@torch.no_grad()
def generate(
    *,
    unet: nn.Module,
    vae: nn.Module,
    text_encoder: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    denormalize: Callable[[torch.Tensor], torch.Tensor],
    prompts: Sequence[str],
    seeds: Sequence[int],
    latent_shape: Sequence[int],
    cfg: SamplingConfig,
    train_scheduler_config: dict,
) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] for paired `prompts[i]`, `seeds[i]`."""
    device = next(unet.parameters()).device
    context = text_encoder(tokenizer(list(prompts)).to(device))
    uncond = text_encoder(tokenizer([cfg.negative_prompt] * len(prompts)).to(device))
    noise = initial_noise(seeds, latent_shape, device).to(context.dtype)
    scheduler = build_scheduler(cfg.sampler, train_scheduler_config)
    latents = denoise(unet, context, uncond, noise, scheduler, cfg.steps, cfg.guidance)
    vae_dtype = next(vae.parameters()).dtype
    pixels = vae.decode(denormalize(latents).to(vae_dtype)).sample
    return ((pixels.float() + 1.0) / 2.0).clamp(0.0, 1.0)
