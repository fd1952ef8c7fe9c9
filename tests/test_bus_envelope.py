"""The message envelope: drafts completed from the request, validated against schema v1."""

from __future__ import annotations

from typing import Any

import pytest
from jsonschema import Draft202012Validator

import bus.envelope
from bus.envelope import (
    ENVELOPE_SCHEMA,
    HANDLED_KEYWORDS,
    Envelope,
    complete,
    fingerprint,
    parse_draft,
    validate,
    violations,
)
from bus.errors import InvalidEnvelope, MalformedRequest, TenantMismatch

NOW = 1_763_800_000.25
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _complete(draft: dict[str, Any], **kwargs: Any) -> Envelope:
    return complete(draft, tenant="acme", clock=lambda: NOW, new_id=lambda: "evt-1", **kwargs)


class TestComplete:
    def test_minimal_draft_gets_every_required_field(self) -> None:
        """A draft of type and payload gets version, id, tenant and time from the bus."""
        envelope = _complete({"type": "agent.registered", "payload": {"agent": "a1"}})
        assert envelope.to_dict() == {
            "version": 1,
            "id": "evt-1",
            "tenant": "acme",
            "type": "agent.registered",
            "time": "2025-11-22T08:26:40.250Z",
            "payload": {"agent": "a1"},
        }

    def test_request_context_fills_idempotency_and_trace(self) -> None:
        """The Idempotency-Key and trace headers land in the envelope."""
        envelope = _complete(
            {"type": "x", "payload": None},
            idempotency_key="key-1",
            traceparent=TRACEPARENT,
            tracestate="vendor=1",
        )
        assert envelope.idempotency_key == "key-1"
        assert envelope.traceparent == TRACEPARENT
        assert envelope.tracestate == "vendor=1"

    def test_publisher_fields_win_over_generated_ones(self) -> None:
        """A publisher's own id, time and traceparent are kept."""
        envelope = _complete(
            {
                "id": "order-42",
                "time": "2025-01-01T00:00:00+01:00",
                "type": "order.created",
                "payload": [1, 2],
                "traceparent": TRACEPARENT,
                "tenant": "acme",
                "version": 1,
            },
            traceparent="00-11111111111111111111111111111111-2222222222222222-01",
        )
        assert (envelope.id, envelope.time) == ("order-42", "2025-01-01T00:00:00+01:00")
        assert envelope.traceparent == TRACEPARENT

    def test_other_tenant_in_draft_is_refused(self) -> None:
        """A draft naming another tenant is a 403, never published for it."""
        with pytest.raises(TenantMismatch):
            _complete({"type": "x", "payload": 1, "tenant": "other"})

    @pytest.mark.parametrize(
        ("draft", "pointer"),
        [
            pytest.param({"payload": 1}, "/", id="no-type"),
            pytest.param({"type": "x"}, "/", id="no-payload"),
            pytest.param({"type": "Bad Type", "payload": 1}, "/type", id="type-pattern"),
            pytest.param({"type": "x" * 129, "payload": 1}, "/type", id="type-too-long"),
            pytest.param({"type": 7, "payload": 1}, "/type", id="type-not-string"),
            pytest.param({"type": "x", "payload": 1, "version": 2}, "/version", id="version-2"),
            pytest.param({"type": "x", "payload": 1, "id": "has space"}, "/id", id="bad-id"),
            pytest.param({"type": "x", "payload": 1, "time": "yesterday"}, "/time", id="time"),
            pytest.param(
                {"type": "x", "payload": 1, "time": "2025-13-40T00:00:00Z"},
                "/time",
                id="time-impossible-date",
            ),
            pytest.param(
                {"type": "x", "payload": 1, "traceparent": "00-abc-def-01"},
                "/traceparent",
                id="traceparent",
            ),
            pytest.param(
                {
                    "type": "x",
                    "payload": 1,
                    "traceparent": "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
                },
                "/traceparent",
                id="traceparent-zero-trace-id",
            ),
            pytest.param(
                {"type": "x", "payload": 1, "tracestate": "é"}, "/tracestate", id="tracestate"
            ),
            pytest.param(
                {"type": "x", "payload": 1, "idempotency_key": "k"},
                "/idempotency_key",
                id="idempotency-key-is-the-bus-s",
            ),
            pytest.param({"type": "x", "payload": 1, "extra": True}, "/extra", id="unknown-field"),
        ],
    )
    def test_invalid_drafts_name_the_field(self, draft: dict[str, Any], pointer: str) -> None:
        """Each invalid draft is a 422 whose errors point at the field at fault."""
        with pytest.raises(InvalidEnvelope) as caught:
            _complete(draft)
        pointers = [error["pointer"] for error in caught.value.extra["errors"]]
        assert pointer in pointers

    def test_errors_never_quote_the_value(self) -> None:
        """Validation messages come from the schema, not from the rejected data."""
        with pytest.raises(InvalidEnvelope) as caught:
            _complete({"type": "SECRET-VALUE", "payload": 1})
        assert "SECRET-VALUE" not in str(caught.value.extra)


class TestParseDraft:
    @pytest.mark.parametrize(
        ("body", "reason"),
        [
            pytest.param(b"{", "invalid_json", id="truncated"),
            pytest.param(b"", "invalid_json", id="empty"),
            pytest.param(b"\xff\xfe", "invalid_json", id="not-utf8"),
            pytest.param(b"[1]", "not_an_object", id="array"),
            pytest.param(b'"x"', "not_an_object", id="string"),
        ],
    )
    def test_malformed_bodies(self, body: bytes, reason: str) -> None:
        """A body that is not a JSON object is a 400 with its reason."""
        with pytest.raises(MalformedRequest) as caught:
            parse_draft(body)
        assert caught.value.reasons == (reason,)


class TestSchema:
    def test_schema_is_valid_draft_2020_12(self) -> None:
        """The shipped schema is itself a valid JSON Schema."""
        Draft202012Validator.check_schema(ENVELOPE_SCHEMA)

    def test_completed_envelope_round_trips(self) -> None:
        """to_json output validates and reads back to the same envelope."""
        envelope = _complete({"type": "x", "payload": {"k": [1, None]}}, traceparent=TRACEPARENT)
        import orjson

        doc = orjson.loads(envelope.to_json())
        validate(doc)
        assert Envelope.from_dict(doc) == envelope

    def test_public_api_is_all(self) -> None:
        """The module exports exactly its documented names."""
        public = {n for n in vars(bus.envelope) if not n.startswith("_")}
        assert set(bus.envelope.__all__) <= public


VALID: dict[str, Any] = {
    "version": 1,
    "id": "evt-1",
    "tenant": "acme",
    "type": "agent.registered",
    "time": "2025-11-22T08:26:40.250Z",
    "payload": {"a": 1},
}


def _variant(**changes: Any) -> dict[str, Any]:
    doc = {**VALID, **changes}
    return {k: v for k, v in doc.items() if v is not _DROP}


_DROP = object()

#: Documents on both sides of every rule, for the agreement test.
CORPUS = [
    pytest.param(VALID, id="valid"),
    pytest.param(_variant(version=1.0), id="version-1.0"),
    pytest.param(_variant(version=True), id="version-true"),
    pytest.param(_variant(version="1"), id="version-string"),
    pytest.param(_variant(version=2), id="version-2"),
    pytest.param(_variant(version=_DROP), id="no-version"),
    pytest.param(_variant(id=_DROP), id="no-id"),
    pytest.param(_variant(id=""), id="empty-id"),
    pytest.param(_variant(id="a" * 128), id="id-128"),
    pytest.param(_variant(id="a" * 129), id="id-129"),
    pytest.param(_variant(id="-a"), id="id-dash-first"),
    pytest.param(_variant(id="urn:x:1.2_3"), id="id-urn"),
    pytest.param(_variant(id=7), id="id-int"),
    pytest.param(_variant(tenant="a" * 65), id="tenant-65"),
    pytest.param(_variant(tenant="a:b"), id="tenant-colon"),
    pytest.param(_variant(type="a.b.c"), id="type-dotted"),
    pytest.param(_variant(type="a..b"), id="type-double-dot"),
    pytest.param(_variant(type="A"), id="type-upper"),
    pytest.param(_variant(type="a" * 128), id="type-128"),
    pytest.param(_variant(type="a" * 129), id="type-129"),
    pytest.param(_variant(time="2025-11-22T08:26:40+01:00"), id="time-offset"),
    pytest.param(_variant(time="2025-11-22T08:26:40.123456789Z"), id="time-nanos"),
    pytest.param(_variant(time="2025-11-22 08:26:40Z"), id="time-space"),
    pytest.param(_variant(time=1763800000), id="time-number"),
    pytest.param(_variant(idempotency_key="k" * 255), id="idem-255"),
    pytest.param(_variant(idempotency_key="k" * 256), id="idem-256"),
    pytest.param(_variant(idempotency_key="a b"), id="idem-space"),
    pytest.param(_variant(traceparent=TRACEPARENT), id="traceparent"),
    pytest.param(_variant(traceparent=TRACEPARENT.upper()), id="traceparent-upper"),
    pytest.param(
        _variant(traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
        id="traceparent-zero-span",
    ),
    pytest.param(_variant(tracestate="a=1,b=2"), id="tracestate"),
    pytest.param(_variant(tracestate="x" * 513), id="tracestate-513"),
    pytest.param(_variant(tracestate="\t"), id="tracestate-tab"),
    pytest.param(_variant(payload=None), id="payload-null"),
    pytest.param(_variant(payload=_DROP), id="no-payload"),
    pytest.param(_variant(extra=1), id="extra-field"),
    pytest.param([VALID], id="array"),
    pytest.param(None, id="null"),
]


class TestValidatorAgreesWithSchema:
    @pytest.mark.parametrize("doc", CORPUS)
    def test_same_verdict_as_jsonschema(self, doc: Any) -> None:
        """The hand-run checks accept exactly what jsonschema accepts under the v1 schema."""
        reference = Draft202012Validator(ENVELOPE_SCHEMA).is_valid(doc)
        assert (violations(doc) == []) == reference

    def test_schema_uses_only_handled_keywords(self) -> None:
        """A schema change the hand-run checks do not implement fails here, not in production."""
        top = {"$schema", "$id", "title", "description", "type", "additionalProperties"}
        assert set(ENVELOPE_SCHEMA) <= top | {"required", "properties"}
        assert ENVELOPE_SCHEMA["additionalProperties"] is False
        for name, spec in ENVELOPE_SCHEMA["properties"].items():
            assert set(spec) <= HANDLED_KEYWORDS, name
            assert spec.get("type", "string") == "string" or name == "payload", name
            if "not" in spec:
                assert set(spec["not"]) == {"pattern"}, name
        assert ENVELOPE_SCHEMA["properties"]["version"] == {
            "description": ENVELOPE_SCHEMA["properties"]["version"]["description"],
            "const": 1,
        }

    @pytest.mark.parametrize("field", ["id", "tenant", "type", "idempotency_key", "traceparent"])
    def test_trailing_newline_is_refused(self, field: str) -> None:
        """Patterns end at the end of input as in ECMA-262 (Python's $ allows a final newline)."""
        value = {"traceparent": TRACEPARENT}.get(field, "abc") + "\n"
        assert [e["pointer"] for e in violations(_variant(**{field: value}))] == [f"/{field}"]

    def test_impossible_date_is_refused(self) -> None:
        """The time must be a real date-time, not just look like one."""
        errors = violations(_variant(time="2025-02-30T00:00:00Z"))
        assert errors == [{"pointer": "/time", "message": "is not a valid RFC 3339 date-time"}]


class TestFingerprint:
    def test_same_type_and_payload_match_whatever_the_key_order(self) -> None:
        """Retries built afresh (new id, time, key order) fingerprint the same."""
        first = _complete({"type": "x", "payload": {"a": 1, "b": 2}})
        again = complete(
            {"type": "x", "payload": {"b": 2, "a": 1}},
            tenant="acme",
            clock=lambda: NOW + 5,
            new_id=lambda: "evt-2",
        )
        assert fingerprint(first) == fingerprint(again)

    def test_different_payload_differs(self) -> None:
        """A different payload is a different message."""
        assert fingerprint(_complete({"type": "x", "payload": 1})) != fingerprint(
            _complete({"type": "x", "payload": 2})
        )
