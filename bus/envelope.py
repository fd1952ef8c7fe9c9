"""The versioned message envelope: what the bus stores and delivers.

A publisher sends a *draft*: at least ``type`` and ``payload``, optionally
``id``, ``time``, ``traceparent``, ``tracestate`` (and ``version`` and
``tenant``, which must then be right). :func:`complete` fills in the rest
from the request (the verified tenant, the ``Idempotency-Key``, the
``traceparent``/``tracestate`` headers, the clock, a fresh UUID) and
validates the whole envelope against ``bus/schemas/envelope.v1.json``.

Errors name the JSON pointer at fault and the rule broken; they never quote
the payload.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

import orjson

from bus.errors import InvalidEnvelope, MalformedRequest, TenantMismatch

__all__ = [
    "ENVELOPE_SCHEMA",
    "ENVELOPE_VERSION",
    "HANDLED_KEYWORDS",
    "Envelope",
    "complete",
    "fingerprint",
    "parse_draft",
    "validate",
    "violations",
]

ENVELOPE_VERSION: Final = 1
ENVELOPE_SCHEMA: Final[dict[str, Any]] = json.loads(
    resources.files("bus").joinpath("schemas/envelope.v1.json").read_text()
)
#: Draft fields a publisher may set; everything else the bus owns.
_DRAFT_FIELDS: Final = frozenset(
    {"version", "id", "tenant", "type", "time", "payload", "traceparent", "tracestate"}
)
_MAX_ERRORS: Final = 10


@dataclass(frozen=True, slots=True)
class Envelope:
    """A complete, validated envelope (``to_json`` is what Redis stores)."""

    id: str
    tenant: str
    type: str
    time: str
    payload: Any
    idempotency_key: str | None = None
    traceparent: str | None = None
    tracestate: str | None = None
    version: int = ENVELOPE_VERSION

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "version": self.version,
            "id": self.id,
            "tenant": self.tenant,
            "type": self.type,
            "time": self.time,
        }
        for name in ("idempotency_key", "traceparent", "tracestate"):
            value = getattr(self, name)
            if value is not None:
                doc[name] = value
        doc["payload"] = self.payload
        return doc

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Envelope:
        """An envelope from a document that already passed :func:`validate`."""
        return cls(
            id=doc["id"],
            tenant=doc["tenant"],
            type=doc["type"],
            time=doc["time"],
            payload=doc["payload"],
            idempotency_key=doc.get("idempotency_key"),
            traceparent=doc.get("traceparent"),
            tracestate=doc.get("tracestate"),
            version=doc["version"],
        )


def parse_draft(body: bytes) -> dict[str, Any]:
    """The publish request body as a JSON object, or 400."""
    try:
        draft = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise MalformedRequest("the message is not valid JSON", reasons=("invalid_json",)) from None
    if not isinstance(draft, dict):
        raise MalformedRequest("the message must be a JSON object", reasons=("not_an_object",))
    return draft


def complete(
    draft: Mapping[str, Any],
    *,
    tenant: str,
    idempotency_key: str | None = None,
    traceparent: str | None = None,
    tracestate: str | None = None,
    clock: Callable[[], float],
    new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
) -> Envelope:
    """The draft completed from the request's context and validated.

    Raises :class:`InvalidEnvelope` (422) for schema violations and unknown
    fields, :class:`TenantMismatch` (403) when the draft names another tenant.
    """
    unknown = sorted(set(draft) - _DRAFT_FIELDS)
    if unknown:
        errors = [
            {"pointer": f"/{name}", "message": "is set by the bus or unknown"} for name in unknown
        ]
        raise InvalidEnvelope(
            "the envelope has fields a publisher may not set", extra={"errors": errors}
        )
    if "tenant" in draft and draft["tenant"] != tenant:
        # SECURITY: the tenant is the caller's verified one, never the message's word.
        raise TenantMismatch("the envelope names another tenant than the caller's")
    doc: dict[str, Any] = {
        "version": draft.get("version", ENVELOPE_VERSION),
        "id": draft["id"] if "id" in draft else new_id(),
        "tenant": tenant,
        "time": draft["time"] if "time" in draft else _rfc3339(clock()),
    }
    if "type" in draft:
        doc["type"] = draft["type"]
    if idempotency_key is not None:
        doc["idempotency_key"] = idempotency_key
    for name, header in (("traceparent", traceparent), ("tracestate", tracestate)):
        value = draft.get(name, header)
        if value is not None:
            doc[name] = value
    if "payload" in draft:
        doc["payload"] = draft["payload"]  # any JSON value, null included
    validate(doc)
    return Envelope.from_dict(doc)


def validate(doc: Any) -> None:
    """Raise :class:`InvalidEnvelope` unless ``doc`` is a valid version 1 envelope."""
    errors = violations(doc)
    if errors:
        raise InvalidEnvelope(
            "the envelope does not match schema version 1", extra={"errors": errors}
        )


def violations(doc: Any) -> list[dict[str, str]]:
    """Where ``doc`` breaks envelope schema v1, as ``{"pointer", "message"}`` (at most 10).

    The checks are read from ``envelope.v1.json`` at import (required,
    additionalProperties, const, type string, maxLength, pattern, not
    pattern) and run by hand: jsonschema took ~1 ms per message, this a few
    µs. tests/test_bus_envelope.py holds both to the same verdicts. Patterns
    are anchored at the very end (``\\Z``), as ECMA-262's ``$`` is; Python's
    ``$`` would also accept a trailing newline. Messages come from the schema,
    never from the value.
    """
    if type(doc) is not dict:
        return [{"pointer": "/", "message": "must be of type object"}]
    errors = [
        {"pointer": "/", "message": f"{name!r} is a required property"}
        for name in _REQUIRED
        if name not in doc
    ]
    errors += [
        {"pointer": f"/{name}", "message": "has a property the schema does not allow"}
        for name in doc
        if name not in _PROPERTIES
    ]
    version = doc.get("version", ENVELOPE_VERSION)
    if type(version) not in (int, float) or version != ENVELOPE_VERSION:
        errors.append({"pointer": "/version", "message": f"must be {ENVELOPE_VERSION!r}"})
    for name, rule in _STRING_RULES.items():
        if name in doc:
            message = rule.check(doc[name])
            if message is not None:
                errors.append({"pointer": f"/{name}", "message": message})
    if not errors:
        try:
            dt.datetime.fromisoformat(doc["time"])
        except ValueError:
            errors.append({"pointer": "/time", "message": "is not a valid RFC 3339 date-time"})
    return errors[:_MAX_ERRORS]


@dataclass(frozen=True, slots=True)
class _StringRule:
    max_length: int | None
    pattern: re.Pattern[str] | None
    forbidden: re.Pattern[str] | None

    def check(self, value: Any) -> str | None:
        if type(value) is not str:
            return "must be of type string"
        if self.max_length is not None and len(value) > self.max_length:
            return f"must be at most {self.max_length} characters"
        if self.pattern is not None and self.pattern.search(value) is None:
            return f"must match {self.pattern.pattern}"
        if self.forbidden is not None and self.forbidden.search(value) is not None:
            return "is not allowed (all-zero trace or span id)"
        return None


#: Schema keywords violations() implements; the tests fail if the schema uses others.
HANDLED_KEYWORDS: Final = frozenset({"type", "const", "maxLength", "pattern", "not", "description"})


def _ecma(pattern: str) -> re.Pattern[str]:
    # ECMA-262 "$" (no multiline) is end of input; Python's also matches before a final "\n".
    return re.compile(pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern)


def _string_rules(schema: Mapping[str, Any]) -> dict[str, _StringRule]:
    rules: dict[str, _StringRule] = {}
    for name, spec in schema["properties"].items():
        if spec.get("type") != "string":
            continue
        forbidden = spec.get("not", {}).get("pattern")
        rules[name] = _StringRule(
            max_length=spec.get("maxLength"),
            pattern=_ecma(spec["pattern"]) if "pattern" in spec else None,
            forbidden=_ecma(forbidden) if forbidden else None,
        )
    return rules


_PROPERTIES: Final = frozenset(ENVELOPE_SCHEMA["properties"])
_REQUIRED: Final = tuple(ENVELOPE_SCHEMA["required"])
_STRING_RULES: Final = _string_rules(ENVELOPE_SCHEMA)


def fingerprint(envelope: Envelope) -> str:
    """What a retry under the same ``Idempotency-Key`` must repeat: type and payload."""
    canonical = orjson.dumps([envelope.type, envelope.payload], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()[:32]


def _rfc3339(timestamp: float) -> str:
    moment = dt.datetime.fromtimestamp(timestamp, tz=dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
