"""The start of a run as a person reads it: known third-party noise silenced where it comes from (one filter per
message, each saying why it is harmless), and a short header of what is being trained, on what, from where."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

log = logging.getLogger("sdtrain.start")


def _drop(logger: str, text: str) -> None:
    logging.getLogger(logger).addFilter(lambda record: text not in record.getMessage())


def quiet_known_noise() -> None:
    """Filters for messages every run printed that say nothing about it (idempotent enough: filters only add)."""
    # Lightning 2.6's own pytree helper on torch >= 2.10: a deprecation inside Lightning, nothing to act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # The frozen text encoder and VAE are in eval mode by design (they never train).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # Shard members are read into read-only buffers; sdtrain never writes into them (posterior_sample reads them
    # into fresh tensors), so torch's non-writable-array warning does not apply.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    # An advertisement Lightning prints when no LitLogger is configured.
    _drop("lightning.pytorch.utilities.rank_zero", "litlogger")
    try:  # per-file "Loading weights" bars of transformers' loader: one bar per text encoder load
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def millions(module: Any) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:,.1f}M"


def trainable_line(unet: Any) -> str:
    """ "860.0M trainable", or for LoRA "860.0M frozen + 3.2M LoRA adapters trainable"."""
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    total = sum(p.numel() for p in unet.parameters())
    if trainable == total:
        return f"{millions(unet)} trainable"
    return f"{(total - trainable) / 1e6:,.1f}M frozen + {trainable / 1e6:,.2f}M LoRA adapters trainable"


def unet_lines(module: Any, shard_set: Any, data: Any, mixture: Any = None) -> list[str]:
    """What `sdtrain-train` trains and on what (with data.sources, each source's share of an epoch)."""
    unet = module.unet
    text = module.text_encoder
    text_name = type(getattr(text, "model", getattr(text, "tower", text))).__name__
    return [
        f"model: U-Net {trainable_line(unet)} ({unet.config.cross_attention_dim}-d cross-attention), "
        f"text encoder {text_name} {millions(text)} frozen, VAE {millions(module.vae)} frozen",
        f"data: {len(shard_set.shards)} shards, {shard_set.total_samples:,} samples, latents "
        f"{tuple(module.latent_shape)}, batch {data.batch_size}/rank, {data.num_workers} workers/rank"
        + (", pre-encoded text" if data.text_embeddings else ""),
        *([sources_line(mixture)] if mixture is not None else []),
    ]


def sources_line(mixture: Any) -> str:
    shares = zip(mixture.names, mixture.weights, mixture.targets(), mixture.sample_counts, strict=True)
    return "sources: " + ", ".join(f"{n} {w:.0%} ({t:,} samples/epoch of {sum(c):,})" for n, w, t, c in shares)


def start_header(*, what: list[str], trainer: Any, strategy: str, ckpt_path: str | None, run_dir: str) -> list[str]:
    """The lines rank 0 logs before the first step: `what` (model and data lines), then how and where."""
    lines = [
        *what,
        f"run: {trainer.world_size} rank(s) x {strategy} x {trainer.precision}, {trainer.max_steps} steps",
        f"resume: {ckpt_path}" if ckpt_path else "resume: none (a new run)",
        f"folder: {os.path.abspath(run_dir)}",
    ]
    if trainer.is_global_zero:
        for line in lines:
            log.info(line)
    return lines
