"""The bus service's configuration: one small frozen value object.

Every field has a named default; :meth:`BusConfig.validate` names the bad
key, like the gateway's config. ``python -m bus serve`` fills it from flags
and ``NOPS_BUS__<KEY>`` environment variables (:func:`config_from_env`);
``NOPS_BUS_FILE__<KEY>=<path>`` reads a value from a file instead (a mounted
container secret such as a Redis URL with its password).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from secretfile import SecretFileError, read_secret_file

__all__ = [
    "DEFAULT_BUS_CONFIG",
    "ENV_PREFIX",
    "FILE_ENV_PREFIX",
    "BusConfig",
    "BusConfigError",
    "config_from_env",
]

ENV_PREFIX: Final = "NOPS_BUS__"
#: ``NOPS_BUS_FILE__<KEY>=<path>``: the value is the file's text (one trailing newline removed).
FILE_ENV_PREFIX: Final = "NOPS_BUS_FILE__"


class BusConfigError(ValueError):
    """A configuration value is invalid; ``key`` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True, slots=True)
class BusConfig:
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: ``XADD MAXLEN ~`` per topic stream (and per dead-letter stream). Trimming
    #: drops the oldest entries even if a group has not consumed them yet, so
    #: the default is large; size Redis memory for it (see docs/bus.md).
    max_stream_len: int = 1_000_000
    #: Seconds a delivered, unacknowledged message stays with its consumer
    #: before another consumer of the group may reclaim it.
    visibility_timeout_s: float = 30.0
    #: Deliveries before a message goes to the topic's dead-letter stream.
    max_deliveries: int = 5
    #: Largest publish request body (the envelope), in bytes; larger is 413.
    max_message_bytes: int = 262_144
    #: Longest long-poll a consumer may ask for (``wait``), in seconds.
    max_poll_s: float = 20.0
    #: Most messages one consume call returns (``max``).
    max_batch: int = 100
    #: Seconds an ``Idempotency-Key`` is remembered.
    idempotency_ttl_s: int = 86_400
    #: Long-polls waiting at once; one more is refused with 503. Each holds a
    #: Redis connection, so this also bounds the connection pool.
    max_pollers: int = 256

    def validate(self) -> None:
        scheme = self.redis_url.partition("://")[0]
        _require(
            scheme in ("redis", "rediss", "unix") and "://" in self.redis_url,
            "redis_url",
            "must be a redis://, rediss:// or unix:// URL",
        )
        _require(self.max_stream_len >= 1000, "max_stream_len", "must be >= 1000")
        _require(
            0.1 <= self.visibility_timeout_s <= 43_200,
            "visibility_timeout_s",
            "must be between 0.1 and 43200",
        )
        _require(1 <= self.max_deliveries <= 1000, "max_deliveries", "must be between 1 and 1000")
        _require(
            1024 <= self.max_message_bytes <= 16 * 1024 * 1024,
            "max_message_bytes",
            "must be between 1024 and 16777216",
        )
        _require(0 <= self.max_poll_s <= 300, "max_poll_s", "must be between 0 and 300")
        _require(1 <= self.max_batch <= 1000, "max_batch", "must be between 1 and 1000")
        _require(self.idempotency_ttl_s >= 1, "idempotency_ttl_s", "must be >= 1")
        _require(1 <= self.max_pollers <= 10_000, "max_pollers", "must be between 1 and 10000")

    def replace(self, **changes: Any) -> BusConfig:
        """A validated copy with ``changes``."""
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config


DEFAULT_BUS_CONFIG: Final = BusConfig()


def config_from_env(environ: Mapping[str, str] | None = None, **overrides: Any) -> BusConfig:
    """Defaults, then ``NOPS_BUS__<KEY>`` variables, then ``overrides`` (flags)."""
    environ = os.environ if environ is None else environ
    fields = {f.name: f for f in dataclasses.fields(BusConfig)}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, raw in sorted(environ.items()):
        if name.startswith(ENV_PREFIX):
            key = name[len(ENV_PREFIX) :].lower()
        elif name.startswith(FILE_ENV_PREFIX):
            key = name[len(FILE_ENV_PREFIX) :].lower()
            raw = _read_file(key, name, raw)
        else:
            continue
        if key not in fields:
            raise BusConfigError(key, f"unknown setting (from {name})")
        if key in sources:
            raise BusConfigError(key, f"set by both {sources[key]} and {name}")
        sources[key] = name
        values[key] = _coerce(key, fields[key].type, raw)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return DEFAULT_BUS_CONFIG.replace(**values)


def _read_file(key: str, name: str, path: str) -> str:
    """The text of a secret file; the error names the file, never its content."""
    try:
        return read_secret_file(path)
    except SecretFileError as exc:
        detail = f"{path} is empty" if exc.empty else f"cannot read {path}: {exc.reason}"
        raise BusConfigError(key, f"{name}: {detail}") from None


def _coerce(key: str, annotation: object, raw: str) -> Any:
    kind = {"int": int, "float": float, "str": str}.get(str(annotation), str)
    try:
        return kind(raw)
    except ValueError:
        raise BusConfigError(key, f"{raw!r} is not a valid {kind.__name__}") from None


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise BusConfigError(key, message)
