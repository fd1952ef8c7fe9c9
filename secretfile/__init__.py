"""Read one secret from a mounted file (Docker/Kubernetes secrets), for every service.

The gateway (``NOPS_GATEWAY_FILE__*``), the bus (``NOPS_BUS_FILE__*``) and the
registry (``--dsn-file``) read a secret the same way: UTF-8 text, one trailing
line break dropped, empty refused. Each service words its own error from
:class:`SecretFileError`, which names the file and why, never its content. A
package of its own for the reason ``problemjson`` is: no service imports another.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["SecretFileError", "read_secret_file"]


class SecretFileError(ValueError):
    """``path`` could not be read (``reason``), or holds nothing (``empty``)."""

    def __init__(self, path: str, reason: str, *, empty: bool = False) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
        self.empty = empty


def read_secret_file(path: str) -> str:
    """The secret in ``path``: its text without one trailing line break."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise SecretFileError(path, str(reason)) from None
    value = text.removesuffix("\n").removesuffix("\r")
    if not value:
        raise SecretFileError(path, "empty", empty=True)
    return value
