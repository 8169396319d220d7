"""Forward noising and the training target, using diffusers' DDPMScheduler for the schedule and its math.

loss = w(t) * || unet(x_t, t, text) - target ||^2, with target = noise (epsilon) or v = sqrt(a) noise - sqrt(1-a) x0,
w(t) = 1 or min-SNR-gamma (Hang et al. 2023). Offset noise (Guttenberg 2023) adds a per-channel constant. The
squared error may be L1 or pseudo-Huber instead, t may be drawn logit-normal instead of uniform, and the input may
be perturbed (each a DiffusionConfig key below; the defaults are SD's own recipe).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler

log = logging.getLogger(__name__)
SCHEDULE_KEYS = ("prediction_type", "num_train_timesteps", "beta_schedule", "beta_start", "beta_end")
LOSS_TYPES = ("l2", "l1", "huber")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


@dataclass(kw_only=True, slots=True)
class DiffusionConfig:
    prediction_type: str = "epsilon"
    """epsilon | v_prediction."""
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    min_snr_gamma: float | None = None
    """Weight the loss by min(SNR, gamma)/SNR (eps) or min(SNR, gamma)/(SNR+1) (v); 5.0 is the paper's value."""
    offset_noise: float = 0.0
    """Std of a per-(sample, channel) constant added to the noise; 0.05-0.1 helps very dark/bright images."""
    loss_type: str = "l2"
    """l2 (MSE) | l1 | huber: pseudo-Huber 2c(sqrt(r^2 + c^2) - c), ~r^2 for errors below c and ~2c|r| above,
    so outlier samples pull less (diffusers' training scripts' loss_type=huber, Khrapov et al. 2024)."""
    huber_c: float = 0.1
    timestep_sampling: str = "uniform"
    """uniform | logit_normal: t/T = sigmoid(N(logit_mean, logit_std)), more of the mid-range timesteps
    (Esser et al. 2024, SD3's recipe)."""
    logit_mean: float = 0.0
    logit_std: float = 1.0
    input_perturbation: float = 0.0
    """Noise the U-Net's input with noise + gamma * fresh noise while the target stays the noise (Ning et al. 2023,
    diffusers' --input_perturbation; 0.1 is the paper's value): against exposure bias at sampling time."""
    masked_loss: bool = False
    """Weight each sample's loss per latent pixel by the mask.npy/mask.png in its shard sample (1 = learn, 0 =
    ignore; docs/latent-shards.md), as kohya's --masked_loss: the mean over all pixels of mask * error, so a
    sample counts by the area it keeps. Samples without a mask count everywhere."""
    zero_terminal_snr: bool = False
    """Rescale the betas so the last timestep is pure noise (Lin et al. 2024, diffusers' rescale_betas_zero_snr);
    samplers then start there (trailing timestep spacing). Needs v_prediction: epsilon is undefined at SNR 0."""
    inpainting: bool = False
    """Train the SD inpainting layout: U-Net input = noisy latents + mask + masked-image latents (2C + 1
    channels); the shards need sdtrain-encode --inpainting-masks."""

    def __post_init__(self) -> None:
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be epsilon or v_prediction, got {self.prediction_type!r}")
        if self.loss_type not in LOSS_TYPES or self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(
                f"loss_type must be one of {LOSS_TYPES} and timestep_sampling one of {TIMESTEP_SAMPLINGS}, got "
                f"{self.loss_type!r} and {self.timestep_sampling!r}"
            )
        if self.huber_c <= 0 or self.logit_std <= 0 or self.input_perturbation < 0 or self.offset_noise < 0:
            raise ValueError("huber_c and logit_std must be > 0, input_perturbation and offset_noise >= 0")
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise ValueError(
                "zero_terminal_snr=true needs prediction_type=v_prediction (epsilon is undefined at SNR 0)"
            )

    def with_schedule_of(self, scheduler: dict, *, inpainting: bool = False) -> DiffusionConfig:
        """A released model's schedule (its scheduler_config.json) for each key still at the default here: a key
        set to something else (diffusion.prediction_type=..., diffusion=v_prediction) is the user's choice. An
        inpainting release (`inpainting`) trains as one."""
        defaults = DiffusionConfig()
        released = {
            **scheduler,
            "zero_terminal_snr": bool(scheduler.get("rescale_betas_zero_snr")),
            "inpainting": inpainting,
        }
        changes = {
            k: released[k]
            for k in (*SCHEDULE_KEYS, "zero_terminal_snr", "inpainting")
            if k in released and getattr(self, k) == getattr(defaults, k) != released[k]
        }
        if changes:
            log.info("diffusion: from the pretrained scheduler: %s", changes)
        return dataclasses.replace(self, **changes)

    def scheduler_config(self) -> dict:
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": self.beta_schedule,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "prediction_type": self.prediction_type,
            "clip_sample": False,
            **({"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if self.zero_terminal_snr else {}),
        }


class DiffusionObjective:
    def __init__(self, cfg: DiffusionConfig) -> None:
        self.cfg = cfg
        self.scheduler = DDPMScheduler(**cfg.scheduler_config())
        alphas_cumprod = self.scheduler.alphas_cumprod
        self.snr = alphas_cumprod / (1.0 - alphas_cumprod)

    def sample_noise(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        if self.cfg.offset_noise > 0:
            offset = torch.randn(latents.shape[:2] + (1, 1), generator=generator, device=latents.device)
            noise = noise + self.cfg.offset_noise * offset.to(latents.dtype)
        return noise

    def sample_timesteps(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        steps = self.cfg.num_train_timesteps
        if self.cfg.timestep_sampling == "uniform":
            return torch.randint(0, steps, (n,), device=device, generator=generator)
        normal = torch.randn(n, device=device, generator=generator) * self.cfg.logit_std + self.cfg.logit_mean
        return (torch.sigmoid(normal) * steps).long().clamp_(max=steps - 1)

    def input_noise(self, noise: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The noise that goes into the training input: `noise`, plus input_perturbation * fresh noise (drawn from
        `generator` after the noise and timesteps, so a run without it draws as before)."""
        if self.cfg.input_perturbation == 0:
            return noise
        extra = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
        return noise + self.cfg.input_perturbation * extra

    def noisy_and_target(
        self,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        input_noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The U-Net's input x_t (noised with `input_noise`, default `noise`) and its target (from `noise`)."""
        noisy = self.scheduler.add_noise(latents, noise if input_noise is None else input_noise, timesteps)
        if self.cfg.prediction_type == "epsilon":
            return noisy, noise
        return noisy, self.scheduler.get_velocity(latents, noise, timesteps)

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        gamma = self.cfg.min_snr_gamma
        if gamma is None:
            return None
        snr = self.snr.to(timesteps.device)[timesteps]
        clipped = torch.clamp(snr, max=gamma)
        return clipped / (snr + 1.0) if self.cfg.prediction_type == "v_prediction" else clipped / snr

    def elementwise_loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        error = prediction.float() - target.float()
        if self.cfg.loss_type == "l1":
            return error.abs()
        if self.cfg.loss_type == "huber":
            c = self.cfg.huber_c
            return 2 * c * (torch.sqrt(error.pow(2) + c * c) - c)
        return error.pow(2)

    def loss(
        self,
        prediction: torch.Tensor,
        target: torch.Tensor,
        timesteps: torch.Tensor,
        pixel_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean over the batch of w(t) * the per-sample mean error; `pixel_weights` (B, 1, h, w) scale the error
        per latent pixel first (masked loss)."""
        error = self.elementwise_loss(prediction, target)
        if pixel_weights is not None:
            error = error * pixel_weights.to(error.dtype)
        per_sample = error.mean(dim=(1, 2, 3))
        weights = self.loss_weights(timesteps)
        if weights is not None:
            per_sample = per_sample * weights
        return per_sample.mean()
