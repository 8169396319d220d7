"""The Lightning training step against a bare PyTorch loop doing the same math on the same model and batches."""

import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from sdtrain.data.normalizer import LatentNormalizer
from sdtrain.diffusion.objective import DiffusionConfig, DiffusionObjective
from sdtrain.models.diffusers_parts import UNetConfig, VAEConfig, build_unet, build_vae
from sdtrain.models.text_encoder import TextEncoderConfig, build_text_encoder, build_tokenizer
from sdtrain.seeding import step_generator
from sdtrain.training.module import LatentDiffusionModule
from sdtrain.training.optim import OptimConfig, build_optimizer

pytestmark = pytest.mark.slow
UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [16, 32],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}


def _parts():
    torch.manual_seed(0)
    unet = build_unet(UNetConfig(config=UNET))
    text = build_text_encoder(TextEncoderConfig(width=32, heads=2, layers=2))
    return unet, text


def _batches(n=4, masked=False):
    g = torch.Generator().manual_seed(1)
    tok = build_tokenizer()
    batches = [  # as the loader gives them: with the sample keys (the throughput callbacks count images by them)
        {
            "latents": torch.randn(4, 4, 8, 8, generator=g),
            "tokens": tok(["a cat", "", "red apple", "sun"]),
            "keys": [f"{i:03d}-{j}" for j in range(4)],
        }
        for i in range(n)
    ]
    for batch in batches if masked else []:
        batch["loss_mask"] = (torch.rand(4, 1, 8, 8, generator=g) > 0.3).float()
    return batches


def tiny_module(diffusion: DiffusionConfig, optim: OptimConfig, seed: int = 0) -> LatentDiffusionModule:
    unet, text = _parts()
    return LatentDiffusionModule(
        unet=unet,
        text_encoder=text,
        vae=build_vae(VAEConfig(config={"latent_channels": 4})),
        tokenizer=build_tokenizer(),
        objective=DiffusionObjective(diffusion),
        optim=optim,
        normalizer=LatentNormalizer(),
        latent_shape=(4, 8, 8),
        seed=seed,
    )


OBJECTIVES = {
    "epsilon": dict(prediction_type="epsilon", min_snr_gamma=5.0),
    "v_prediction": dict(prediction_type="v_prediction", min_snr_gamma=5.0),
    # the robust recipe keys together, with a loss mask in every batch
    "huber-logit_normal-perturbed-masked": dict(
        loss_type="huber", timestep_sampling="logit_normal", input_perturbation=0.1, masked_loss=True
    ),
}


@pytest.mark.parametrize("objective_name", OBJECTIVES)
def test_lightning_step_equals_bare_pytorch_loop(objective_name):
    diffusion = DiffusionConfig(**OBJECTIVES[objective_name])
    batches = _batches(masked=diffusion.masked_loss)
    optim = OptimConfig(lr=1e-3, warmup_steps=2, schedule="cosine")

    # bare loop
    unet, text = _parts()
    objective = DiffusionObjective(diffusion)
    optimizer, scheduler = build_optimizer(unet.parameters(), optim, max_steps=len(batches))
    for step, batch in enumerate(batches):
        x = batch["latents"]
        generator = step_generator(123, 0, step, 0, x.device)  # documented per-step noise seeding
        noise = objective.sample_noise(x, generator)
        t = objective.sample_timesteps(x.shape[0], x.device, generator)
        noisy, target = objective.noisy_and_target(x, noise, t, objective.input_noise(noise, generator))
        with torch.no_grad():
            context = text(batch["tokens"])
        loss = objective.loss(unet(noisy, t, encoder_hidden_states=context).sample, target, t, batch.get("loss_mask"))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    bare = copy.deepcopy(unet.state_dict())

    # the sdtrain module under Lightning
    module = tiny_module(diffusion, optim, seed=123)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=len(batches),
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(batches, batch_size=None))
    for name, value in module.unet.state_dict().items():
        assert torch.allclose(value, bare[name], atol=1e-6, rtol=1e-5), name
    assert any(not torch.equal(bare[n], v) for n, v in _parts()[0].state_dict().items())  # it did train


def test_mfu_counts_each_aspect_bucket_at_its_own_shape():
    """Batches of another bucket cost what their shape costs: FLOPs are counted per latent shape (once each)."""
    from sdtrain.training.callbacks.throughput import ThroughputCallback

    module = tiny_module(DiffusionConfig(), OptimConfig())
    callback = ThroughputCallback()
    square, wide = callback.flops_at(module, (4, 8, 8)), callback.flops_at(module, (4, 8, 16))
    assert square == module.training_flops_per_image() and wide == module.training_flops_per_image((4, 8, 16))
    assert 1.5 * square < wide < 2.5 * square  # convolutions linear in pixels, attention a little more
    assert callback.flops_at(module, (4, 8, 16)) == wide and len(callback._flops_by_shape) == 2
