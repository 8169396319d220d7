"""CLIP score with a local OpenCLIP checkpoint: 100 * max(cos(image, caption), 0), averaged (Hessel et al. 2021,
as torchmetrics computes it). Images (N, 3, H, W) in [0, 1] are resized and normalised as the model expects."""

from __future__ import annotations

import os
from collections.abc import Sequence

import open_clip
import torch
import torch.nn.functional as F

from sdtrain.errors import CheckpointError, ConfigError


class ClipScorer:
    def __init__(self, arch: str, weights: str, device: str | torch.device = "cpu", batch_size: int = 64) -> None:
        if arch not in open_clip.list_models():
            raise ConfigError(f"--clip-arch {arch!r} is not an open_clip model name")
        if not os.path.isfile(weights):
            raise CheckpointError(f"CLIP weights not found: {weights}")
        try:
            self.model = open_clip.create_model(arch, pretrained=weights, weights_only=True).to(device).eval()
        except RuntimeError as exc:
            raise CheckpointError(f"CLIP weights {weights} do not fit {arch}: {str(exc).splitlines()[0]}") from None
        self.tokenizer = open_clip.get_tokenizer(arch)
        size = self.model.visual.image_size
        self.size = tuple(size) if isinstance(size, list | tuple) else (size, size)
        cfg = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        self.mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD), device=device).view(1, 3, 1, 1)
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def per_image(self, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        if images.shape[0] != len(captions):
            raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
        scores = []
        for start in range(0, len(captions), self.batch_size):
            x = images[start : start + self.batch_size].to(self.device, torch.float32).clamp(0, 1)
            x = F.interpolate(x, size=self.size, mode="bicubic", align_corners=False).clamp(0, 1)
            image_emb = F.normalize(self.model.encode_image((x - self.mean) / self.std), dim=-1)
            tokens = self.tokenizer(list(captions[start : start + self.batch_size])).to(self.device)
            text_emb = F.normalize(self.model.encode_text(tokens), dim=-1)
            scores.append((100.0 * (image_emb * text_emb).sum(dim=-1)).clamp(min=0).cpu())
        return torch.cat(scores)

    def __call__(self, images: torch.Tensor, captions: Sequence[str]) -> float:
        return float(self.per_image(images, captions).mean())
