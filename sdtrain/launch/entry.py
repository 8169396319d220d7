"""The command-line entry shared by the training jobs (`sdtrain-train`, `sdtrain-train-vae`): the packaged conf/,
brace patterns quoted for Hydra, config errors and any SdtrainError ended with one line on stderr (exit 2)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sdtrain.errors import SdtrainError, one_line
from sdtrain.launch.config import CONF_PATH, one_line_config_errors, quote_brace_patterns, register_configs
from sdtrain.launch.startup import quiet_known_noise


def hydra_entry(config_name: str, run: Callable[[DictConfig, str], Any]) -> Callable[[], None]:
    """`main()` for a job whose Hydra config is conf/CONFIG_NAME.yaml and whose work is `run(cfg, run_dir)`."""

    @hydra.main(version_base="1.3", config_path=CONF_PATH, config_name=config_name)
    def hydra_main(cfg: DictConfig) -> None:
        run_dir = HydraConfig.get().runtime.output_dir
        try:
            run(cfg, run_dir)
        except SdtrainError as exc:
            print(f"error: {one_line(exc)}", file=sys.stderr)
            sys.exit(2)

    def main() -> None:
        quiet_known_noise()
        sys.argv[1:] = quote_brace_patterns(sys.argv[1:])
        register_configs()
        one_line_config_errors()
        hydra_main()

    return main
