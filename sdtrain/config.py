"""Turn a Hydra/OmegaConf node into a typed dataclass, with one-line errors for unknown keys and bad types.

Below the launcher, code takes these dataclasses, never a DictConfig (lightning-hydra-template keeps
`instantiate` at the edge for the same reason: one place where config meets code).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from sdtrain.errors import ConfigError

T = TypeVar("T")


def to_plain(node: Any) -> Any:
    """A resolved plain-Python copy of an OmegaConf node (dicts, lists, scalars)."""
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _check_type(value: Any, annotation: Any, where: str) -> None:
    """Reject obviously wrong scalar types (a string where a number belongs) with the key's name."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                _check_type(value, option, where)
                return
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if annotation is float and isinstance(value, int | float) and not isinstance(value, bool):
        return
    if annotation in (int, str, bool) and not isinstance(value, annotation):
        raise ConfigError(f"{where} must be {annotation.__name__}, got {value!r}")
    if annotation is int and isinstance(value, bool):
        raise ConfigError(f"{where} must be int, got {value!r}")
    if annotation is float and not isinstance(value, int | float):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if origin is list and not isinstance(value, list | tuple):
        raise ConfigError(f"{where} must be a list, got {value!r}")
    if origin is dict and not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping, got {value!r}")


def from_conf(cls: type[T], node: Any, where: str) -> T:
    """Build dataclass `cls` from a config mapping; `where` names the config group in errors."""
    values = to_plain(node) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {where}.{unknown[0]} (known: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        _check_type(value, hints[name], f"{where}.{name}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
