"""The config tree: every preset composes into its dataclass, no YAML repeats a dataclass default (one source per
default), and a user's own config folder joins the search path."""

import dataclasses
import subprocess
import sys

import pytest
import yaml
from helpers import REPO
from omegaconf import OmegaConf

from sdtrain.config import config_error_line, to_object
from sdtrain.launch.config import CONFIG_ERRORS, SCHEMAS, compose_config

PRESETS = (
    [("model", name) for name in ("tiny", "sd15", "sd2", "sdxl")]
    + [
        ("strategy", name)
        for name in (
            "auto",
            "ddp",
            "deepspeed_zero1",
            "deepspeed_zero2",
            "deepspeed_zero3",
            "deepspeed_zero3_offload",
            "fsdp",
        )
    ]
    + [("diffusion", "v_prediction")]
)


# the VAE job's (conf/train_vae.yaml): the same strategy presets, its own data/model/loss/callbacks
VAE_PRESETS = [
    ("model", "vae_tiny"),
    ("model", "vae_sd"),
    ("loss", "autoencoder_gan"),
    ("experiment", "vae_demo"),
    ("experiment", "vae_demo_decoder"),
]
VAE_PRESETS += [("strategy", name) for name in ("ddp", "deepspeed_zero2")]
GROUPS = {
    "train": ("data", "model", "diffusion", "optim", "callbacks", "strategy"),
    "train_vae": ("data", "model", "loss", "optim", "callbacks", "strategy"),
}


@pytest.mark.parametrize(
    ("config", "group", "name"), [("train", *p) for p in PRESETS] + [("train_vae", *p) for p in VAE_PRESETS]
)
def test_every_preset_composes_into_its_dataclass(config, group, name):
    cfg = compose_config([f"{group}={name}"], config_name=config)
    for key in GROUPS[config]:
        assert dataclasses.is_dataclass(to_object(cfg[key], key))
    assert set(GROUPS["train"]) | set(GROUPS["train_vae"]) == set(SCHEMAS)


def _repeats(values: dict, schema: object, where: str) -> list[str]:
    found = []
    for key, value in values.items():
        if key == "defaults" or not hasattr(schema, key):
            continue
        default = getattr(schema, key)
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            found += _repeats(value, default, f"{where}.{key}")
        elif value == default:
            found.append(f"{where}.{key}")
    return found


def test_no_preset_repeats_a_dataclass_default():
    repeated = []
    for group, nodes in SCHEMAS.items():
        for path in sorted((REPO / "conf" / group).glob("*.yaml")):
            values = yaml.safe_load(path.read_text()) or {}
            base = values.get("defaults", [None])[0]
            if base not in nodes:  # a preset over another preset (deepspeed_zero3_offload over deepspeed_zero3)
                continue
            repeated += _repeats(values, nodes[base](), f"conf/{group}/{path.name}")
    assert not repeated, repeated


def test_typed_groups_refuse_wrong_types_while_composing():
    with pytest.raises(CONFIG_ERRORS) as error:
        compose_config(["data.batch_size=many"])
    assert "Value 'many' of type 'str' could not be converted to Integer" in config_error_line(error.value)
    assert OmegaConf.get_type(compose_config([]).data).__name__ == "LatentDataConfig"


def test_a_user_config_dir_adds_an_experiment(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - /experiment/tiny\noptim:\n  lr: 3.0e-4\n"
    )
    cmd = [sys.executable, "-m", "sdtrain.train", "--config-dir", str(tmp_path), "experiment=mine", "--cfg", "job"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    job = yaml.safe_load(out.stdout)
    assert job["optim"]["lr"] == 3.0e-4 and job["data"]["batch_size"] == 8  # mine over tiny over the defaults


def test_a_user_yaml_without_the_schema_is_checked_against_it():
    from sdtrain.data.loader import LatentDataConfig
    from sdtrain.errors import ConfigError

    data = to_object(OmegaConf.create({"batch_size": 4, "shards": "/d/*.tar"}), "data", LatentDataConfig)
    assert isinstance(data, LatentDataConfig) and data.batch_size == 4 and data.num_workers == 2
    with pytest.raises(ConfigError, match="data.colour: Key 'colour' not in 'LatentDataConfig'"):
        to_object(OmegaConf.create({"colour": "red"}), "data", LatentDataConfig)


def test_planner_errors_are_one_line(capsys):
    from sdtrain.launch.plan import main

    assert main(["--", "model.pretrained=/released/sd15"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: model.pretrained=/released/sd15 is not a diffusers pipeline folder")
        and err.count("\n") == 1
    )


def test_brace_patterns_are_quoted_for_hydra_and_nothing_else_is():
    from sdtrain.launch.config import quote_brace_patterns

    assert quote_brace_patterns(["data.shards=/d/{000000..000099}.tar"]) == ["data.shards='/d/{000000..000099}.tar'"]
    assert quote_brace_patterns(["data.shards=[/a/{0..3}.tar,/b/{x,y}.tar]"]) == [
        "data.shards=['/a/{0..3}.tar','/b/{x,y}.tar']"
    ]
    untouched = ["a=1", "data.shards='/q/{0..1}.tar'", "+model.unet.config={a:1,b:2}", "trainer.max_steps=3"]
    assert quote_brace_patterns(untouched) == untouched
