"""What every section shares: :class:`ConfigError`, the override prefixes
and the ``_require*`` checks (URLs, decision paths, rate limits, RFC 3339).
"""

from __future__ import annotations

import datetime
import re
from typing import Final

import limits
import yarl

ENV_PREFIX: Final = "NOPS_GATEWAY__"
#: ``NOPS_GATEWAY_FILE__<SECTION>__<KEY>=<path>``: the value is read from the file.
FILE_ENV_PREFIX: Final = "NOPS_GATEWAY_FILE__"
_SCOPE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")  # RFC 6749 scope-token
_DECISION_PATH: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; ``key`` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(key, message)


def _require_decision_path(value: str, key: str) -> None:
    _require(
        _DECISION_PATH.fullmatch(value) is not None,
        key,
        "must be a slash-separated Rego reference such as nops/authz/decision",
    )


def _require_rate_limit(value: str, key: str) -> None:
    """Empty (no limit) or exactly one ``limits`` rate such as ``100/minute``."""
    if not value:
        return
    try:
        items = limits.parse_many(value)
    except ValueError:
        raise ConfigError(key, f"{value!r} is not a rate limit such as '100/minute'") from None
    _require(len(items) == 1, key, "must be one rate limit such as '100/minute', not several")
    _require(items[0].amount > 0, key, "must allow at least one request per window")


def _rfc3339(value: str, key: str) -> datetime.datetime | None:
    """An RFC 3339 date-time with an offset, or None for an empty value."""
    if not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(key, "must be an RFC 3339 date-time, e.g. 2026-01-31T00:00:00Z") from None
    _require(parsed.tzinfo is not None, key, "must carry an offset (Z or +hh:mm)")
    return parsed


def rfc3339_timestamp(value: str) -> float | None:
    """Seconds since the epoch for a validated RFC 3339 value (None if empty)."""
    parsed = _rfc3339(value, "<date-time>")
    return parsed.timestamp() if parsed is not None else None


def _require_http_url(value: str, key: str) -> None:
    try:
        url = yarl.URL(value)
    except ValueError:
        raise ConfigError(key, "is not a valid URL") from None
    _require(url.scheme in ("http", "https"), key, "must be an http:// or https:// URL")
    _require(bool(url.host), key, "must name a host")
    _require(not url.user and not url.password, key, "must not carry credentials")
    _require(not url.query_string and not url.fragment, key, "must not carry a query or fragment")
