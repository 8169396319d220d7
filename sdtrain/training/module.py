"""The LightningModule: one training step = text encode (frozen) -> noise -> U-Net -> weighted MSE."""

from __future__ import annotations

from collections import Counter
from typing import Any

import lightning as L
import torch
from torch import nn

from sdtrain.data.loader import LatentNormalizer, Tokenizer
from sdtrain.diffusion.objective import DiffusionObjective
from sdtrain.training.optim import OptimConfig, build_optimizer


class LatentDiffusionModule(L.LightningModule):
    """Holds the trainable U-Net and the frozen parts sampling needs (text encoder, VAE, tokenizer)."""

    def __init__(
        self,
        *,
        unet: nn.Module,
        text_encoder: nn.Module,
        vae: nn.Module,
        tokenizer: Tokenizer,
        objective: DiffusionObjective,
        optim: OptimConfig,
        normalizer: LatentNormalizer,
        latent_shape: tuple[int, ...],
    ) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.vae = vae
        self.tokenizer = tokenizer
        self.objective = objective
        self.optim = optim
        self.normalizer = normalizer
        self.latent_shape = latent_shape
        self.skipped: Counter[str] = Counter()

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.unet(noisy, timesteps, encoder_hidden_states=self.text_encoder(tokens)).sample

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        latents = batch["latents"]
        noise = self.objective.sample_noise(latents)
        timesteps = self.objective.sample_timesteps(latents.shape[0], latents.device)
        noisy, target = self.objective.noisy_and_target(latents, noise, timesteps)
        loss = self.objective.loss(self(noisy, timesteps, batch["tokens"]), target, timesteps)
        self.skipped.update(batch.get("skipped") or {})
        self.log("train/loss", loss, prog_bar=True)
        if self.skipped:
            self.log("data/skipped", float(sum(self.skipped.values())))
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer, scheduler = build_optimizer(self.unet.parameters(), self.optim, self.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["sdtrain"] = {"latent_shape": list(self.latent_shape), "skipped": dict(self.skipped)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped = Counter(checkpoint.get("sdtrain", {}).get("skipped", {}))
