"""Per-rank training-state bytes and step time: DDP vs DeepSpeed ZeRO-1/2/3 on 2 ranks, side by side in one run.

    .venv/bin/python bench/memory.py

Each strategy runs in 2 fresh processes (gloo on CPU): a U-Net of 35M parameters, AdamW, fp32, 5 training steps
of batch 2 at 32x32 latents, through the DeepSpeed config sdtrain builds (`launch/zero.zero_config`, buckets of
1e7 elements). At the last step, after backward, each rank counts the bytes of every live tensor storage it holds
(each storage once):
- parameters: the module's parameter storage on this rank (ZeRO-3: its partition) plus fp32 master copies
  (ZeRO keeps one of the partition it updates);
- optimizer state: AdamW's exp_avg/exp_avg_sq on this rank;
- gradients + buffers: everything else that training added (gradients or gradient partitions, reduce buckets).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from _util import table  # noqa: E402

UNET = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=[64, 128, 256, 256],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=256,
    attention_head_dim=8,
    norm_num_groups=16,
)
STEPS, BATCH, WORLD = 5, 2, 2
# Bucket sizes in elements, sized to this model (conf/strategy's 2e8 suits an 865M SD U-Net): ZeRO-3 allocates
# its reduce bucket whole, so at 2e8 fp32 elements it alone would be 763 MiB here.
BUCKET = 10_000_000
STRATEGIES = ["ddp", "zero1", "zero2", "zero3"]


def storages(tensors) -> dict[int, int]:
    """{storage address: bytes} of the given tensors (a storage shared by views counts once)."""
    out = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.untyped_storage().nbytes():
            out[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return out


def live_storages() -> dict[int, int]:
    gc.collect()
    return storages(o for o in gc.get_objects() if isinstance(o, torch.Tensor))


def worker(rank: int, strategy: str, port: int, out_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    os.environ.update(LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from diffusers import UNet2DConditionModel

    from sdtrain.launch.zero import ZeroConfig, zero_config

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(BATCH, 4, 32, 32, generator=gen)
    t = torch.randint(0, 1000, (BATCH,), generator=gen)
    context = torch.randn(BATCH, 77, 256, generator=gen)
    base = live_storages()
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNET)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    if strategy == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(unet, gradient_as_bucket_view=True)
        inner = optimizer

        def backward(loss):
            loss.backward()

        def step():
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        import deepspeed
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # as launch/zero.py: inference-only op
        deepspeed.init_distributed("gloo", dist_init_required=False)
        buckets = {k: BUCKET for k in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size")}
        config = zero_config(ZeroConfig(stage=int(strategy[-1]), **buckets), BATCH)
        config.update(gradient_accumulation_steps=1, gradient_clipping=1.0)
        model, _, _, _ = deepspeed.initialize(model=unet, optimizer=optimizer, config=config)
        inner = model.optimizer.optimizer  # the torch AdamW inside ZeRO's wrapper

        def backward(loss):
            model.backward(loss)

        def step():
            model.step()

    times, counted = [], {}
    for i in range(STEPS):
        start = time.perf_counter()
        loss = model(x, t, encoder_hidden_states=context).sample.square().mean()
        backward(loss)
        if i == STEPS - 1:
            counted = count(unet, model, inner, base)
        step()
        times.append(time.perf_counter() - start)
    result = {**counted, "step_s": statistics.median(times[1:])}
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, result)
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


def count(unet, model, inner, base) -> dict[str, int]:
    live = {k: v for k, v in live_storages().items() if k not in base}
    params = [getattr(p, "ds_tensor", p) for p in unet.parameters()]
    params += [p.data for p in unet.parameters() if p.data.numel()]  # ZeRO-3: persistent (small) params stay whole
    zero = getattr(model, "optimizer", None)
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        params += list(getattr(zero, name, None) or [])
    param_bytes = storages(params)
    optim_bytes = storages(v for state in inner.state.values() for v in state.values())
    optim_bytes = {k: v for k, v in optim_bytes.items() if k not in param_bytes}
    rest = {k: v for k, v in live.items() if k not in param_bytes and k not in optim_bytes}
    n = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in unet.parameters())
    return {
        "numel": n,
        "params": sum(param_bytes.values()),
        "optimizer": sum(optim_bytes.values()),
        "grads_buffers": sum(rest.values()),
    }


def main() -> None:
    results = {}
    for i, strategy in enumerate(STRATEGIES):
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            mp.spawn(worker, args=(strategy, 29600 + i, out.name), nprocs=WORLD, join=True)
            with open(out.name) as f:
                results[strategy] = json.load(f)
    ddp = results["ddp"][0]
    mib = 2**20
    rows = []
    for strategy in STRATEGIES:
        r = results[strategy][0]  # rank 0 (rank 1 holds the same amounts within one partition's padding)
        total = r["params"] + r["optimizer"] + r["grads_buffers"]
        ddp_total = ddp["params"] + ddp["optimizer"] + ddp["grads_buffers"]
        rows.append(
            [
                strategy,
                r["params"] / mib,
                r["optimizer"] / mib,
                r["optimizer"] / ddp["optimizer"],
                r["grads_buffers"] / mib,
                r["grads_buffers"] / ddp["grads_buffers"],
                total / mib,
                total / ddp_total,
                r["step_s"],
                r["step_s"] / ddp["step_s"],
            ]
        )
    print(f"U-Net {ddp['numel'] / 1e6:.1f}M parameters, fp32, AdamW, 2 ranks (gloo, CPU), per-rank MiB at rank 0")
    headers = ["strategy", "params", "optim", "optim/ddp", "grads+buf", "grads/ddp", "total", "total/ddp"]
    print(table([*headers, "step s", "time/ddp"], rows))


if __name__ == "__main__":
    main()
