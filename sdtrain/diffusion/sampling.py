"""Sampling: seeded latent noise -> denoise with classifier-free guidance -> VAE decode; and its edits.

Used by the periodic sample grid during training (and by the sampling CLI). The scheduler is a diffusers one
(DDIM by default) built from the training schedule, so prediction type and betas always match training.
img2img (SDEdit) noises the init image's latents to the timestep `strength` names and denoises from there, as
diffusers' img2img pipeline does; an inpainting U-Net gets mask + masked-image latents beside its input.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from torch import nn

from sdtrain.data.normalizer import LatentNormalizer
from sdtrain.diffusion.editing import EditInputs, encode_pixels, inpainting_channels
from sdtrain.models.conditioning import TextStates, encode_text, time_ids, unet_kwargs
from sdtrain.models.diffusers_parts import vae_scale_factor
from sdtrain.seeding import image_generator

# euler_a ("Euler a") adds fresh noise at every step, drawn from each image's own generator (image_generators):
# on small or short-trained models it gives a better FID than the deterministic samplers (the demo measures it).
SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
}


@dataclass(kw_only=True, slots=True)
class SamplingConfig:
    prompts: list[str] = field(default_factory=lambda: ["a photo of a cat", "a red apple on a table"])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    """One image per (prompt, seed); the grid has a row per prompt."""
    steps: int = 50
    guidance: float = 4.0
    """Classifier-free guidance scale; 1.0 runs the conditional branch only."""
    negative_prompt: str = ""
    """"" = the unconditional branch of training: the empty prompt's states (SD 1.x/2.x), zeros (SDXL)."""
    sampler: str = "ddim"
    guidance_rescale: float = 0.0
    """Rescaled CFG (Lin et al. 2024, diffusers' guidance_rescale): 0.7 against over-exposure, with zero SNR."""
    autoguidance: float = 1.0
    """Autoguidance (Karras et al. 2024): the prediction is pushed away from a weaker model of the same run (an
    earlier checkpoint, the `guide` U-Net) by this weight, on top of CFG; 1.0 = off."""
    init_images: list[str] = field(default_factory=list)
    """img2img grids: one image per prompt (or one for all); each row edits its image. [] = text-to-image."""
    masks: list[str] = field(default_factory=list)
    """Inpainting models: a mask per init image (white = repaint); [] with an inpainting model = everything."""
    strength: float = 0.75
    """How far img2img noises the init image: 0 = keep it, 1 = start from pure noise."""

    def __post_init__(self) -> None:
        if self.sampler not in SCHEDULERS:
            raise ValueError(f"sampler must be one of {sorted(SCHEDULERS)}, got {self.sampler!r}")
        if not 0.0 <= self.strength <= 1.0 or not 0.0 <= self.guidance_rescale <= 1.0:
            raise ValueError("strength and guidance_rescale must be in [0, 1]")
        if self.autoguidance < 1.0:
            raise ValueError(f"autoguidance must be >= 1 (1 = off), got {self.autoguidance}")
        if self.masks and not self.init_images:
            raise ValueError("masks need init_images (the image each mask applies to)")


def build_scheduler(sampler: str, train_scheduler_config: dict):  # noqa: ANN201 - a diffusers SchedulerMixin
    # steps_offset=1 is the SD convention (diffusers pipelines rewrite any other value); with the default
    # "linspace"/"leading" spacing of these schedulers it only shifts DDIM's timesteps, as SD's DDIM does.
    kwargs = {"set_alpha_to_one": False, "steps_offset": 1} if sampler == "ddim" else {"steps_offset": 1}
    if train_scheduler_config.get("rescale_betas_zero_snr"):  # start at the pure-noise timestep (Lin et al.)
        kwargs = {**kwargs, "timestep_spacing": "trailing"}
    return SCHEDULERS[sampler].from_config({**train_scheduler_config, **kwargs})


def image_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image: its starting noise, then (ancestral samplers) the noise of each step, so a
    seed gives the same picture on any device and in any batch; diffusers pipelines take the same list."""
    return [image_generator(s) for s in seeds]


def initial_noise(
    seeds: Sequence[int],
    shape: Sequence[int],
    device: torch.device,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Each image's starting noise, the first draw of its generator (`generators`, else fresh ones from `seeds`)."""
    generators = generators if generators is not None else image_generators(seeds)
    noise = [torch.randn(tuple(shape), generator=g) for g in generators]
    return torch.stack(noise).to(device)


def start_timesteps(scheduler, steps: int, strength: float) -> torch.Tensor:  # noqa: ANN001 - diffusers
    """The timesteps an edit of `strength` runs (diffusers img2img): the last `int(steps * strength)` of them."""
    first = steps - min(int(steps * strength), steps)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(first * scheduler.order)
    return scheduler.timesteps[first * scheduler.order :]


@torch.no_grad()
def denoise(
    unet: nn.Module,
    text: TextStates,
    uncond_text: TextStates | None,
    noise: torch.Tensor,
    scheduler,  # noqa: ANN001 - any diffusers scheduler
    steps: int,
    guidance: float,
    *,
    guidance_rescale: float = 0.0,
    init_latents: torch.Tensor | None = None,
    strength: float = 1.0,
    extra_channels: torch.Tensor | None = None,
    keep: tuple[torch.Tensor, torch.Tensor] | None = None,
    micro: torch.Tensor | None = None,
    generators: Sequence[torch.Generator] | None = None,
    guide: nn.Module | None = None,
    autoguidance: float = 1.0,
) -> torch.Tensor:
    """Run the reverse process from `noise` (or from `init_latents` noised to `strength`); returns final
    (normalised) latents. `extra_channels` go beside the input at every step (an inpainting U-Net's). `keep` =
    (latent mask, image latents): after each step the latents outside the mask are the image's, noised to the
    next timestep (diffusers' inpaint pipeline does this for 4-channel U-Nets), so the unmasked region stays.
    `micro`: SDXL's time ids (B, 6), the same for both guidance branches (as diffusers' SDXL pipeline).
    `generators`: one per image, for a stochastic sampler's step noise (deterministic samplers draw nothing).
    `guide`: a weaker U-Net of the same run for autoguidance, run on the conditional branch:
    pred = cond + (guidance - 1)(cond - uncond) + (autoguidance - 1)(cond - guide's cond)."""
    scheduler.set_timesteps(steps, device=noise.device)
    timesteps = scheduler.timesteps
    if init_latents is None:
        latents = noise * scheduler.init_noise_sigma
    else:
        timesteps = start_timesteps(scheduler, steps, strength)
        if len(timesteps) == 0:  # strength 0: nothing to denoise
            return init_latents.to(noise.dtype)
        latents = scheduler.add_noise(init_latents.to(noise.dtype), noise, timesteps[:1].repeat(noise.shape[0]))
    use_cfg = guidance != 1.0 and uncond_text is not None
    use_guide = guide is not None and autoguidance != 1.0
    guide_conditioning = unet_kwargs(text, micro) if use_guide else {}
    both = TextStates.cat([uncond_text, text]) if use_cfg else text
    if micro is not None and use_cfg:
        micro = torch.cat([micro, micro])
    conditioning = unet_kwargs(both, micro)
    if extra_channels is not None:
        extra_channels = torch.cat([extra_channels] * 2) if use_cfg else extra_channels
    step_noise = {"generator": list(generators)} if generators is not None else {}
    for i, t in enumerate(timesteps):
        model_in = scheduler.scale_model_input(torch.cat([latents] * 2) if use_cfg else latents, t)
        if extra_channels is not None:
            model_in = torch.cat([model_in, extra_channels.to(model_in.dtype)], dim=1)
        pred = unet(model_in, t, **conditioning).sample
        cond = pred
        if use_cfg:
            uncond, cond = pred.chunk(2)
            pred = uncond + guidance * (cond - uncond)
            if guidance_rescale > 0:
                pred = rescale_noise_cfg(pred, cond, guidance_rescale=guidance_rescale)
        if use_guide:
            weak = guide(model_in.chunk(2)[1] if use_cfg else model_in, t, **guide_conditioning).sample
            pred = pred + (autoguidance - 1.0) * (cond - weak)
        latents = scheduler.step(pred, t, latents, **step_noise).prev_sample
        if keep is not None:
            mask, original = keep
            if i + 1 < len(timesteps):
                original = scheduler.add_noise(original, noise, timesteps[i + 1 : i + 2].repeat(noise.shape[0]))
            latents = (1 - mask) * original.to(latents.dtype) + mask * latents
    return latents


@torch.no_grad()
def generate(
    *,
    unet: nn.Module,
    vae: nn.Module,
    text_encoder: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    normalizer: LatentNormalizer,
    prompts: Sequence[str],
    seeds: Sequence[int],
    latent_shape: Sequence[int],
    cfg: SamplingConfig,
    train_scheduler_config: dict,
    edit: EditInputs | None = None,
    inpainting: bool = False,
    guide: nn.Module | None = None,
) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] for paired `prompts[i]`, `seeds[i]` (and `edit` images/masks, one each);
    `guide`: the weaker U-Net for `cfg.autoguidance`."""
    device = next(unet.parameters()).device
    text = encode_text(text_encoder, tokenizer(list(prompts)).to(device))
    micro = None
    if text.pooled is not None and not cfg.negative_prompt:  # SDXL: zeros, as its pipelines' empty negative
        uncond = text.zeros_like()
    else:
        uncond = encode_text(text_encoder, tokenizer([cfg.negative_prompt] * len(prompts)).to(device))
    if text.pooled is not None:  # an uncropped image at the size generated
        factor = vae_scale_factor(vae)
        micro = time_ids((latent_shape[-2] * factor, latent_shape[-1] * factor), len(prompts), device)
    generators = image_generators(seeds)
    noise = initial_noise(seeds, latent_shape, device, generators).to(text.context.dtype)
    scheduler = build_scheduler(cfg.sampler, train_scheduler_config)
    pixels = edit.pixels if edit is not None else None
    strength = edit.strength if edit is not None else 1.0
    image_latents = encode_pixels(vae, pixels, normalizer.normalize) if pixels is not None else None
    extra = keep = None
    if inpainting:
        masks = edit.masks if edit is not None else None
        extra = inpainting_channels(vae, normalizer.normalize, pixels, masks, latent_shape, len(prompts))
        if masks is not None:
            keep = (extra[:, :1], image_latents)
    # An inpainting model at strength 1 starts from pure noise (its mask channels carry the image), as diffusers'
    # inpaint pipeline does; img2img at strength 1 noises the image to the first timestep (pure noise only with
    # zero terminal SNR), as diffusers' img2img does.
    from_image = pixels is not None and not (inpainting and strength == 1.0)
    init = image_latents if from_image else None
    latents = denoise(
        unet,
        text,
        uncond,
        noise,
        scheduler,
        cfg.steps,
        cfg.guidance,
        guidance_rescale=cfg.guidance_rescale,
        init_latents=init,
        strength=strength,
        extra_channels=extra,
        keep=keep,
        micro=micro,
        generators=generators,
        guide=guide,
        autoguidance=cfg.autoguidance,
    )
    vae_dtype = next(vae.parameters()).dtype
    decoded = vae.decode(normalizer.denormalize(latents).to(vae_dtype)).sample
    return ((decoded.float() + 1.0) / 2.0).clamp(0.0, 1.0)
