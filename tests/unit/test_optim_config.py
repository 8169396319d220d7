import math

import pytest
import torch

from sdtrain.config import from_values
from sdtrain.errors import ConfigError
from sdtrain.training.optim import OptimConfig, build_optimizer, lr_multiplier


def test_warmup_then_cosine_to_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(0, cfg, 110) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg, 110) == pytest.approx(1.0)
    assert lr_multiplier(60, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(110, cfg, 110) == pytest.approx(0.1)
    assert lr_multiplier(50, OptimConfig(warmup_steps=10), 110) == 1.0


def test_scheduler_drives_the_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(2))
    opt, sched = build_optimizer([p], OptimConfig(lr=0.5, warmup_steps=4), max_steps=10)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5])


def test_from_values_rejects_unknown_keys_and_bad_types():
    with pytest.raises(ConfigError, match="optim.lrr: Key 'lrr' not in 'OptimConfig'"):
        from_values(OptimConfig, {"lrr": 1}, "optim")
    with pytest.raises(ConfigError, match="optim.lr: Value 'fast' of type 'str' could not be converted to Float"):
        from_values(OptimConfig, {"lr": "fast"}, "optim")
    with pytest.raises(
        ConfigError, match="optim.warmup_steps: Value '1.5' of type 'float' could not be converted to Integer"
    ):
        from_values(OptimConfig, {"warmup_steps": 1.5}, "optim")
    with pytest.raises(ConfigError, match="schedule must be constant or cosine"):
        from_values(OptimConfig, {"schedule": "linear"}, "optim")
    assert from_values(OptimConfig, {"lr": 3}, "optim").lr == 3
