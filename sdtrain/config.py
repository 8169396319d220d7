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


def config_error_line(exc: BaseException, where: str | None = None) -> str:
    """Hydra's/OmegaConf's multi-line message as one line, naming the key (`where` prefixes a relative one)."""

    def own_lines(error: BaseException) -> list[str]:
        lines = [line.strip() for line in str(error).splitlines() if line.strip() and not line[0].isspace()]
        key = getattr(error, "full_key", None)
        if key and lines:
            lines[-1] = f"{where}.{key}: {lines[-1]}" if where else f"{key}: {lines[-1]}"
        return lines

    lines = own_lines(exc)
    if isinstance(exc.__cause__, OmegaConfBaseException):
        lines += own_lines(exc.__cause__)
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


def to_object(node: Any, where: str, schema: type | None = None) -> Any:
    """The dataclass behind a typed OmegaConf node (`cfg.data` -> LatentDataConfig); its checks -> ConfigError.
    An untyped node (a user's own YAML that does not start from the group's `_schema`) is checked against
    `schema` first, as if it had."""
    if schema is not None and not dataclasses.is_dataclass(OmegaConf.get_type(node)):
        try:
            node = OmegaConf.merge(OmegaConf.structured(schema), node)
        except OmegaConfBaseException as exc:
            raise ConfigError(config_error_line(exc, where)) from None
    problem = unknown_key(node, where)
    if problem:
        raise ConfigError(problem)
    try:
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as exc:  # OmegaConf validation: the message names the key
        raise ConfigError(config_error_line(exc, where)) from None
    except (ValueError, TypeError) as exc:  # the dataclass's __post_init__ checks
        raise ConfigError(f"{where}: {exc}") from None


def from_values(cls: type[T], values: dict[str, Any] | None, where: str) -> T:
    """`cls` built from a plain mapping: unknown keys and wrong types are one-line ConfigErrors naming `where`."""
    if values is not None and not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping, got {values!r}")
    try:
        node = OmegaConf.merge(OmegaConf.structured(cls), values or {})
    except OmegaConfBaseException as exc:
        raise ConfigError(config_error_line(exc, where)) from None
    return to_object(node, where)
