"""Lightning strategies from `conf/strategy/*`: auto (single device), DDP, DeepSpeed ZeRO 1/2/3 (+ offload)
(launch/zero.py) and FSDP2 (launch/fsdp.py); gloo on CPU, NCCL on GPU."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from lightning.pytorch.strategies import DDPStrategy, Strategy

from sdtrain.errors import ConfigError
from sdtrain.launch.fsdp import build_fsdp_strategy
from sdtrain.launch.zero import build_zero_strategy

DDP_OPTIONS = {
    "find_unused_parameters",
    "static_graph",
    "gradient_as_bucket_view",
    "process_group_backend",
    "timeout_s",
}


def build_strategy(cfg: dict[str, Any], trainer: dict[str, Any], batch_size: int) -> Strategy | str:
    """The strategy for `strategy.*`; `trainer` (trainer.* options) and the per-rank `batch_size` are checked
    against it and fill DeepSpeed's config."""
    options = dict(cfg)
    name = options.pop("name", "auto")
    if name == "auto":
        if options:
            raise ConfigError(f"strategy=auto takes no options, got {sorted(options)}")
        return "auto"
    if name == "ddp":
        unknown = sorted(set(options) - DDP_OPTIONS)
        if unknown:
            raise ConfigError(f"unknown key strategy.{unknown[0]} (known: {', '.join(sorted(DDP_OPTIONS))})")
        timeout_s = options.pop("timeout_s", None)
        if timeout_s is not None:
            options["timeout"] = timedelta(seconds=timeout_s)
        return DDPStrategy(**options)
    if name == "deepspeed":
        return build_zero_strategy(options, trainer, batch_size)
    if name == "fsdp":
        return build_fsdp_strategy(options)
    raise ConfigError(f"strategy.name={name!r} is not known (auto, ddp, deepspeed, fsdp)")
