"""DeepSpeed ZeRO stages 1-3 (+ CPU offload) through Lightning, on GPUs (NCCL) and on CPU (gloo) for tests.

`conf/strategy/deepspeed_zero*.yaml` maps one to one onto DeepSpeed's `zero_optimization` JSON; precision comes
from `trainer.precision` (Lightning writes DeepSpeed's fp16/bf16 block from it), clipping from
`trainer.gradient_clip_val`, accumulation from `trainer.accumulate_grad_batches`.

Lightning refuses DeepSpeed off CUDA; `ZeroStrategy` lifts exactly that guard (and the CUDA device-index check) so
the same code path runs on CPU with gloo. Checkpoints are directories (one file per rank's shard); they are
written under a temporary name and renamed when every rank has finished, like single-file checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DeepSpeedStrategy

from sdtrain.checkpoint.sharded import TMP_SUFFIX, replace_directory
from sdtrain.errors import ConfigError


@dataclass(kw_only=True, slots=True)
class ZeroConfig:
    """strategy=deepspeed_zero1|2|3|3_offload: DeepSpeed's `zero_optimization` block, one key for one key."""

    stage: int = 2
    """1: optimizer states sharded; 2: + gradients; 3: + parameters."""
    offload_optimizer: bool = False
    """Optimizer states + step on the CPU (DeepSpeedCPUAdam)."""
    offload_parameters: bool = False
    """Stage 3 only: parameters live on the CPU between uses."""
    offload_device: str = "cpu"
    """cpu | nvme (then nvme_path)."""
    nvme_path: str | None = None
    pin_memory: bool = True
    """Pinned host buffers for offload (CUDA only)."""
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    allgather_bucket_size: int = 200_000_000
    reduce_bucket_size: int = 200_000_000
    """Elements per reduce bucket: size to the model (a small model with 2e8 preallocates ~760 MiB at ZeRO-3)."""
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    """Stage 3: parameters smaller than this stay whole on every rank."""
    stage3_max_live_parameters: int = 1_000_000_000
    process_group_backend: str | None = None
    """nccl on GPU, gloo on CPU."""
    timeout_s: int = 1800


def zero_config(cfg: ZeroConfig, micro_batch_size: int) -> dict[str, Any]:
    """DeepSpeed's config dict for `strategy.*` (already checked by `check_zero_options`)."""
    o = dataclasses.asdict(cfg)
    zero: dict[str, Any] = {
        "stage": o["stage"],
        "overlap_comm": o["overlap_comm"],
        "contiguous_gradients": o["contiguous_gradients"],
        "allgather_bucket_size": o["allgather_bucket_size"],
        "reduce_bucket_size": o["reduce_bucket_size"],
    }
    if o["stage"] == 3:
        zero["stage3_prefetch_bucket_size"] = o["stage3_prefetch_bucket_size"]
        zero["stage3_param_persistence_threshold"] = o["stage3_param_persistence_threshold"]
        zero["stage3_max_live_parameters"] = o["stage3_max_live_parameters"]
    offload = {"device": o["offload_device"], "pin_memory": o["pin_memory"] and torch.cuda.is_available()}
    if o["offload_device"] == "nvme":
        offload["nvme_path"] = o["nvme_path"]
    if o["offload_optimizer"]:
        zero["offload_optimizer"] = dict(offload)
    if o["offload_parameters"]:
        zero["offload_param"] = dict(offload)
    # The optimizer comes from configure_optimizers (DeepSpeedCPUAdam when offloading, else torch AdamW).
    # train_micro_batch_size_per_gpu only feeds DeepSpeed's throughput log (Lightning cannot read it from an
    # iterable loader); the batch itself comes from data.batch_size.
    return {
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "train_micro_batch_size_per_gpu": micro_batch_size,
    }


def check_zero_options(cfg: ZeroConfig, trainer: dict[str, Any]) -> None:
    """Every combination DeepSpeed would reject (or silently mis-run) fails here, in one line, before any work."""
    o = dataclasses.asdict(cfg)
    stage = o["stage"]
    if stage not in (1, 2, 3):
        raise ConfigError(f"strategy.stage must be 1, 2 or 3 for DeepSpeed ZeRO, got {stage!r}")
    if o["offload_parameters"] and stage != 3:
        raise ConfigError(f"strategy.offload_parameters=true needs ZeRO stage 3 (deepspeed_zero3), not {stage}")
    if o["offload_device"] not in ("cpu", "nvme"):
        raise ConfigError(f"strategy.offload_device must be cpu or nvme, got {o['offload_device']!r}")
    if o["offload_device"] == "nvme" and not o["nvme_path"]:
        raise ConfigError("strategy.offload_device=nvme needs strategy.nvme_path (a fast local disk)")
    if trainer.get("gradient_clip_algorithm") == "value":
        raise ConfigError("DeepSpeed clips gradients by norm only: drop trainer.gradient_clip_algorithm=value")
    precision = str(trainer.get("precision", "32-true"))
    on_gpu = trainer.get("accelerator") in ("gpu", "cuda") or (
        trainer.get("accelerator") in (None, "auto") and torch.cuda.is_available()
    )
    if precision.startswith("16") and not on_gpu:
        raise ConfigError(f"trainer.precision={precision} (fp16) needs CUDA with DeepSpeed; on CPU use 32-true")
    for key in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size"):
        if int(o[key]) <= 0:
            raise ConfigError(f"strategy.{key} must be > 0, got {o[key]}")


def keep_frozen_whole(model: torch.nn.Module) -> None:
    """ZeRO-3 partitions every parameter of the module, frozen ones too. The frozen text encoder and VAE are
    used through methods other than forward (`vae.decode`, open_clip's `forward_intermediates`), which ZeRO-3's
    gather hooks do not see; mark them persistent and gather them once, so they stay whole on every rank like
    under DDP (they are a small part of the memory and never change)."""
    frozen = [p for p in model.parameters() if not p.requires_grad and hasattr(p, "ds_tensor")]
    if frozen:
        for p in frozen:
            p.ds_persist = True
        frozen[0].all_gather(param_list=frozen)


class ZeroStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy, also on CPU; atomic sharded checkpoint directories."""

    strategy_name = "sdtrain_deepspeed"
    can_skip_steps = False  # the engine always steps once the loss is returned; a NaN loss stops the run instead

    @property
    def optimizer_on_cpu(self) -> bool:
        """ZeRO-Offload runs the optimizer step on the CPU: the module then builds DeepSpeedCPUAdam."""
        return "offload_optimizer" in (self.config or {}).get("zero_optimization", {})

    def setup_environment(self) -> None:
        if self.root_device.type == "cpu":
            # Training never uses DeepSpeed's shared-memory *inference* all-reduce; without this its C++ op would
            # be JIT-compiled (~100 s) on every fresh machine's first run.
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
            # Skip DeepSpeedStrategy's CUDA guard; run the parent's (DDP) environment setup.
            super(DeepSpeedStrategy, self).setup_environment()
            return
        super().setup_environment()

    def setup_distributed(self) -> None:
        if self.root_device.type != "cpu":
            super().setup_distributed()
            return
        reset_seed()  # the CUDA device-index check does not apply to CPU processes
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model: Any, optimizer: Any, lr_scheduler: Any = None) -> tuple[Any, Any]:
        import deepspeed

        params = [p for p in model.parameters() if p.requires_grad]
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.root_device.index or self.local_rank),
            config=self.config,
            model=model,
            model_parameters=params,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        keep_frozen_whole(model)
        return engine, ds_optimizer

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any = None) -> None:
        filepath = os.fspath(self.broadcast(filepath))
        # a module that reloads its frozen parts from their weights (LoRA: strict_loading off) gets small
        # checkpoints: DeepSpeed then writes the trained parameters only
        self.exclude_frozen_parameters = not self.lightning_module.strict_loading
        tmp = filepath + TMP_SUFFIX
        super().save_checkpoint(checkpoint, tmp, storage_options)
        replace_directory(self, tmp, filepath)


def build_zero_strategy(cfg: ZeroConfig, trainer: dict[str, Any], micro_batch_size: int) -> ZeroStrategy:
    check_zero_options(cfg, trainer)
    return ZeroStrategy(
        config=zero_config(cfg, micro_batch_size),
        process_group_backend=cfg.process_group_backend,
        timeout=timedelta(seconds=cfg.timeout_s),
    )
