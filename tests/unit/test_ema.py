import copy

import pytest
import torch
from torch import nn

from sdtrain.models.ema import EMAWeights, ema_decay
from sdtrain.training.callbacks.ema import EMAConfig


def test_decay_warmup_schedule():
    assert ema_decay(0, 0.999, 10) == pytest.approx(0.1)
    assert ema_decay(10, 0.999, 10) == pytest.approx(11 / 20)
    assert ema_decay(10_000, 0.999, 10) == 0.999
    assert ema_decay(0, 0.9, 0) == 0.9


def test_ema_matches_a_hand_computed_average():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = EMAWeights(model)
    expect = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    for step in range(25):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        d = ema_decay(step, 0.95, 10)
        ema.update(d)
        for n, p in model.named_parameters():
            expect[n] = d * expect[n] + (1 - d) * p.detach().double()
    for name, shadow in zip(ema.names, ema.shadow, strict=True):
        assert torch.allclose(shadow.double(), expect[name], atol=1e-6)
    assert ema.num_updates == 25


def test_swap_loads_ema_and_restores_trained_weights():
    model = nn.Linear(2, 2)
    ema = EMAWeights(model)
    trained = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        ema.shadow[0].fill_(7.0)
    with ema.swapped_into():
        assert torch.all(model.weight == 7.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k])


def test_state_dict_round_trip_and_mismatch():
    model = nn.Linear(2, 2)
    ema = EMAWeights(model)
    ema.update(0.5)
    other = EMAWeights(nn.Linear(2, 2))
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1 and all(torch.equal(a, b) for a, b in zip(ema.shadow, other.shadow, strict=True))
    with pytest.raises(ValueError, match="does not match"):
        EMAWeights(nn.Linear(2, 3, bias=False)).load_state_dict({"shadow": {"x": torch.zeros(1)}, "num_updates": 0})


def test_config_validation():
    with pytest.raises(ValueError):
        EMAConfig(decay=1.5)
    with pytest.raises(ValueError):
        EMAConfig(update_every=0)
