"""JSON structured logs: one object per line, request-scoped fields from contextvars.

Secrets never reach a line: values under sensitive key names are replaced,
URLs lose their credentials, and exceptions are logged by type and place,
never as a stack trace.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import Any, Final, TextIO

import orjson

__all__ = ["REQUEST_ID", "TRACE_ID", "JsonFormatter", "configure_logging", "redact"]

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
#: The W3C trace id of the request being handled, while tracing is on.
TRACE_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("trace_id", default=None)

# Attributes every LogRecord has; anything else came in through ``extra=``.
_RECORD_ATTRS: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime"}
)
_SENSITIVE_KEY: Final = re.compile(
    r"authorization|cookie|token|secret|password|passwd|signature|api[_-]?key|dsn|credential",
    re.IGNORECASE,
)
_URL_CREDENTIALS: Final = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)
REDACTED: Final = "[redacted]"


@functools.lru_cache(maxsize=1024)
def _sensitive(key: str) -> bool:
    return _SENSITIVE_KEY.search(key) is not None


def redact(key: str, value: Any) -> Any:
    """The loggable form of ``value`` stored under ``key``."""
    if _sensitive(key):
        return REDACTED
    if isinstance(value, str):
        if "@" not in value:
            return value
        return _URL_CREDENTIALS.sub(r"\g<scheme>[redacted]@", value)
    if isinstance(value, Mapping):
        return {str(k): redact(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(key, v) for v in value]
    return value


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact("msg", record.getMessage()),
        }
        request_id = REQUEST_ID.get()
        if request_id is not None:
            entry["request_id"] = request_id
        trace_id = TRACE_ID.get()
        if trace_id is not None:
            entry["trace_id"] = trace_id
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                entry[key] = redact(key, value)
        if record.exc_info and record.exc_info[1] is not None:
            # SECURITY: the type and the innermost frame, never a stack trace.
            exc = record.exc_info[1]
            entry["error_type"] = type(exc).__name__
            tb = exc.__traceback__
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            if tb is not None:
                entry["error_at"] = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
        return orjson.dumps(entry, default=str).decode()


def configure_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Send every logger's records as JSON lines to ``stream`` (stderr)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's own access log duplicates our canonical request line.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
