"""JSON log lines for the bus service: one object per line, no credentials."""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any, Final

import orjson

__all__ = ["JsonFormatter", "configure_logging", "redact_url"]

_RECORD_ATTRS: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime"}
)
_URL_CREDENTIALS: Final = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` without its user and password."""
    return _URL_CREDENTIALS.sub(r"\g<scheme>[redacted]@", url)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                entry[key] = redact_url(value) if isinstance(value, str) else value
        if record.exc_info and record.exc_info[1] is not None:
            # SECURITY: the exception type only, never a stack trace with values.
            entry["error_type"] = type(record.exc_info[1]).__name__
        return orjson.dumps(entry, default=str).decode()


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
