"""Every bad input ends with one clear line naming the problem: no traceback, no hang."""

import tarfile

import numpy as np
import pytest
from helpers import run_train, run_train_cases

pytestmark = pytest.mark.slow


def _no_caption_dataset(folder):
    from sdtrain.prep.shard_writer import npy_bytes

    folder.mkdir()
    with tarfile.open(folder / "000000.tar", "w") as tar:
        data = npy_bytes(np.zeros((8, 8, 8), np.float16))
        info = tarfile.TarInfo("0001.moments.npy")
        info.size = len(data)
        import io

        tar.addfile(info, io.BytesIO(data))
    return folder / "000000.tar"


CASES = {
    "empty_pattern": (["data.shards="], "data.shards is empty"),
    "source_weight": (
        ["data.shards=null", "data.sources=[{shards:/x/manifest.json,weight:0}]"],
        "data.sources[0].weight must be a number > 0, got 0",
    ),
    "nonexistent": (["data.shards='/nonexistent/{000000..000003}.tar'"], "shard not found: /nonexistent/000000.tar"),
    "wrong_channels": (["model.unet.config.in_channels=8"], "4 latent channels, model expects 8"),
    "unknown_key_plus": (["+data.colour=red"], "unknown key data.colour"),
    "unknown_key": (["data.colour=red"], "Key 'colour' not in 'LatentDataConfig'"),
    "bad_type": (["optim.lr=fast"], "Value 'fast' of type 'str' could not be converted to Float"),
    "bad_nested_value": (["callbacks.ema.decay=2"], "callbacks: decay must be in [0, 1), got 2.0"),
    "missing_resume": (["resume=/nonexistent/last.ckpt"], "resume checkpoint not found: /nonexistent/last.ckpt"),
    "max_steps": (["trainer.max_steps=0"], "trainer.max_steps must be >= 1"),
    # strategies and attention: refused before any process starts
    "zero3_clip_by_value": (
        ["strategy=deepspeed_zero3", "trainer.gradient_clip_algorithm=value"],
        "DeepSpeed clips gradients by norm only",
    ),
    "zero3_fp16_on_cpu": (["strategy=deepspeed_zero3", "trainer.precision=16-mixed"], "(fp16) needs CUDA"),
    "zero3_nvme_without_path": (
        ["strategy=deepspeed_zero3_offload", "strategy.offload_device=nvme"],
        "strategy.offload_device=nvme needs strategy.nvme_path",
    ),
    "zero2_param_offload": (
        ["strategy=deepspeed_zero2", "strategy.offload_parameters=true"],
        "strategy.offload_parameters=true needs ZeRO stage 3",
    ),
    "zero3_unknown_option": (["strategy=deepspeed_zero3", "+strategy.stage4=true"], "unknown key strategy.stage4"),
    "fsdp_bad_dtype": (["strategy=fsdp", "strategy.param_dtype=fp8"], "strategy.param_dtype must be null"),
    "xformers_unavailable": (["model.attention=xformers"], "model.attention=xformers: xformers"),
    "unknown_attention": (["model.attention=flash"], "attention must be one of sdpa, xformers, math, auto"),
    # editing and objectives (issue 20)
    "inpainting_4ch_unet": (["diffusion.inpainting=true"], "diffusion.inpainting=true needs a U-Net with 9 input"),
    "inpainting_shards_without_masks": (
        ["model.unet.config.in_channels=9", "diffusion.inpainting=true"],
        "needs shards from sdtrain-encode --inpainting-masks",
    ),
    "inpainting_unet_without_flag": (["model.unet.config.in_channels=9"], "set diffusion.inpainting=true"),
    "zero_snr_epsilon": (["diffusion.zero_terminal_snr=true"], "needs prediction_type=v_prediction"),
    "masks_without_images": (["callbacks.sampling.masks=[m.png]"], "masks need init_images"),
    "init_image_missing": (["callbacks.sampling.init_images=[/nonexistent.png]"], "init image not found"),
    # objectives (issue 19)
    "unknown_loss_type": (["diffusion.loss_type=mae"], "loss_type must be one of ('l2', 'l1', 'huber')"),
    "negative_input_perturbation": (["diffusion.input_perturbation=-0.1"], "input_perturbation and offset_noise >= 0"),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory, dataset) -> dict[str, dict]:
    """Every case's exit code and stderr, from one process that runs the CLI once per case."""
    work = tmp_path_factory.mktemp("bad_inputs")
    shard = _no_caption_dataset(work / "no_caption")
    argvs = {"missing_caption": [f"data.shards={shard}", "trainer.max_steps=2"]}
    for case, (overrides, _) in CASES.items():
        args = [] if any(o.startswith("data.shards") for o in overrides) else [f"data.shards={dataset}"]
        argvs[case] = [*args, *overrides] + ([] if case == "max_steps" else ["trainer.max_steps=2"])
    return run_train_cases(work / "runs", argvs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_clear_line(results, case):
    result, message = results[case], CASES[case][1]
    assert result["returncode"] == 2, result["stderr"][-2000:]
    assert "Traceback" not in result["stderr"]
    last = result["stderr"].strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result["stderr"][-2000:]


def test_missing_caption_names_the_shard_and_sample(results):
    result = results["missing_caption"]
    assert result["returncode"] == 2 and "Traceback" not in result["stderr"]
    last = result["stderr"].strip().splitlines()[-1]
    assert last.startswith("error: shard ") and "sample '0001': missing_caption" in last


def test_attention_auto_falls_back_to_sdpa_with_a_reason(tmp_path, dataset):
    result = run_train(tmp_path / "run", f"data.shards={dataset}", "debug=fast", "model.attention=auto", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "model.attention=auto: using sdpa (xformers" in result.stdout + result.stderr
