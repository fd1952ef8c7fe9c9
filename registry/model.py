"""Agents and the validation of everything a caller may send about one.

Validation is strict and happens before any SQL: every rule here is also a
``CHECK`` in the schema (``migrations/0001_agents.up.sql``) as a second line,
and every violation is a typed 4xx :mod:`registry.errors` error naming the
field, so no input can reach the database in a shape that makes it fail.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

import yarl

from registry.errors import (
    InvalidAgentId,
    InvalidCapability,
    InvalidEndpointUrl,
    InvalidField,
    InvalidTenant,
    MalformedBody,
    TooManyCapabilities,
    UnknownField,
)

__all__ = [
    "AGENT_ID",
    "DEFAULT_LIMITS",
    "DEFAULT_WEIGHT",
    "RESERVED_AGENT_IDS",
    "STATUSES",
    "Agent",
    "AgentSpec",
    "Limits",
    "Status",
    "parse_patch",
    "parse_registration",
    "utc",
    "validate_agent_id",
    "validate_capability",
    "validate_endpoint_url",
    "validate_tenant",
]

Status = Literal["healthy", "stale", "zombie"]
STATUSES: Final[tuple[Status, ...]] = ("healthy", "stale", "zombie")

#: Agent ids: lower-case, URL-safe, one path segment, 1-63 characters.
AGENT_ID: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
#: Path segments the gateway gives a meaning under ``/agents/``.
RESERVED_AGENT_IDS: Final = frozenset({"by-capability"})
_TENANT: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_CAPABILITY: Final = re.compile(r"[a-z0-9][a-z0-9._:-]*")
_LABEL_KEY: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
# Printable text: no C0 controls, no DEL (PostgreSQL text cannot hold NUL).
_TEXT: Final = re.compile(r"[^\x00-\x1f\x7f]*")
DEFAULT_WEIGHT: Final = 100
_MAX_WEIGHT: Final = 1000
_FIELDS: Final = frozenset(
    {"id", "name", "version", "capabilities", "endpoint_url", "labels", "weight"}
)
_MUTABLE: Final = _FIELDS - {"id"}


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one agent record may hold."""

    max_capabilities: int = 32
    max_capability_length: int = 64
    max_labels: int = 32
    max_label_value_length: int = 256
    max_name_length: int = 128
    max_version_length: int = 64
    max_url_length: int = 2048


DEFAULT_LIMITS: Final = Limits()


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """What a caller registers."""

    id: str
    endpoint_url: str
    name: str = ""
    version: str = ""
    capabilities: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    weight: int = DEFAULT_WEIGHT


@dataclass(frozen=True, slots=True)
class Agent:
    """One registered agent, as stored; ``status`` as of the read."""

    tenant: str
    id: str
    name: str
    version: str
    capabilities: tuple[str, ...]
    endpoint_url: str
    status: Status
    heartbeat_at: datetime
    labels: Mapping[str, str]
    weight: int
    created_at: datetime
    updated_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tenant": self.tenant,
            "name": self.name,
            "version": self.version,
            "capabilities": list(self.capabilities),
            "endpoint_url": self.endpoint_url,
            "status": self.status,
            "heartbeat_at": _rfc3339(self.heartbeat_at),
            "labels": dict(self.labels),
            "weight": self.weight,
            "created_at": _rfc3339(self.created_at),
            "updated_at": _rfc3339(self.updated_at),
        }


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def validate_tenant(value: str) -> str:
    if _TENANT.fullmatch(value) is None:
        raise InvalidTenant("the tenant must be 1-64 letters, digits, '.', '_' or '-'")
    return value


def validate_agent_id(value: object) -> str:
    if not isinstance(value, str) or AGENT_ID.fullmatch(value) is None:
        raise InvalidAgentId(
            "an agent id is 1-63 lower-case letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            field="id",
        )
    if value in RESERVED_AGENT_IDS:
        raise InvalidAgentId(f"the agent id {value!r} is reserved", field="id")
    return value


def validate_capability(value: object, limits: Limits = DEFAULT_LIMITS) -> str:
    if (
        not isinstance(value, str)
        or len(value) > limits.max_capability_length
        or _CAPABILITY.fullmatch(value) is None
    ):
        raise InvalidCapability(
            f"a capability is 1-{limits.max_capability_length} lower-case letters, digits, "
            "'.', '_', ':' or '-', starting with a letter or digit",
            field="capabilities",
        )
    return value


def validate_endpoint_url(value: object, limits: Limits = DEFAULT_LIMITS) -> str:
    """An absolute http(s) URL with a host, no credentials, query or fragment."""

    def bad(reason: str, detail: str) -> InvalidEndpointUrl:
        return InvalidEndpointUrl(detail, field="endpoint_url", reasons=(reason,))

    if not isinstance(value, str):
        raise InvalidField("endpoint_url must be a string", field="endpoint_url")
    if len(value) > limits.max_url_length:
        raise bad("too_long", f"endpoint_url is longer than {limits.max_url_length} characters")
    if _TEXT.fullmatch(value) is None or " " in value:
        raise bad("malformed", "endpoint_url contains spaces or control characters")
    try:
        url = yarl.URL(value)
        host, port = url.host, url.port
    except (ValueError, TypeError):
        raise bad("malformed", "endpoint_url is not a URL") from None
    if url.scheme not in ("http", "https"):
        raise bad("scheme_not_allowed", "endpoint_url must be an http:// or https:// URL")
    # SECURITY: credentials in a stored URL would be logged, cached and sent on
    # every proxied request; the registry never holds one.
    if url.raw_user is not None or url.raw_password is not None or "@" in url.raw_authority:
        raise bad("credentials_in_url", "endpoint_url must not carry credentials")
    if "#" in value:
        raise bad("fragment_in_url", "endpoint_url must not carry a fragment")
    if "?" in value:
        raise bad("query_in_url", "endpoint_url must not carry a query")
    if not host or not port:
        raise bad("no_host", "endpoint_url must name a host")
    _check_address(host, bad)
    # The scheme is case-insensitive (RFC 3986 §3.1); it is stored in its
    # canonical lower case, which the database's CHECK also requires.
    return url.scheme + value[len(url.scheme) :]


def _check_address(host: str, bad: Any) -> None:
    """Refuse literal addresses no agent lives at (metadata services, wildcards)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return
    # SECURITY: link-local covers the cloud metadata endpoint (169.254.169.254);
    # an agent registration must not turn the gateway into a way to reach it.
    if address.is_link_local or address.is_multicast or address.is_unspecified:
        raise bad("address_not_allowed", "endpoint_url names an address no agent can have")


def parse_registration(body: object, limits: Limits = DEFAULT_LIMITS) -> AgentSpec:
    """A registration body: ``id`` and ``endpoint_url`` required, the rest optional."""
    fields = _object(body, _FIELDS)
    if "id" not in fields:
        raise InvalidAgentId("id is required", field="id")
    agent_id = validate_agent_id(fields["id"])
    if "endpoint_url" not in fields:
        raise InvalidEndpointUrl(
            "endpoint_url is required", field="endpoint_url", reasons=("missing",)
        )
    changes = _validated(fields, limits)
    return AgentSpec(
        id=agent_id,
        endpoint_url=changes["endpoint_url"],
        name=changes.get("name") or agent_id,
        version=changes.get("version", ""),
        capabilities=changes.get("capabilities", ()),
        labels=changes.get("labels", {}),
        weight=changes.get("weight", DEFAULT_WEIGHT),
    )


def parse_patch(body: object, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """A partial update: the mutable fields present, validated. ``id`` is immutable."""
    fields = _object(body, _FIELDS)
    if "id" in fields:
        raise InvalidField("id cannot be changed; register a new agent", field="id")
    changes = _validated(fields, limits)
    if "name" in changes and not changes["name"]:
        raise InvalidField("name must not be empty", field="name")
    if not changes:
        raise MalformedBody(f"nothing to change; send one of {', '.join(sorted(_MUTABLE))}")
    return changes


def _object(body: object, allowed: frozenset[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise MalformedBody("the body must be a JSON object")
    for name in body:
        if name not in allowed:
            raise UnknownField(f"unknown field {str(name)[:64]!r}", field=str(name)[:64])
    return body


def _validated(fields: Mapping[str, Any], limits: Limits) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "endpoint_url" in fields:
        out["endpoint_url"] = validate_endpoint_url(fields["endpoint_url"], limits)
    if "name" in fields:
        out["name"] = _text(fields["name"], "name", limits.max_name_length)
    if "version" in fields:
        out["version"] = _text(fields["version"], "version", limits.max_version_length)
    if "capabilities" in fields:
        out["capabilities"] = _capabilities(fields["capabilities"], limits)
    if "labels" in fields:
        out["labels"] = _labels(fields["labels"], limits)
    if "weight" in fields:
        weight = fields["weight"]
        # JSON has one number type: 5.0 is the integer 5 (as JSON Schema says), 5.5 is not.
        if isinstance(weight, float) and weight.is_integer():
            weight = int(weight)
        if isinstance(weight, bool) or not isinstance(weight, int):
            raise InvalidField("weight must be an integer", field="weight")
        if not 0 <= weight <= _MAX_WEIGHT:
            raise InvalidField(f"weight must be between 0 and {_MAX_WEIGHT}", field="weight")
        out["weight"] = weight
    return out


def _text(value: object, name: str, limit: int) -> str:
    if not isinstance(value, str):
        raise InvalidField(f"{name} must be a string", field=name)
    if len(value) > limit:
        raise InvalidField(f"{name} is longer than {limit} characters", field=name)
    if _TEXT.fullmatch(value) is None:
        raise InvalidField(f"{name} contains control characters", field=name)
    return value


def _capabilities(value: object, limits: Limits) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise InvalidField("capabilities must be an array of strings", field="capabilities")
    if len(value) > limits.max_capabilities:
        raise TooManyCapabilities(
            f"at most {limits.max_capabilities} capabilities per agent", field="capabilities"
        )
    return tuple(sorted({validate_capability(item, limits) for item in value}))


def _labels(value: object, limits: Limits) -> dict[str, str]:
    if not isinstance(value, dict):
        raise InvalidField("labels must be an object of strings", field="labels")
    if len(value) > limits.max_labels:
        raise InvalidField(f"at most {limits.max_labels} labels per agent", field="labels")
    labels: dict[str, str] = {}
    for key, item in value.items():
        if _LABEL_KEY.fullmatch(key) is None:
            raise InvalidField(
                "label keys are 1-63 letters, digits, '.', '_', '/' or '-'", field="labels"
            )
        labels[key] = _text(item, "labels", limits.max_label_value_length)
    return labels


def utc(timestamp: float) -> datetime:
    """A POSIX timestamp as an aware UTC datetime (what PostgreSQL stores)."""
    return datetime.fromtimestamp(timestamp, UTC)
