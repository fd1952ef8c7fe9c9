"""The record format: canonical bytes, domain-separated hashes, the genesis link."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import pytest
import rfc8785

import audit
from audit.record import (
    DOMAIN,
    Entry,
    Record,
    RecordFormatError,
    canonical,
    digest_document,
    genesis_hash,
    record_hash,
    rfc3339,
)
from tests.audit_support import entry


def _random_string(rng: random.Random) -> str:
    alphabet = [
        *map(chr, range(0x00, 0x80)),
        "é",
        "\u2028",
        "\u2029",
        "\ufeff",
        "\ufb01",
        "\uffff",
        "\U0001f600",
        "\U00010000",
        "\\",
        '"',
    ]
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randint(0, 7 if depth < 3 else 4)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, 1, -1, 2**53 - 1, -(2**53) + 1, rng.randint(-(10**9), 10**9)])
    if kind in (3, 4):
        return _random_string(rng)
    if kind == 5:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {_random_string(rng): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 5))}


class TestCanonical:
    @pytest.mark.parametrize(
        "document",
        [
            pytest.param({"b": 1, "a": [True, None, "x"]}, id="key-order"),
            pytest.param({"s": '\x00\x1f\x7f\u2028"\\/'}, id="escapes"),
            pytest.param({"\ufb01": 1, "\U0001f600": 2, "é": 3}, id="astral-key-order"),
            pytest.param({"f": 1.5, "g": 1e21, "h": -0.0}, id="floats"),
            pytest.param({"n": 2**53 - 1, "m": -(2**53) + 1}, id="integer-limits"),
        ],
    )
    def test_matches_the_reference_implementation(self, document: dict[str, Any]) -> None:
        """The fast path and the fallback both give exactly the RFC 8785 bytes."""
        assert canonical(document) == rfc8785.dumps(document)

    def test_random_documents_match_the_reference(self) -> None:
        """2000 random documents (control chars, astral keys, limits) canonicalise alike."""
        rng = random.Random(8785)  # noqa: S311 - reproducible test data, not secrets
        for _ in range(2000):
            document = {_random_string(rng): _random_value(rng) for _ in range(rng.randint(0, 6))}
            assert canonical(document) == rfc8785.dumps(document), document

    def test_integers_outside_ijson_are_refused(self) -> None:
        """An integer past 2**53 has no canonical form: an error, never a silent rounding."""
        with pytest.raises(ValueError, match="safe integer"):
            canonical({"n": 2**53})


class TestHashes:
    def test_record_hash_is_domain_separated(self) -> None:
        """hash = sha256("nops-audit-record-v1\\0" + JCS(document without hash))."""
        record = Record.seal(entry(), seq=1, chain_id="c", ts=rfc3339(0), prev_hash="p")
        document = record.to_document()
        body = {k: v for k, v in document.items() if k != "hash"}
        assert record.hash == hashlib.sha256(DOMAIN + rfc8785.dumps(body)).hexdigest()
        assert record.hash != hashlib.sha256(rfc8785.dumps(body)).hexdigest()
        assert record_hash(document) == record.hash

    @pytest.mark.parametrize(
        "changes",
        [
            pytest.param({}, id="fast-path"),
            pytest.param({"tenant": "\U0001f600"}, id="astral-value"),
            pytest.param({"counts": {"\U0001f600|x": 1, "\uffff|x": 2}}, id="astral-keys"),
        ],
    )
    def test_sealed_line_is_the_canonical_stored_form(self, changes: dict[str, Any]) -> None:
        """The line written to disk is JCS of the document, hash included, plus a newline."""
        summary: dict[str, Any] = {"outcome": "summary"} if "counts" in changes else {}
        sealed = Record.seal(
            entry(**summary, **changes),
            seq=1,
            chain_id="c",
            ts="t",
            prev_hash="p",
        )
        document = sealed.to_document()
        assert sealed.to_line() == rfc8785.dumps(document) + b"\n"
        assert record_hash(document) == sealed.hash

    def test_every_field_is_covered(self) -> None:
        """Changing, adding or removing any member changes the hash."""
        document = Record.seal(
            entry(), seq=7, chain_id="c", ts=rfc3339(0), prev_hash="p"
        ).to_document()
        original = record_hash(document)
        for name in document:
            if name == "hash":
                continue
            changed = dict(document)
            changed[name] = "tampered" if document[name] != "tampered" else "other"
            assert record_hash(changed) != original, name
            removed = {k: v for k, v in document.items() if k != name}
            assert record_hash(removed) != original, name
        assert record_hash({**document, "extra": None}) != original

    def test_genesis_names_the_chain(self) -> None:
        """The first record links to a hash of its chain id: chains cannot swap heads."""
        assert genesis_hash("a") != genesis_hash("b")
        assert len(genesis_hash("a")) == 64

    def test_input_digest_is_plain_sha256_of_jcs(self) -> None:
        """Anyone with the policy input recomputes the digest with sha256sum."""
        document: dict[str, Any] = {"version": 1, "request": {"path": "/x", "method": "GET"}}
        assert digest_document(document) == hashlib.sha256(rfc8785.dumps(document)).hexdigest()


class TestRecord:
    def test_round_trip(self) -> None:
        """A stored document reads back to the same record."""
        record = Record.seal(
            entry(reasons=("a", "b")), seq=3, chain_id="c", ts=rfc3339(1.5), prev_hash="p"
        )
        assert Record.from_document(record.to_document()) == record

    def test_summary_records_carry_window_and_counts(self) -> None:
        """Only summary records have window_start, window_end and counts."""
        summary = Entry(
            outcome="summary", window_start="s", window_end="e", counts={"ip:1|no-route": 3}
        )
        document = Record.seal(summary, seq=1, chain_id="c", ts="t", prev_hash="p").to_document()
        assert document["counts"] == {"ip:1|no-route": 3}
        assert {"window_start", "window_end"} <= set(document)
        plain = Record.seal(entry(), seq=1, chain_id="c", ts="t", prev_hash="p").to_document()
        assert "counts" not in plain

    def test_timestamps_are_rfc3339_utc_microseconds(self) -> None:
        """ts looks like 2023-11-14T22:13:20.000001Z."""
        assert rfc3339(1_700_000_000.000001) == "2023-11-14T22:13:20.000001Z"

    @pytest.mark.parametrize(
        "document",
        [
            pytest.param({}, id="empty"),
            pytest.param({"seq": "1"}, id="missing-fields"),
        ],
    )
    def test_malformed_documents_are_refused(self, document: dict[str, Any]) -> None:
        """A document that is not a record raises RecordFormatError."""
        with pytest.raises(RecordFormatError):
            Record.from_document(document)

    def test_unknown_outcome_is_refused(self) -> None:
        """outcome is one of allow, deny, error, summary."""
        with pytest.raises(ValueError, match="outcome"):
            Entry(outcome="maybe")  # type: ignore[arg-type]


class TestPublicApi:
    def test_all_names_exist(self) -> None:
        """The package's public API is exactly __all__, and every name resolves."""
        for name in audit.__all__:
            assert hasattr(audit, name), name
        assert sorted(audit.__all__) == audit.__all__

    def test_audit_does_not_import_the_gateway(self) -> None:
        """audit/ is importable on its own: no module of it imports gateway."""
        import pathlib

        root = pathlib.Path(audit.__file__).parent
        for source in root.rglob("*.py"):
            text = source.read_text()
            assert "import gateway" not in text, source
            assert "from gateway" not in text, source
