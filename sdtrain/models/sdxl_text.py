"""SDXL's two frozen text encoders as one: CLIP-L (`text_encoder`, a `CLIPTextModel`) and OpenCLIP-bigG
(`text_encoder_2`, a `CLIPTextModelWithProjection`), each with its own tokenizer.

A prompt is encoded as diffusers' StableDiffusionXLPipeline.encode_prompt (and Stability's sgm) does: each
encoder's penultimate hidden states *without* the final LayerNorm, concatenated along the width (768 + 1280 =
2048), and the second encoder's pooled projection as `text_embeds` (1280). OpenCLIP towers (a from-scratch
`model=sdxl` with open_clip checkpoints) are read the same way: penultimate block output, pooled = the tower's
projected end-of-text feature. Tokens are (B, 2, L): one row per tokenizer.
"""

from __future__ import annotations

import torch
from torch import nn

from sdtrain.models.conditioning import TextStates
from sdtrain.models.hf_text import FrozenHFText
from sdtrain.models.text_encoder import FrozenOpenCLIPText, Tokenizer


class TokenizerPair:
    """Both tokenizers on the same captions: (B, 2, context_length) int64. Picklable (loader workers)."""

    def __init__(self, first: Tokenizer, second: Tokenizer) -> None:
        self.first, self.second = first, second
        self.context_length = first.context_length
        if second.context_length != first.context_length:
            raise ValueError("SDXL's two tokenizers need the same context length")

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        return torch.stack([self.first(texts), self.second(texts)], dim=1)


def penultimate_and_pooled(encoder: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states, pooled projection or None) of one encoder, SDXL's way (`layer=last` takes the last
    layer's normed states instead)."""
    if isinstance(encoder, FrozenHFText):
        out = encoder.model(input_ids=tokens, output_hidden_states=True)
        hidden = out.hidden_states[-2] if encoder.layer == "penultimate" else out.last_hidden_state
        pooled = getattr(out, "text_embeds", None)
        return hidden, pooled if pooled is not None else out.pooler_output
    if isinstance(encoder, FrozenOpenCLIPText):
        layers = len(encoder.tower.transformer.resblocks)
        index = layers - 2 if encoder.layer == "penultimate" else layers - 1
        out = encoder.tower.forward_intermediates(tokens, indices=[index], output_fmt="NLC")
        hidden = out["text_intermediates"][0]
        return (hidden if encoder.layer == "penultimate" else encoder.tower.ln_final(hidden)), out["text_features"]
    raise TypeError(f"SDXL text encoders must be transformers or OpenCLIP towers, got {type(encoder).__name__}")


class SDXLTextEncoders(nn.Module):
    """tokens (B, 2, L) -> TextStates(context (B, L, w1 + w2), pooled (B, P)). Frozen, always eval."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second
        self.requires_grad_(False)
        self.eval()

    @property
    def width(self) -> int:
        return self.first.width + self.second.width

    @property
    def pooled_width(self) -> int:
        """Width of `text_embeds`: the second encoder's projection (its hidden width without one)."""
        if isinstance(self.second, FrozenHFText):
            config = self.second.model.config
            has_projection = hasattr(self.second.model, "text_projection")
            return int(config.projection_dim if has_projection else config.hidden_size)
        projection = self.second.tower.text_projection
        if projection is None:
            return self.second.width
        return int(projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1])

    def train(self, mode: bool = True) -> SDXLTextEncoders:  # frozen: Lightning's .train() must not flip it
        return super().train(False)

    @torch.no_grad()
    def encode(self, tokens: torch.Tensor) -> TextStates:
        first, _ = penultimate_and_pooled(self.first, tokens[:, 0])
        second, pooled = penultimate_and_pooled(self.second, tokens[:, 1])
        return TextStates(torch.cat([first, second], dim=-1), pooled)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encode(tokens).context
