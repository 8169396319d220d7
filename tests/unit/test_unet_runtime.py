"""model.attention / gradient_checkpointing / channels_last / compile switches reach the U-Net."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from sdtrain.errors import ConfigError
from sdtrain.models.diffusers_parts import UNetConfig, build_unet
from sdtrain.models.unet_runtime import UNetRuntimeConfig, apply_runtime, xformers_problem

UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=[16, 32],
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)


def _unet(**runtime):
    torch.manual_seed(0)
    return apply_runtime(build_unet(UNetConfig(config=UNET)), UNetRuntimeConfig(**runtime))


def _output(unet):
    gen = torch.Generator().manual_seed(1)
    x, c = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 7, 32, generator=gen)
    return unet(x, torch.tensor([10, 900]), encoder_hidden_states=c).sample


def test_sdpa_and_math_attention_agree():
    sdpa, math = _unet(attention="sdpa"), _unet(attention="math")
    assert {type(p) for p in sdpa.attn_processors.values()} == {AttnProcessor2_0}
    assert {type(p) for p in math.attn_processors.values()} == {AttnProcessor}
    torch.testing.assert_close(_output(sdpa), _output(math), atol=1e-5, rtol=1e-5)


def test_switches_reach_the_unet():
    unet = _unet(gradient_checkpointing=True, channels_last=True, compile=True)
    assert unet.is_gradient_checkpointing
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert unet._compiled_call_impl is not None  # nn.Module.compile: compiled on first call, names unchanged
    assert "conv_in.weight" in unet.state_dict()
    assert not _unet()._compiled_call_impl


def test_compile_is_static_per_shape_and_modes_are_checked(monkeypatch):
    from torch._dynamo import config as dynamo

    asked = {}
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: asked.update(kwargs))
    _unet(compile=True, compile_mode="reduce-overhead")
    assert asked == {"mode": "reduce-overhead", "dynamic": False}  # one graph per bucket shape, not a dynamic one
    assert dynamo.recompile_limit >= 64  # enough graphs for every bucket (torch's default is 8)
    with pytest.raises(ValueError, match="compile_mode must be one of null, default, reduce-overhead"):
        UNetRuntimeConfig(compile_mode="fastest")


@pytest.mark.skipif(xformers_problem() is None, reason="xformers runs here")
def test_xformers_where_it_cannot_run():
    with pytest.raises(ConfigError, match="model.attention=xformers: .*use model.attention=sdpa or auto"):
        _unet(attention="xformers")
    assert {type(p) for p in _unet(attention="auto").attn_processors.values()} == {AttnProcessor2_0}


@pytest.mark.parametrize(
    "runtime",
    [
        {"gradient_checkpointing": True},
        {"channels_last": True},
        {"gradient_checkpointing": True, "channels_last": True},
    ],
)
def test_memory_and_layout_switches_keep_the_loss_and_gradients(runtime):
    """The GPU-throughput switches change how the step runs, not what it computes: same loss to 1e-6 and same
    gradients to 1e-5 (relative to the largest) as the plain U-Net, on CPU."""

    def loss_and_grads(unet):
        unet.train()
        loss = _output(unet).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}

    plain_loss, plain = loss_and_grads(_unet())
    loss, grads = loss_and_grads(_unet(**runtime))
    assert torch.allclose(loss, plain_loss, rtol=0, atol=1e-6), (loss - plain_loss).abs()
    assert grads.keys() == plain.keys()
    scale = max(g.abs().max() for g in plain.values())
    worst = max((grads[n] - plain[n]).abs().max() for n in plain) / scale
    assert worst <= 1e-5, worst
