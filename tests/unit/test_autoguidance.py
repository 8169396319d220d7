"""Autoguidance in the sampling loop (Karras et al. 2024): the guide's conditional prediction is what the model is
pushed away from, on top of classifier-free guidance."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler
from torch import nn

from sdtrain.diffusion.sampling import SamplingConfig, denoise
from sdtrain.errors import ConfigError
from sdtrain.models.conditioning import TextStates
from sdtrain.training.callbacks.build import CallbacksConfig, build_callbacks


class AffineUNet(nn.Module):
    """A stand-in U-Net whose prediction depends on the input, the timestep and the text: a * x + b * text."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a, self.b = a, b
        self.calls = 0

    def forward(self, x, t, encoder_hidden_states):  # noqa: ANN001, ANN201
        self.calls += 1
        text = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return SimpleNamespace(sample=self.a * x + self.b * text + 0.001 * float(t))


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False)


def _inputs():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    text = TextStates(torch.randn(3, 5, 16, generator=g) + 1.0)
    uncond = TextStates(torch.zeros(3, 5, 16))
    return noise, text, uncond


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_one_step_follows_the_autoguidance_formula(guidance):
    model, guide = AffineUNet(0.5, 1.0), AffineUNet(0.2, 0.3)
    noise, text, uncond = _inputs()
    weight = 2.5
    out = denoise(model, text, uncond, noise, _scheduler(), 1, guidance, guide=guide, autoguidance=weight)

    reference = _scheduler()
    reference.set_timesteps(1)
    t = reference.timesteps[0]
    x = noise * reference.init_noise_sigma
    cond = model(x, t, text.context).sample
    free = model(x, t, uncond.context).sample
    weak = guide(x, t, text.context).sample
    expected_pred = cond + (guidance - 1) * (cond - free) + (weight - 1) * (cond - weak)
    expected = reference.step(expected_pred, t, x).prev_sample
    assert torch.allclose(out, expected, atol=1e-6)
    assert guide.calls == 2  # once per step, on the conditional branch only (plus the one above)


def test_a_model_guiding_itself_changes_nothing_and_weight_one_skips_the_guide():
    model = AffineUNet(0.5, 1.0)
    noise, text, uncond = _inputs()
    plain = denoise(model, text, uncond, noise, _scheduler(), 4, 3.0)
    itself = denoise(model, text, uncond, noise, _scheduler(), 4, 3.0, guide=AffineUNet(0.5, 1.0), autoguidance=3.0)
    assert torch.allclose(plain, itself, atol=1e-6)
    unused = AffineUNet(0.2, 0.3)
    off = denoise(model, text, uncond, noise, _scheduler(), 4, 3.0, guide=unused, autoguidance=1.0)
    assert torch.equal(plain, off) and unused.calls == 0
    guided = denoise(model, text, uncond, noise, _scheduler(), 4, 3.0, guide=AffineUNet(0.2, 0.3), autoguidance=3.0)
    assert not torch.allclose(plain, guided, atol=1e-3)


def test_autoguidance_below_one_and_in_training_grids_is_refused(tmp_path):
    with pytest.raises(ValueError, match="autoguidance must be >= 1"):
        SamplingConfig(autoguidance=0.5)
    cfg = CallbacksConfig(sampling=SamplingConfig(autoguidance=2.0))
    with pytest.raises(ConfigError, match="callbacks.sampling.autoguidance needs a guide checkpoint"):
        build_callbacks(cfg, str(tmp_path), val_shards=None, latent_key="latents")
