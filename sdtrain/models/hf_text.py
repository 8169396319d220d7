"""Frozen text encoders from transformers: a released SD pipeline's `text_encoder/` + `tokenizer/` (SD 1.x's
CLIP-L `CLIPTextModel`, SD 2.x's OpenCLIP-H converted to `CLIPTextModel`), or any `AutoModel` text model.

Prompts are encoded the way diffusers' StableDiffusionPipeline encodes them, so a model trained here samples the
same in plain diffusers: CLIP gets no attention mask (SD pads with the tokenizer's pad token and attends to all
77 positions) and gives `last_hidden_state`; `layer=penultimate` is diffusers' `clip_skip=1` (the hidden state
before the last layer, through the final LayerNorm). Other models (BERT-style) get the attention mask of their
padding and give `last_hidden_state`. The tokenizer is the folder's own, run by the Rust `tokenizers` backend.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from sdtrain.errors import CheckpointError
from sdtrain.models.conditioning import TextStates

# Loader workers are forked after the parent may have tokenised: keep HF tokenizers single-threaded (their
# thread pool does not survive a fork, and says so on every worker start).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tokenizer_folder(model_folder: str, tokenizer: str | None) -> str:
    """Where the tokenizer files are: `tokenizer` if given, else the model folder, else a pipeline's sibling
    `tokenizer/` next to `text_encoder/`."""
    candidates = [tokenizer] if tokenizer else [model_folder, os.path.join(os.path.dirname(model_folder), "tokenizer")]
    for folder in candidates:
        if folder and any(
            os.path.isfile(os.path.join(folder, name))
            for name in ("tokenizer.json", "vocab.json", "tokenizer_config.json", "vocab.txt")
        ):
            return folder
    raise CheckpointError(f"no tokenizer files for text encoder {model_folder} (give model.text_encoder.tokenizer=DIR)")


class HFTokenizer:
    """A transformers tokenizer as the loader's tokenizer: list of captions -> (B, context_length) int64, padded
    to the full length and truncated (SD's convention). Picklable, so loader workers get a copy."""

    def __init__(self, folder: str, context_length: int) -> None:
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, use_fast=True)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"tokenizer {folder} does not load: {str(exc).strip().splitlines()[0]}") from None
        self.context_length = context_length
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.tokenizer(
            texts, padding="max_length", max_length=self.context_length, truncation=True, return_tensors="pt"
        ).input_ids


class FrozenHFText(nn.Module):
    """tokens (B, L) -> hidden states (B, L, width) from a transformers model. Always eval, never trains."""

    def __init__(self, model: nn.Module, layer: str, pad_token_id: int) -> None:
        super().__init__()
        self.model = model
        self.layer = layer
        self.pad_token_id = pad_token_id
        self.is_clip = model.config.model_type in ("clip_text_model", "clip")
        self.requires_grad_(False)
        self.eval()

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    def train(self, mode: bool = True) -> FrozenHFText:  # frozen: Lightning's .train() must not flip it
        return super().train(False)

    def encode(self, tokens: torch.Tensor) -> TextStates:
        return TextStates(self(tokens))

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        penultimate = self.layer == "penultimate"
        mask = None if self.is_clip else (tokens != self.pad_token_id).long()
        out = self.model(input_ids=tokens, attention_mask=mask, output_hidden_states=penultimate)
        if not penultimate:
            return out.last_hidden_state
        hidden = out.hidden_states[-2]
        if not self.is_clip:
            return hidden
        # transformers 4.x nests the layers in .text_model; 5.x puts them on the model itself
        return getattr(self.model, "text_model", self.model).final_layer_norm(hidden)


def text_model_class(config: Any) -> type:
    """The transformers class a text encoder folder's config loads as: its CLIPText* architecture for CLIP
    (CLIPTextModelWithProjection stays itself), else what AutoModel maps the config to."""
    import transformers
    from transformers import AutoModel

    architectures = getattr(config, "architectures", None) or []
    if config.model_type in ("clip_text_model", "clip") or any(a.startswith("CLIPText") for a in architectures):
        return getattr(transformers, next((a for a in architectures if a.startswith("CLIPText")), "CLIPTextModel"))
    return AutoModel._model_mapping[type(config)]


def load_hf_text_model(folder: str) -> nn.Module:
    """`CLIPTextModel` / `CLIPTextModelWithProjection` / any AutoModel text model from a local folder."""
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise CheckpointError(f"text encoder folder {folder} has no config.json (expected a transformers folder)")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        return text_model_class(config).from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"text encoder {folder} does not load: {str(exc).strip().splitlines()[0]}") from None


def hf_config(model: nn.Module) -> dict[str, Any]:
    """The transformers config of a loaded model as plain data (to rebuild the architecture from a checkpoint)."""
    return {"class": type(model).__name__, **model.config.to_dict()}


def hf_from_config(config: dict[str, Any]) -> nn.Module:
    """A random-init model of the class and config recorded by `hf_config` (weights come from the checkpoint)."""
    import transformers

    values = {k: v for k, v in config.items() if k != "class"}
    cls = getattr(transformers, config["class"])
    return cls(cls.config_class.from_dict(values))
