"""What the U-Net is conditioned on besides the noisy latents and the timestep, in one place.

SD 1.x / 2.x: the text encoder's hidden states (cross-attention `encoder_hidden_states`). SDXL adds, through
diffusers' `added_cond_kwargs`, the pooled projection of its second text encoder (`text_embeds`) and the
micro-conditioning `time_ids` = (original height, original width, crop top, crop left, target height, target
width) in pixels (Podell et al. 2023, section 2.2). Training, validation, sampling and the FLOP count all build
the U-Net's keyword arguments here, so they agree on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

TIME_IDS = 6  # original (h, w), crop top-left (top, left), target (h, w)


@dataclass
class TextStates:
    """A batch of prompts as the frozen encoders give them."""

    context: torch.Tensor
    """(B, L, D) hidden states for cross-attention."""
    pooled: torch.Tensor | None = None
    """(B, P) SDXL's pooled text embedding (`text_embeds`); None for SD 1.x / 2.x."""

    def zeroed(self, dropped: torch.Tensor) -> TextStates:
        """Rows where `dropped` (B,) is true set to zero: SDXL's caption dropout (its ucg) and what its pipelines
        feed the unconditional branch of an empty negative prompt (force_zeros_for_empty_prompt)."""
        keep = (~dropped.to(self.context.device)).to(self.context.dtype)
        pooled = self.pooled * keep[:, None] if self.pooled is not None else None
        return TextStates(self.context * keep[:, None, None], pooled)

    def zeros_like(self) -> TextStates:
        pooled = torch.zeros_like(self.pooled) if self.pooled is not None else None
        return TextStates(torch.zeros_like(self.context), pooled)

    def to(self, dtype: torch.dtype) -> TextStates:
        return TextStates(self.context.to(dtype), self.pooled.to(dtype) if self.pooled is not None else None)

    def select(self, rows: Any) -> TextStates:
        return TextStates(self.context[rows], self.pooled[rows] if self.pooled is not None else None)

    @staticmethod
    def cat(parts: list[TextStates]) -> TextStates:
        pooled = [p.pooled for p in parts]
        joined = torch.cat(pooled) if all(p is not None for p in pooled) else None
        return TextStates(torch.cat([p.context for p in parts]), joined)


def encode_text(text_encoder: nn.Module, tokens: torch.Tensor) -> TextStates:
    """The frozen encoder's states for `tokens` (every sdtrain text encoder has `encode`)."""
    return text_encoder.encode(tokens)


def needs_micro_conditioning(unet: nn.Module) -> bool:
    """Whether the U-Net takes SDXL's pooled text + time_ids (diffusers' addition_embed_type="text_time")."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def pooled_width(unet_config: dict[str, Any]) -> int:
    """The pooled text width an SDXL U-Net expects: its added-embedding input less the six time ids."""
    return int(unet_config["projection_class_embeddings_input_dim"]) - TIME_IDS * int(
        unet_config["addition_time_embed_dim"]
    )


def time_ids(
    target: tuple[int, int], count: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(count, 6) time ids of an uncropped image generated at `target` (h, w) pixels: original = target, crop
    (0, 0), as diffusers' SDXL pipelines default (and the default for shard samples without size metadata)."""
    h, w = target
    return torch.tensor([[h, w, 0, 0, h, w]] * count, dtype=dtype, device=device)


def unet_kwargs(states: TextStates, micro: torch.Tensor | None) -> dict[str, Any]:
    """UNet2DConditionModel keyword arguments for `states` (and SDXL's `micro` time ids (B, 6))."""
    kwargs: dict[str, Any] = {"encoder_hidden_states": states.context}
    if states.pooled is not None:
        if micro is None:
            raise ValueError("an SDXL U-Net needs time_ids beside the pooled text embedding")
        kwargs["added_cond_kwargs"] = {"text_embeds": states.pooled, "time_ids": micro.to(states.pooled.dtype)}
    return kwargs


def example_inputs(config: dict[str, Any], context_length: int, context_dim: int | None = None) -> dict[str, Any]:
    """Random conditioning keyword arguments for one image of a U-Net with `config` (FLOP and memory counts on
    the meta device)."""
    width = context_dim or int(config["cross_attention_dim"])
    sdxl = config.get("addition_embed_type") == "text_time"
    states = TextStates(torch.randn(1, context_length, width), torch.randn(1, pooled_width(config)) if sdxl else None)
    return unet_kwargs(states, torch.zeros(1, TIME_IDS) if sdxl else None)
