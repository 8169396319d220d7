"""LoRA fine-tuning of the U-Net through peft (`model.lora.rank=R`): low-rank adapters beside the attention
projections, the base weights frozen. Only the adapters train, are EMA'd and go into checkpoints; the base comes
back from `model.pretrained` (recorded in the checkpoint's spec). Exports are diffusers' LoRA format
(`pipe.load_lora_weights(DIR)`) or, with `--merge`, a full model with the adapters folded in.

Adapters are added with diffusers' own `UNet2DConditionModel.add_adapter(peft.LoraConfig)` (what diffusers'
LoRA training scripts do), so names and the saved format are diffusers'.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from sdtrain.errors import ConfigError

DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # every attention projection (diffusers' scripts' choice)


@dataclass(kw_only=True, slots=True)
class LoraConfig:
    rank: int = 0
    """0 = full fine-tuning; R > 0 = LoRA adapters of rank R on the U-Net, everything else frozen."""
    alpha: float | None = None
    """Scale numerator: the update is (alpha / rank) B A; None = rank (scale 1, diffusers' scripts' default)."""
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """U-Net module names (or name suffixes) that get adapters."""

    def __post_init__(self) -> None:
        if self.rank < 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.rank must be >= 0 and lora.dropout in [0, 1), got {self.rank}, {self.dropout}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0


def apply_lora(unet: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Freeze `unet` and add the adapters (trainable, initialised as diffusers' scripts do: B = 0, so the model
    starts exactly at its base). A target that matches no module is a ConfigError naming it."""
    from peft import LoraConfig as PeftLoraConfig

    names = [name for name, _ in unet.named_modules()]
    missing = [t for t in cfg.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ConfigError(
            f"model.lora.target_modules: {missing[0]!r} is no module of this U-Net (e.g. {', '.join(DEFAULT_TARGETS)},"
            " proj_in, proj_out, ff.net.0.proj, conv1)"
        )
    unet.requires_grad_(False)
    config = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
        lora_dropout=cfg.dropout,
        init_lora_weights="gaussian",
        target_modules=list(cfg.target_modules),
    )
    unet.add_adapter(config)
    return unet


def adapter_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors in diffusers' LoRA format (what `save_lora_weights(unet_lora_layers=...)` takes)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def merged(unet: nn.Module) -> nn.Module:
    """A plain U-Net (no adapters) whose weights are base + (alpha / rank) B A."""
    out = copy.deepcopy(unet)
    out.fuse_lora()
    out.unload_lora()
    return out


def trainable_names(module: nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}
