import pytest
import torch
from torch import nn

from sdtrain.launch.plan import main as plan_main
from sdtrain.launch.plan import per_rank_memory
from sdtrain.training.metrics import count_flops, mfu, peak_flops, unet_training_flops


def test_flop_count_matches_a_hand_count():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 2, bias=False))
    x = torch.randn(1, 4)
    # forward: 2*4*8 + 2*8*2 = 96; backward: layer 2 grad-input 32 + grad-weight 32, layer 1 grad-weight 64
    assert count_flops(lambda: mlp(x), backward=False) == 96
    assert count_flops(lambda: mlp(x)) == 96 + 32 + 32 + 64
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    assert count_flops(lambda: conv(torch.randn(1, 3, 8, 8)), backward=False) == 2 * 4 * 8 * 8 * 3 * 3 * 3


def test_mfu_formula_and_peak_table():
    assert mfu(2.0e12, 100.0, 1.0e15) == pytest.approx(0.2)
    assert mfu(2.0e12, 100.0, None) is None
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16-mixed") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "16-mixed") == 312e12
    assert peak_flops("cpu", "32-true") is None
    assert peak_flops("cpu", "32-true", override=1e12) == 1e12


def test_unet_flops_scale_with_latent_area():
    from diffusers import UNet2DConditionModel

    config = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=[16, 32],
        down_block_types=["DownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "UpBlock2D"],
        cross_attention_dim=32,
        norm_num_groups=8,
    )
    small = unet_training_flops(lambda: UNet2DConditionModel(**config), (4, 8, 8), 32)
    large = unet_training_flops(lambda: UNet2DConditionModel(**config), (4, 16, 16), 32)
    assert large / small == pytest.approx(4.0, rel=0.05)  # convolutions only: linear in pixels


def test_memory_accounting_follows_zero_stages():
    p, n = 1_000_000, 8
    ddp = per_rank_memory(p, 0, 0, sharding="ddp", ranks=n, half=True)
    z2 = per_rank_memory(p, 0, 0, sharding="zero2", ranks=n, half=True)
    z3 = per_rank_memory(p, 0, 0, sharding="zero3", ranks=n, half=True)
    assert (ddp.weights, ddp.grads, ddp.optimizer) == (4 * p, 4 * p, 8 * p)
    assert (z2.weights, z2.grads, z2.optimizer) == (2 * p, 2 * p / n, 12 * p / n)
    assert (z3.weights, z3.grads, z3.optimizer, z3.ema) == (2 * p / n, 2 * p / n, 12 * p / n, 4 * p / n)


def test_planner_counts_a_pipeline_folder_from_its_configs(tmp_path, capsys):
    from diffusers import StableDiffusionPipeline
    from pipelines import save_tiny_pipeline

    folder = save_tiny_pipeline(tmp_path / "released", "sd2")
    assert plan_main(["--", f"model.pretrained={folder}"]) == 0
    # by label: saving the folder imported DeepSpeed (through accelerate), which prints to stdout
    rows = {line.split("  ")[0]: line for line in capsys.readouterr().out.splitlines()}
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    count = lambda *parts: sum(p.numel() for part in parts for p in part.parameters())  # noqa: E731
    assert f"{count(pipe.unet) / 1e6:,.1f} M" in rows["U-Net parameters (trainable)"]  # the folder's, not the preset's
    assert f"{count(pipe.text_encoder, pipe.vae) / 1e6:,.1f} M" in rows["frozen parameters (text encoder + VAE)"]


def test_planner_cli_for_sd2(capsys):
    assert plan_main(["--gpu", "H100", "--gpus", "8", "--sharding", "zero2", "--", "model=sd2", "trainer=gpu"]) == 0
    out = capsys.readouterr().out
    assert "865.9 M" in out and "TFLOP" in out and "GPU-hours" in out
    assert plan_main(["--gpu", "Z9000", "--", "model=tiny"]) == 2
    assert "not in the peak-FLOPs table" in capsys.readouterr().err
