"""Fused AdamW wherever torch has the kernel for the parameters' device (CPU and CUDA today): chosen by default,
same updates as the unfused implementation within float rounding, and optim.fused=false turns it off."""

import torch

from sdtrain.training.optim import OptimConfig, build_optimizer, fused_supported


def _train(cfg: OptimConfig, steps: int = 5) -> tuple[torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    optimizer, scheduler = build_optimizer(model.parameters(), cfg, max_steps=steps)
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss = model(torch.randn(6, 8, generator=data)).square().mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer, torch.cat([p.detach().flatten() for p in model.parameters()])


def test_fused_by_default_where_torch_has_it_and_equal_to_unfused():
    assert fused_supported([torch.nn.Parameter(torch.zeros(2))])  # CPU has the kernel in this torch
    assert not fused_supported([])  # nothing to train: the plain optimizer (which then has nothing to do)
    fused, a = _train(OptimConfig(lr=1e-2, warmup_steps=1))
    plain, b = _train(OptimConfig(lr=1e-2, warmup_steps=1, fused=False))
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    assert not torch.equal(a, _train(OptimConfig(lr=1e-2, warmup_steps=1), steps=1)[1])  # it trains
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
