"""Framework overhead: the sdtrain training step (Lightning, EMA, throughput callback, CSV logging every 10 steps)
vs a bare PyTorch loop doing the same math (same model, batch, noise seeding, AdamW, clipping, the loss read
every 10 steps) on CPU.

    .venv/bin/python bench/overhead.py [--steps 40] [--rounds 3]

Both run in one process, alternating rounds, on in-memory batches (the loader has its own benchmark). Reports
median seconds per step and the ratio sdtrain / bare (goal <= 1.03).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(__file__))
from _util import median, table  # noqa: E402

from sdtrain.data.normalizer import LatentNormalizer  # noqa: E402
from sdtrain.diffusion.objective import DiffusionConfig, DiffusionObjective  # noqa: E402
from sdtrain.models.diffusers_parts import UNetConfig, VAEConfig, build_unet, build_vae  # noqa: E402
from sdtrain.models.ema import EMAWeights, ema_decay  # noqa: E402
from sdtrain.models.text_encoder import TextEncoderConfig, build_text_encoder, build_tokenizer  # noqa: E402
from sdtrain.seeding import step_generator  # noqa: E402
from sdtrain.training.callbacks.ema import (
    EMACallback,  # noqa: E402
    EMAConfig,
)
from sdtrain.training.callbacks.throughput import ThroughputCallback  # noqa: E402
from sdtrain.training.module import LatentDiffusionModule  # noqa: E402
from sdtrain.training.optim import OptimConfig, build_optimizer  # noqa: E402

# the README demo's U-Net (12.6M parameters) on 8x8x4 latents, batch 64
UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=[64, 128, 256],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=128,
    attention_head_dim=8,
    norm_num_groups=8,
)
OPTIM = OptimConfig(lr=1e-4, warmup_steps=10)
DIFFUSION = DiffusionConfig(prediction_type="v_prediction", min_snr_gamma=5.0)


def parts():
    torch.manual_seed(0)
    return build_unet(UNetConfig(config=UNET)), build_text_encoder(TextEncoderConfig(width=128, heads=4, layers=3))


LOG_EVERY = 10  # logging steps: where both loops read the loss (the only host syncs of a step)


def batches(n):
    g = torch.Generator().manual_seed(1)
    tokens = build_tokenizer()(["grinning face"] * 64)
    return [{"latents": torch.randn(64, 4, 8, 8, generator=g), "tokens": tokens} for _ in range(n)]


def bare_loop(data):
    unet, text = parts()
    objective = DiffusionObjective(DIFFUSION)
    optimizer, scheduler = build_optimizer(unet.parameters(), OPTIM, max_steps=len(data))
    ema = EMAWeights(unet)
    times, last = [], time.perf_counter()
    for step, batch in enumerate(data):
        x = batch["latents"]
        generator = step_generator(0, 0, step, 0, x.device)
        noise = objective.sample_noise(x, generator)
        t = objective.sample_timesteps(x.shape[0], x.device, generator)
        noisy, target = objective.noisy_and_target(x, noise, t)
        with torch.no_grad():
            context = text(batch["tokens"])
        loss = objective.loss(unet(noisy, t, encoder_hidden_states=context).sample, target, t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        ema.update(ema_decay(step, 0.9999, 10))
        if step % LOG_EVERY == 0:
            loss.item()  # the framework reads the loss on logging steps only (no sync between them); so does this
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times


class StepClock(L.Callback):
    def __init__(self):
        self.times, self.last = [], None

    def on_train_batch_end(self, *args):
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now


def sdtrain_loop(data, log_dir):
    unet, text = parts()
    module = LatentDiffusionModule(
        unet=unet,
        text_encoder=text,
        vae=build_vae(VAEConfig(config={"latent_channels": 4})),
        tokenizer=build_tokenizer(),
        objective=DiffusionObjective(DIFFUSION),
        optim=OPTIM,
        normalizer=LatentNormalizer(),
        latent_shape=(4, 8, 8),
    )
    clock = StepClock()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=len(data),
        gradient_clip_val=1.0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=LOG_EVERY,
        default_root_dir=log_dir,
        callbacks=[EMACallback(EMAConfig(decay=0.9999)), ThroughputCallback(), clock],
        logger=L.pytorch.loggers.CSVLogger(log_dir),
    )
    trainer.fit(module, DataLoader(data, batch_size=None))
    return clock.times


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    data = batches(args.steps + 5)
    bare, framework = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):  # alternate, so drift in machine speed hits both
            bare += bare_loop(data)[5:]
            framework += sdtrain_loop(data, tmp)[5:]
    b, f = median(bare), median(framework)
    print(
        table(
            ["loop", "median s/step", "steps timed", "ratio vs bare"],
            [["bare PyTorch", b, len(bare), 1.0], ["sdtrain (Lightning + EMA + logging)", f, len(framework), f / b]],
        )
    )


if __name__ == "__main__":
    main()
