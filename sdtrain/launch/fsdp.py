"""FSDP2 (`torch.distributed.fsdp.fully_shard`) through Lightning's ModelParallelStrategy.

Every rank is one data-parallel shard (no tensor parallelism): each U-Net down/mid/up block is its own FSDP unit
(gathered for its forward, resharded after), then the U-Net root. The frozen text encoder and VAE stay whole on
every rank. Checkpoints are torch.distributed.checkpoint directories (one file per rank + `meta.pt`), written
under a temporary name and renamed once complete.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from unittest import mock

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from sdtrain.checkpoint.sharded import TMP_SUFFIX, replace_directory
from sdtrain.errors import ConfigError


@dataclass(kw_only=True, slots=True)
class FSDPConfig:
    """strategy=fsdp: FSDP2 `fully_shard` over every rank, per U-Net block."""

    reshard_after_forward: bool = True
    """Free each block's gathered parameters after its forward (ZeRO-3 like); false = ZeRO-2 like."""
    param_dtype: str | None = None
    """null | bfloat16 | float16 | float32: dtype of the gathered parameters for compute."""
    reduce_dtype: str | None = None
    """dtype of the gradient reduce-scatter (null = param_dtype)."""
    process_group_backend: str | None = None
    timeout_s: int = 1800


DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FSDP2Strategy(ModelParallelStrategy):
    """ModelParallelStrategy with a 1-D data-parallel mesh over all ranks and the U-Net sharding plan."""

    strategy_name = "sdtrain_fsdp2"

    def __init__(self, *, reshard_after_forward: bool, param_dtype: Any, reduce_dtype: Any, **kwargs: Any) -> None:
        super().__init__(save_distributed_checkpoint=True, **kwargs)
        self.reshard_after_forward = reshard_after_forward
        self.param_dtype = DTYPES[param_dtype]
        self.reduce_dtype = DTYPES[reduce_dtype]

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def parallelize_unet(self, unet: nn.Module) -> None:
        """Called from the LightningModule's configure_model: shard every U-Net block, then the root."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = self.device_mesh["data_parallel"]
        policy = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype)
        blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
        for block in blocks:
            if block is not None:
                fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=self.reshard_after_forward)
        fully_shard(unet, mesh=mesh, mp_policy=policy, reshard_after_forward=self.reshard_after_forward)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        filepath = os.fspath(self.broadcast(filepath))
        tmp = filepath + TMP_SUFFIX
        super().save_checkpoint(checkpoint, tmp, storage_options)
        replace_directory(self, tmp, filepath)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """A module that reloads its frozen parts from their weights (LoRA: strict_loading off) saved only what
        it trains: torch DCP is then asked for the tensors the checkpoint has (its default planner fails on
        the first missing one)."""
        if self.lightning_module.strict_loading:
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        from lightning.fabric.strategies import model_parallel
        from torch.distributed.checkpoint import DefaultLoadPlanner, load

        def partial_load(state: dict[str, Any], path: Any) -> None:
            load(state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True))

        with mock.patch.object(model_parallel, "_distributed_checkpoint_load", partial_load):
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)


def build_fsdp_strategy(cfg: FSDPConfig) -> FSDP2Strategy:
    for key in ("param_dtype", "reduce_dtype"):
        if getattr(cfg, key) not in DTYPES:
            raise ConfigError(f"strategy.{key} must be null, float32, bfloat16 or float16, got {getattr(cfg, key)!r}")
    return FSDP2Strategy(
        reshard_after_forward=cfg.reshard_after_forward,
        param_dtype=cfg.param_dtype,
        reduce_dtype=cfg.reduce_dtype,
        process_group_backend=cfg.process_group_backend,
        timeout=timedelta(seconds=cfg.timeout_s),
    )
