"""Typed dataclass configs from plain values: OmegaConf's structured configs check keys and types, the
dataclass's `__post_init__` checks values, and every failure is one ConfigError line naming the key.

Used for Hydra groups (launch/config.py registers the same dataclasses as schemas) and for values given on other
command lines (sdtrain-encode's JSON options). Below the launcher, code takes these dataclasses, never a DictConfig.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sdtrain.errors import ConfigError

T = TypeVar("T")


def config_error_line(exc: BaseException) -> str:
    """Hydra's/OmegaConf's multi-line message as one line (the indented full_key/object_type lines dropped)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not line.startswith((" ", "\t"))]
    cause = exc.__cause__
    if isinstance(cause, OmegaConfBaseException):
        lines += [line.strip() for line in str(cause).splitlines() if line.strip() and not line.startswith(" ")]
    return "; ".join(dict.fromkeys(lines)) or type(exc).__name__


def unknown_key(node: Any, where: str) -> str | None:
    """The first key of a typed node that its dataclass does not have (added with Hydra's `+key=`), or None."""
    schema = OmegaConf.get_type(node)
    if not (isinstance(node, DictConfig) and dataclasses.is_dataclass(schema)):
        return None
    fields = {f.name for f in dataclasses.fields(schema)}
    for key in node:
        if key not in fields:
            return f"unknown key {where}.{key} (known: {', '.join(sorted(fields))})"
        found = unknown_key(node._get_node(key), f"{where}.{key}")
        if found:
            return found
    return None


def to_object(node: Any, where: str) -> Any:
    """The dataclass behind a typed OmegaConf node (`cfg.data` -> LatentDataConfig); its checks -> ConfigError."""
    problem = unknown_key(node, where)
    if problem:
        raise ConfigError(problem)
    try:
        return OmegaConf.to_object(node)
    except (ValueError, TypeError, OmegaConfBaseException) as exc:  # __post_init__ checks, OmegaConf validation
        raise ConfigError(f"{where}: {config_error_line(exc)}") from None


def from_values(cls: type[T], values: dict[str, Any] | None, where: str) -> T:
    """`cls` built from a plain mapping: unknown keys and wrong types are one-line ConfigErrors naming `where`."""
    if values is not None and not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping, got {values!r}")
    try:
        node = OmegaConf.merge(OmegaConf.structured(cls), values or {})
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{where}: {config_error_line(exc)}") from None
    return to_object(node, where)
