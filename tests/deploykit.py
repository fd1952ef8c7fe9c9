"""Helpers for the deploy artefact tests: YAML loading and the inline-secret check."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import yaml

__all__ = ["inline_secrets", "load_yaml", "load_yaml_documents", "strings", "wait_http_ok"]

#: Names that say "my value is a secret"; such a value must be a file path instead.
_SECRET_NAME: Final = re.compile(
    r"PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|PRIVATE|DSN|CREDENTIAL|REDIS_URL", re.IGNORECASE
)
#: scheme://user:password@host
_URL_PASSWORD: Final = re.compile(r"://[^/@\s:]*:[^/@\s]+@")
_PEM: Final = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
_INLINE_FLAG: Final = re.compile(r"^--?(requirepass|password|masterauth)(=|$)", re.IGNORECASE)
#: Fields whose value names a secret (a reference), never holds one.
_REFERENCES: Final = frozenset({"secretName"})
#: Where mounted secrets live (compose secrets, Kubernetes Secret volumes).
SECRET_PATHS: Final = ("/run/secrets/", "/etc/nops/secrets/")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def strings(node: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """Every string value below ``node`` with its dotted location."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from strings(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from strings(value, f"{where}[{index}]")
    elif isinstance(node, str):
        yield where, node


def inline_secrets(pairs: Iterable[tuple[str, str]]) -> list[str]:
    """The (name, value) pairs whose value looks like a secret written inline.

    A name that says secret (``POSTGRES_PASSWORD``, ``..._DSN``, ``..._REDIS_URL``)
    must carry a path to a mounted secret file, or be a ``*_FILE`` variable; a
    URL must not carry a password; no value holds a private key; and no argument
    passes a password on a command line (``--requirepass x``).
    """
    found: list[str] = []
    previous = ""
    for name, value in pairs:
        leaf = re.split(r"[.\[]", name)[-1]
        if _URL_PASSWORD.search(value):
            found.append(f"{name}: URL with a password")
        elif _PEM.search(value):
            found.append(f"{name}: private key")
        elif _INLINE_FLAG.match(previous) and "=" not in previous:
            found.append(f"{name}: value of {previous}")
        elif _INLINE_FLAG.match(value) and "=" in value:
            found.append(f"{name}: {value.split('=')[0]}=...")
        elif (
            leaf not in _REFERENCES
            and _SECRET_NAME.search(leaf)
            and not leaf.upper().endswith("_FILE")
            and not value.startswith(SECRET_PATHS)
        ):
            found.append(f"{name}: a secret-named setting with an inline value")
        previous = value
    return found


def wait_http_ok(url: str, alive: Any, timeout_s: float = 30.0) -> None:
    """Poll ``url`` until it answers 200; ``alive()`` false (the process died) fails at once."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the process serving {url} exited")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 in {timeout_s}s")
