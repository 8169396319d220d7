"""Lightning strategies from `conf/strategy/*`: auto (single device), DDP, DeepSpeed ZeRO 1/2/3 (+ offload)
(launch/zero.py) and FSDP2 (launch/fsdp.py); gloo on CPU, NCCL on GPU. Each strategy's keys and defaults are its
dataclass; the YAML files are presets over them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from lightning.pytorch.strategies import DDPStrategy, Strategy

from sdtrain.errors import ConfigError
from sdtrain.launch.fsdp import FSDPConfig, build_fsdp_strategy
from sdtrain.launch.zero import ZeroConfig, build_zero_strategy


@dataclass(kw_only=True, slots=True)
class AutoStrategyConfig:
    """strategy=auto: Lightning picks (one device: no distribution)."""


@dataclass(kw_only=True, slots=True)
class DDPConfig:
    """strategy=ddp: DistributedDataParallel; backend nccl on GPU, gloo on CPU."""

    find_unused_parameters: bool = False
    gradient_as_bucket_view: bool = True
    static_graph: bool = False
    process_group_backend: str | None = None
    timeout_s: int = 1800
    """Collective timeout: a rank waiting longer than this for the others fails the run."""


StrategyConfig = AutoStrategyConfig | DDPConfig | ZeroConfig | FSDPConfig


def build_strategy(cfg: StrategyConfig, trainer: dict[str, Any], batch_size: int) -> Strategy | str:
    """The strategy for `strategy.*`; `trainer` (trainer.* options) and the per-rank `batch_size` are checked
    against it and fill DeepSpeed's config."""
    if isinstance(cfg, AutoStrategyConfig):
        return "auto"
    if isinstance(cfg, DDPConfig):
        return DDPStrategy(
            find_unused_parameters=cfg.find_unused_parameters,
            gradient_as_bucket_view=cfg.gradient_as_bucket_view,
            static_graph=cfg.static_graph,
            process_group_backend=cfg.process_group_backend,
            timeout=timedelta(seconds=cfg.timeout_s),
        )
    if isinstance(cfg, ZeroConfig):
        return build_zero_strategy(cfg, trainer, batch_size)
    if isinstance(cfg, FSDPConfig):
        return build_fsdp_strategy(cfg)
    raise ConfigError(
        "strategy: a strategy config must start from one of the schemas (defaults: [_auto | _ddp | _deepspeed | "
        "_fsdp]), as conf/strategy/*.yaml do"
    )
