"""Named egress destinations: a versioned TOML file -> frozen :class:`Destination` objects.

The file (``config/egress.toml``)::

    version = 1

    [destinations.payments-api]
    base_url = "https://api.payments.example"
    ceiling = "D2"                  # the highest class that may go there (D0..D3)
    methods = ["GET", "POST"]
    path_prefixes = ["/v1/"]
    timeout_s = 10.0
    connect_timeout_s = 3.0
    internal = false                # true: may resolve to private addresses
    mode = "enforce"                # or "report"; absent: the global mode
    client_cert_file = ""           # mTLS client certificate and key (PEM)
    client_key_file = ""

Only a destination's name ever comes from a request; the URL comes from
here. The ceilings must match the policy data (``data.nops.egress_destinations``):
OPA decides on them, the gateway only enforces.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal

import yarl

from egress.addresses import parse_address

__all__ = [
    "CLASSES",
    "DESTINATIONS_VERSION",
    "Destination",
    "DestinationError",
    "Mode",
    "load_destinations",
    "parse_destinations",
]

DESTINATIONS_VERSION: Final = 1
#: The data classes, lowest first; D4 never leaves.
CLASSES: Final = ("D0", "D1", "D2", "D3", "D4")
Mode = Literal["enforce", "report"]
_NAME: Final = re.compile(r"[a-z][a-z0-9._-]{0,62}")
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_DEFAULT_METHODS: Final = ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")
_FIELDS: Final = frozenset(
    {
        "base_url",
        "ceiling",
        "methods",
        "path_prefixes",
        "timeout_s",
        "connect_timeout_s",
        "internal",
        "mode",
        "client_cert_file",
        "client_key_file",
        "description",
    }
)


class DestinationError(ValueError):
    """The destinations file is invalid; ``key`` names the bad dotted key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True, slots=True)
class Destination:
    name: str
    base_url: yarl.URL
    ceiling: str
    methods: frozenset[str] = frozenset(_DEFAULT_METHODS)
    path_prefixes: tuple[str, ...] = ("/",)
    timeout_s: float = 10.0
    connect_timeout_s: float = 3.0
    internal: bool = False
    #: None: the global mode.
    mode: Mode | None = None
    client_cert_file: str = ""
    client_key_file: str = ""

    @property
    def host(self) -> str:
        host = self.base_url.raw_host
        assert host is not None  # noqa: S101 - checked when parsed
        return host

    @property
    def port(self) -> int:
        port = self.base_url.port
        assert port is not None  # noqa: S101 - http(s) URLs always have one
        return port

    def allows_path(self, path: str) -> bool:
        return any(path.startswith(prefix) for prefix in self.path_prefixes)


def load_destinations(path: str | Path) -> Mapping[str, Destination]:
    """Read and validate the destinations file."""
    try:
        with open(path, "rb") as file:
            table = tomllib.load(file)
    except OSError as exc:
        raise DestinationError("destinations_file", f"cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise DestinationError("destinations_file", f"not TOML: {exc}") from None
    return parse_destinations(table)


def parse_destinations(table: Mapping[str, Any]) -> Mapping[str, Destination]:
    """Validate a parsed destinations document into frozen destinations by name."""
    if table.get("version") != DESTINATIONS_VERSION:
        raise DestinationError("version", f"must be {DESTINATIONS_VERSION}")
    unknown = set(table) - {"version", "destinations"}
    if unknown:
        raise DestinationError(sorted(unknown)[0], "unknown key")
    raw = table.get("destinations", {})
    if not isinstance(raw, Mapping):
        raise DestinationError("destinations", "must be a table")
    return MappingProxyType({name: _destination(name, values) for name, values in raw.items()})


def _destination(name: str, values: Any) -> Destination:
    key = f"destinations.{name}"
    if _NAME.fullmatch(name) is None:
        raise DestinationError(key, "names are lower-case letters, digits, '.', '_' or '-'")
    if not isinstance(values, Mapping):
        raise DestinationError(key, "must be a table")
    unknown = set(values) - _FIELDS
    if unknown:
        raise DestinationError(f"{key}.{sorted(unknown)[0]}", "unknown key")
    url = _base_url(values.get("base_url"), f"{key}.base_url")
    ceiling = values.get("ceiling")
    if ceiling not in CLASSES[:-1]:
        raise DestinationError(f"{key}.ceiling", "must be one of D0..D3 (D4 never leaves)")
    methods = values.get("methods", list(_DEFAULT_METHODS))
    if not isinstance(methods, list) or not methods or not set(methods) <= _METHODS:
        raise DestinationError(f"{key}.methods", f"must be a list of {sorted(_METHODS)}")
    prefixes = values.get("path_prefixes", ["/"])
    if (
        not isinstance(prefixes, list)
        or not prefixes
        or not all(isinstance(p, str) and p.startswith("/") for p in prefixes)
    ):
        raise DestinationError(f"{key}.path_prefixes", "must be a list of paths starting with '/'")
    timeout_s = _positive(values.get("timeout_s", 10.0), f"{key}.timeout_s")
    connect_s = _positive(values.get("connect_timeout_s", 3.0), f"{key}.connect_timeout_s")
    internal = values.get("internal", False)
    if not isinstance(internal, bool):
        raise DestinationError(f"{key}.internal", "must be true or false")
    mode = values.get("mode")
    if mode not in (None, "enforce", "report"):
        raise DestinationError(f"{key}.mode", 'must be "enforce" or "report"')
    cert = values.get("client_cert_file", "")
    private_key = values.get("client_key_file", "")
    if (
        not isinstance(cert, str)
        or not isinstance(private_key, str)
        or bool(cert) != bool(private_key)
    ):
        raise DestinationError(f"{key}.client_cert_file", "needs client_key_file (both or none)")
    if cert and url.scheme != "https":
        raise DestinationError(f"{key}.client_cert_file", "mTLS needs an https base_url")
    return Destination(
        name=name,
        base_url=url,
        ceiling=ceiling,
        methods=frozenset(methods),
        path_prefixes=tuple(prefixes),
        timeout_s=timeout_s,
        connect_timeout_s=connect_s,
        internal=internal,
        mode=mode,
        client_cert_file=cert,
        client_key_file=private_key,
    )


def _base_url(value: Any, key: str) -> yarl.URL:
    if not isinstance(value, str):
        raise DestinationError(key, "must be an http(s) URL")
    try:
        url = yarl.URL(value)
    except ValueError:
        raise DestinationError(key, "must be an http(s) URL") from None
    if url.scheme not in ("http", "https") or not url.raw_host:
        raise DestinationError(key, "must be an http(s) URL with a host")
    if url.user or url.password or url.query_string or url.fragment:
        raise DestinationError(key, "no credentials, query or fragment in base_url")
    address = parse_address(url.raw_host)
    if address is not None and str(address) != url.raw_host.strip("[]"):
        # SECURITY: write addresses canonically so that a reader sees what is dialled.
        raise DestinationError(key, f"write the address canonically ({address})")
    return url


def _positive(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise DestinationError(key, "must be a number > 0")
    return float(value)
