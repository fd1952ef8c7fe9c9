"""Reading a TOML file and the environment into a validated :class:`Config`.

The rules (supported field types, ``NOPS_GATEWAY__`` overrides and
``NOPS_GATEWAY_FILE__`` secrets from files) are in the package docstring,
gateway/config/__init__.py.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from gateway.config.checks import ENV_PREFIX, FILE_ENV_PREFIX, ConfigError
from gateway.config.root import Config
from secretfile import SecretFileError, read_secret_file


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (or only defaults when None), apply environment overrides."""
    table: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as handle:
                table = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError("<file>", f"{path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("<file>", f"{path} is not valid TOML: {exc}") from None
    _apply_env(table, os.environ if environ is None else environ)
    return parse_config(table)


def parse_config(table: Mapping[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a parsed TOML table."""
    config: Config = _build(Config, table, "")
    config.validate()
    return config


def _apply_env(table: dict[str, Any], environ: Mapping[str, str]) -> None:
    seen: dict[str, str] = {}
    for name, raw in sorted(environ.items()):
        if name.startswith(ENV_PREFIX):
            parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        elif name.startswith(FILE_ENV_PREFIX):
            parts = [p.lower() for p in name[len(FILE_ENV_PREFIX) :].split("__")]
        else:
            continue
        key = ".".join(parts)
        if not all(parts):
            raise ConfigError(key, f"malformed environment override {name}")
        if key in seen:
            raise ConfigError(key, f"set by both {seen[key]} and {name}")
        seen[key] = name
        if name.startswith(FILE_ENV_PREFIX):
            value: Any = _secret_file_value(raw, key, name)
        else:
            value = _env_value(raw)
        node = table
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(key, f"{name} overrides a value that is not a table")
            node = child
        node[parts[-1]] = value


def _secret_file_value(path: str, key: str, name: str) -> str:
    """The text of the file ``name`` points at: a secret, never echoed in an error."""
    try:
        return read_secret_file(path)
    except SecretFileError as exc:
        detail = f"{path} is empty" if exc.empty else f"cannot read {path}: {exc.reason}"
        raise ConfigError(key, f"{name}: {detail}") from None


def _env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _build(cls: type[Any], table: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(table, Mapping):
        raise ConfigError(prefix or "<root>", "must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in table:
        if key not in fields:
            raise ConfigError(_join(prefix, key), "unknown key")
    values: dict[str, Any] = {}
    for name, spec in fields.items():
        key = _join(prefix, name)
        if name in table:
            values[name] = _coerce(hints[name], table[name], key)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(key, "is required")
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return _build(hint, value, key)
    if origin is tuple:
        item_type = typing.get_args(hint)[0]
        if not isinstance(value, list):
            raise ConfigError(key, "must be an array")
        return tuple(_coerce(item_type, item, f"{key}[{i}]") for i, item in enumerate(value))
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(key, f"must be one of {', '.join(map(repr, allowed))}")
        return value
    if origin is dict:
        value_type = typing.get_args(hint)[1]
        if not isinstance(value, Mapping):
            raise ConfigError(key, "must be a table")
        return types.MappingProxyType(
            {str(k): _coerce(value_type, v, f"{key}.{k}") for k, v in value.items()}
        )
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported config type {hint!r} at {key}")
        return _coerce(args[0], value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, "must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, "must be an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, "must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, "must be a string")
        return value
    raise TypeError(f"unsupported config type {hint!r} at {key}")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key
