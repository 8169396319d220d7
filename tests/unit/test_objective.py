import pytest
import torch
from diffusers import DDPMScheduler

from sdtrain.diffusion.objective import DiffusionConfig, DiffusionObjective


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(16, 4, 8, 8, generator=g)
    noise = torch.randn(16, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (16,), generator=g)
    return x0, noise, t


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_targets_match_diffusers_and_the_closed_form(prediction_type):
    cfg = DiffusionConfig(prediction_type=prediction_type)
    objective = DiffusionObjective(cfg)
    reference = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
    )
    x0, noise, t = _batch()
    noisy, target = objective.noisy_and_target(x0, noise, t)
    assert torch.allclose(noisy, reference.add_noise(x0, noise, t), atol=1e-6)
    # closed form from the schedule's definition: betas linear in sqrt space
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1, 1)
    assert torch.allclose(noisy.double(), abar.sqrt() * x0 + (1 - abar).sqrt() * noise, atol=1e-5)
    if prediction_type == "epsilon":
        assert torch.equal(target, noise)
    else:
        assert torch.allclose(target, reference.get_velocity(x0, noise, t), atol=1e-6)
        assert torch.allclose(target.double(), abar.sqrt() * noise - (1 - abar).sqrt() * x0, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights(prediction_type):
    objective = DiffusionObjective(DiffusionConfig(prediction_type=prediction_type, min_snr_gamma=5.0))
    t = torch.tensor([0, 100, 500, 999])
    abar = objective.scheduler.alphas_cumprod[t].double()
    snr = abar / (1 - abar)
    expect = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1 if prediction_type == "v_prediction" else snr)
    assert torch.allclose(objective.loss_weights(t).double(), expect, rtol=1e-5)
    pred, target = torch.zeros(4, 1, 2, 2), torch.ones(4, 1, 2, 2)
    assert torch.isclose(objective.loss(pred, target, t), expect.float().mean(), rtol=1e-5)


def test_plain_mse_and_offset_noise():
    objective = DiffusionObjective(DiffusionConfig())
    pred, target = torch.zeros(2, 4, 8, 8), torch.full((2, 4, 8, 8), 2.0)
    assert objective.loss(pred, target, torch.tensor([1, 2])).item() == pytest.approx(4.0)
    offset = DiffusionObjective(DiffusionConfig(offset_noise=0.5))
    x = torch.zeros(512, 4, 16, 16)
    plain = objective.sample_noise(x, torch.Generator().manual_seed(0))
    shifted = offset.sample_noise(x, torch.Generator().manual_seed(0))
    per_channel_mean = (shifted - plain).mean(dim=(2, 3))
    assert per_channel_mean.std().item() == pytest.approx(0.5, rel=0.1)


def test_zero_terminal_snr_matches_diffusers_rescale_and_samplers_start_at_pure_noise():
    """diffusion.zero_terminal_snr: the training schedule's alphas_cumprod equal those of diffusers'
    rescale_zero_terminal_snr applied to SD's betas (to 1e-6), the last is 0 (SNR 0), and every sampler's first
    timestep is 999 (trailing spacing)."""
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    from sdtrain.diffusion.sampling import SCHEDULERS, build_scheduler

    cfg = DiffusionConfig(prediction_type="v_prediction", zero_terminal_snr=True)
    ours = DiffusionObjective(cfg).scheduler.alphas_cumprod.double()
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2  # scaled_linear
    reference = torch.cumprod(1.0 - rescale_zero_terminal_snr(betas), dim=0).double()
    assert torch.allclose(ours, reference, atol=1e-6, rtol=0)
    assert ours[-1] == 0.0 and DiffusionObjective(DiffusionConfig()).scheduler.alphas_cumprod[-1] > 1e-3
    for sampler in SCHEDULERS:
        scheduler = build_scheduler(sampler, cfg.scheduler_config())
        scheduler.set_timesteps(10)
        assert int(scheduler.timesteps[0]) == 999, sampler
    with pytest.raises(ValueError, match="needs prediction_type=v_prediction"):
        DiffusionConfig(zero_terminal_snr=True)


def test_inpainting_masks_follow_the_recipe_and_are_seeded_by_key():
    import numpy as np
    import torch.nn.functional as F

    from sdtrain.prep.inpaint_masks import draw_mask, latent_mask, mask_rng

    masks = [draw_mask(64, 48, mask_rng(0, f"{i:06d}", 0)) for i in range(400)]
    full = sum(bool(m.all()) for m in masks) / len(masks)
    assert 0.18 < full < 0.32  # the recipe's 25% "mask everything"
    assert all(m.shape == (48, 64) and m.any() for m in masks)  # never empty
    partial = [m.mean() for m in masks if not m.all()]
    assert 0.05 < float(np.mean(partial)) < 0.7
    assert np.array_equal(draw_mask(64, 48, mask_rng(0, "000007", 0)), masks[7])  # same key, same mask
    assert not np.array_equal(draw_mask(64, 48, mask_rng(0, "000007", 1)), masks[7])
    torch_nearest = F.interpolate(torch.from_numpy(masks[3]).float()[None, None], size=(6, 8))[0, 0].numpy()
    assert np.array_equal(latent_mask(masks[3], 8), torch_nearest.astype(np.uint8))


def test_l1_and_pseudo_huber_losses():
    """l1 is torch's L1; huber is 2c(sqrt(r^2 + c^2) - c): MSE for errors well below c, 2c|r| - 2c^2 well above."""
    pred = torch.zeros(2, 4, 8, 8)
    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500])
    l1 = DiffusionObjective(DiffusionConfig(loss_type="l1"))
    assert torch.isclose(l1.loss(pred, target, t), torch.nn.functional.l1_loss(pred, target), rtol=1e-6)
    huber = DiffusionObjective(DiffusionConfig(loss_type="huber", huber_c=0.1))
    small, large = target * 1e-3, target.sign() * 50
    mse = torch.nn.functional.mse_loss(pred, small)
    assert torch.isclose(huber.loss(pred, small, t), mse, rtol=1e-3)
    assert torch.isclose(huber.loss(pred, large, t), torch.tensor(2 * 0.1 * 50 - 2 * 0.1**2), rtol=1e-4)
    exact = 2 * 0.1 * (torch.sqrt(target**2 + 0.01) - 0.1)
    assert torch.isclose(huber.loss(pred, target, t), exact.mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="loss_type"):
        DiffusionConfig(loss_type="mae")


def test_logit_normal_timesteps_follow_their_distribution():
    """t/T = sigmoid(N(m, s)): the empirical CDF matches Phi((logit(t/T) - m) / s) within 0.01 at every decile,
    t stays in [0, T), and uniform sampling's draws are unchanged."""
    cfg = DiffusionConfig(timestep_sampling="logit_normal", logit_mean=0.5, logit_std=0.8)
    t = DiffusionObjective(cfg).sample_timesteps(200_000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    normal = torch.distributions.Normal(0.5, 0.8)
    for edge in range(100, 1000, 100):
        expect = normal.cdf(torch.logit(torch.tensor(edge / 1000))).item()
        assert (t < edge).float().mean().item() == pytest.approx(expect, abs=0.01), edge
    uniform = DiffusionObjective(DiffusionConfig()).sample_timesteps(8, torch.device("cpu"), torch.Generator())
    assert torch.equal(uniform, torch.randint(0, 1000, (8,), generator=torch.Generator()))


def test_input_perturbation_noises_the_input_not_the_target():
    """x_t = add_noise(x0, noise + g * fresh) while the target stays `noise`; g = 0 draws nothing more."""
    x0, noise, t = _batch()
    plain = DiffusionObjective(DiffusionConfig())
    perturbed = DiffusionObjective(DiffusionConfig(input_perturbation=0.1))
    generator = torch.Generator().manual_seed(3)
    assert plain.input_noise(noise, generator) is noise
    state = generator.get_state()
    input_noise = perturbed.input_noise(noise, generator)
    fresh = torch.randn(noise.shape, generator=torch.Generator().set_state(state))
    assert torch.allclose(input_noise, noise + 0.1 * fresh)
    noisy, target = perturbed.noisy_and_target(x0, noise, t, input_noise)
    assert torch.equal(target, noise)
    assert torch.allclose(noisy, plain.scheduler.add_noise(x0, noise + 0.1 * fresh, t))
    assert not torch.allclose(noisy, plain.noisy_and_target(x0, noise, t)[0])


def test_masked_loss_weights_each_latent_pixel():
    """pixel weights scale the error before the mean: zeros drop a region, and the mean is over all pixels
    (kohya's masked loss), so a half mask halves a uniform error."""
    objective = DiffusionObjective(DiffusionConfig(masked_loss=True))
    pred, target, t = torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8), torch.tensor([1, 2])
    target[:, :, :, 4:] = 5.0  # a large error only where the mask is 0
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1.0
    assert objective.loss(pred, target, t, mask).item() == pytest.approx(0.5)
    assert objective.loss(pred, target, t).item() == pytest.approx(13.0)
