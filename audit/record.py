"""The audit record: fields, canonical bytes and the domain-separated hash.

A record is hashed as ``sha256(DOMAIN + JCS(document without "hash"))``, where
JCS is the RFC 8785 JSON Canonicalization Scheme. The document is whatever is
stored (a JSONL line, a PostgreSQL text column): a verifier recomputes the hash
from the stored document, so any added, removed or changed field is caught,
including fields a later version of this module might add.

The first record of a chain links to :func:`genesis_hash` of its chain id, so a
record cannot be moved from the head of one chain to another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

import orjson
import rfc8785

__all__ = [
    "DOMAIN",
    "GENESIS_DOMAIN",
    "Entry",
    "Outcome",
    "Record",
    "RecordFormatError",
    "canonical",
    "digest_document",
    "genesis_hash",
    "record_hash",
    "rfc3339",
]

#: Domain separation: a record hash can never collide with any other sha256 use.
DOMAIN: Final = b"nops-audit-record-v1\x00"
GENESIS_DOMAIN: Final = b"nops-audit-genesis-v1\x00"

Outcome = Literal["allow", "deny", "error", "summary"]
OUTCOMES: Final = frozenset({"allow", "deny", "error", "summary"})

#: Fields every record carries, in the order they are documented.
CORE_FIELDS: Final = (
    "seq",
    "chain_id",
    "ts",
    "request_id",
    "decision_id",
    "tenant",
    "subject",
    "stage",
    "outcome",
    "status",
    "code",
    "reasons",
    "policy_revision",
    "input_digest",
    "prev_hash",
    "hash",
)
SUMMARY_FIELDS: Final = ("window_start", "window_end", "counts")


class RecordFormatError(ValueError):
    """A stored document is not a well-formed audit record."""


_INT_LIMIT: Final = 2**53 - 1


def canonical(document: Any) -> bytes:
    """RFC 8785 canonical JSON bytes of ``document`` (any JSON value).

    Fast path: for documents without floats, with integers inside the I-JSON
    range and with no key outside the Basic Multilingual Plane, orjson with
    sorted keys produces exactly the RFC 8785 bytes (same string escapes; key
    order by code point equals order by UTF-16 unit in the BMP), about 40
    times faster than the reference implementation. Anything else goes
    through ``rfc8785`` itself. ``tests/test_audit_record.py`` checks both agree.
    """
    if _orjson_is_canonical(document):
        try:
            return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:
            pass  # lone surrogates and the like: the reference decides
    return rfc8785.dumps(dict(document) if isinstance(document, Mapping) else document)


def _orjson_is_canonical(value: Any) -> bool:
    # Exact types only: subclasses (enums ...) take the reference path.
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is str or item is None or kind is bool:
            continue
        if kind is int:
            if not -_INT_LIMIT <= item <= _INT_LIMIT:
                return False
        elif kind is dict:
            for key, member in item.items():
                if type(key) is not str or not (key.isascii() or max(key) <= "\uffff"):
                    return False
                if type(member) is not str:
                    stack.append(member)
        elif kind is list or kind is tuple:
            stack.extend(item)
        else:
            return False
    return True


def digest_document(document: Mapping[str, Any]) -> str:
    """Hex sha256 of a document's canonical JSON (the policy input digest).

    Not domain-separated on purpose: anyone holding the policy input can
    recompute it with any RFC 8785 implementation and ``sha256sum``.
    """
    return hashlib.sha256(canonical(document)).hexdigest()


def record_hash(document: Mapping[str, Any]) -> str:
    """The hash of a record document (its own ``hash`` member is left out)."""
    body = {k: v for k, v in document.items() if k != "hash"}
    return hashlib.sha256(DOMAIN + canonical(body)).hexdigest()


def genesis_hash(chain_id: str) -> str:
    """``prev_hash`` of a chain's first record."""
    return hashlib.sha256(GENESIS_DOMAIN + chain_id.encode()).hexdigest()


def rfc3339(ts: float) -> str:
    """RFC 3339 UTC with microseconds: ``2025-11-22T08:26:40.123456Z``."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class Entry:
    """What a caller appends; the chain adds seq, chain id, time and hashes."""

    outcome: Outcome
    stage: str | None = None
    request_id: str | None = None
    decision_id: str | None = None
    tenant: str | None = None
    #: The subject's ``sub`` only: never a token or a claim set.
    subject: str | None = None
    status: int | None = None
    #: The error code (problem type suffix) for denials and errors.
    code: str | None = None
    reasons: tuple[str, ...] = ()
    policy_revision: str | None = None
    #: sha256 of the RFC 8785 policy input document (:func:`digest_document`).
    input_digest: str | None = None
    # Summary records only:
    window_start: str | None = None
    window_end: str | None = None
    counts: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {self.outcome!r}")


@dataclass(frozen=True, slots=True)
class Record:
    """A sealed record: an entry at a place in a chain."""

    seq: int
    chain_id: str
    ts: str
    entry: Entry
    prev_hash: str
    hash: str
    #: The stored line, when sealing already produced it (not part of equality).
    line: bytes = field(default=b"", compare=False, repr=False)

    @classmethod
    def seal(cls, entry: Entry, *, seq: int, chain_id: str, ts: str, prev_hash: str) -> Record:
        """Place ``entry`` after ``prev_hash``, compute its hash and its stored line."""
        document = _document(entry, seq=seq, chain_id=chain_id, ts=ts, prev_hash=prev_hash)
        if not _orjson_is_canonical(document):
            return cls(seq, chain_id, ts, entry, prev_hash, record_hash(document))
        # The common case, checked once: both serialisations take the fast path.
        digest = hashlib.sha256(DOMAIN + orjson.dumps(document, option=orjson.OPT_SORT_KEYS))
        document["hash"] = digest.hexdigest()
        line = orjson.dumps(document, option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE)
        return cls(seq, chain_id, ts, entry, prev_hash, document["hash"], line)

    def to_document(self) -> dict[str, Any]:
        """The stored form, ``hash`` included."""
        document = _document(
            self.entry, seq=self.seq, chain_id=self.chain_id, ts=self.ts, prev_hash=self.prev_hash
        )
        document["hash"] = self.hash
        return document

    def to_line(self) -> bytes:
        """One JSONL line: the canonical JSON of the stored form and a newline."""
        return self.line or canonical(self.to_document()) + b"\n"

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> Record:
        """Read a stored document back; the hash is taken as stored, not checked."""
        try:
            outcome = document["outcome"]
            counts = document.get("counts") or {}
            entry = Entry(
                outcome=outcome,
                stage=document["stage"],
                request_id=document["request_id"],
                decision_id=document["decision_id"],
                tenant=document["tenant"],
                subject=document["subject"],
                status=document["status"],
                code=document["code"],
                reasons=tuple(document["reasons"]),
                policy_revision=document["policy_revision"],
                input_digest=document["input_digest"],
                window_start=document.get("window_start"),
                window_end=document.get("window_end"),
                counts={str(k): int(v) for k, v in counts.items()},
            )
            record = cls(
                seq=document["seq"],
                chain_id=document["chain_id"],
                ts=document["ts"],
                entry=entry,
                prev_hash=document["prev_hash"],
                hash=document["hash"],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RecordFormatError(f"not an audit record: {exc}") from None
        if not isinstance(record.seq, int) or isinstance(record.seq, bool) or record.seq < 1:
            raise RecordFormatError("seq must be a positive integer")
        return record


def _document(entry: Entry, *, seq: int, chain_id: str, ts: str, prev_hash: str) -> dict[str, Any]:
    document: dict[str, Any] = {
        "seq": seq,
        "chain_id": chain_id,
        "ts": ts,
        "request_id": entry.request_id,
        "decision_id": entry.decision_id,
        "tenant": entry.tenant,
        "subject": entry.subject,
        "stage": entry.stage,
        "outcome": entry.outcome,
        "status": entry.status,
        "code": entry.code,
        "reasons": list(entry.reasons),
        "policy_revision": entry.policy_revision,
        "input_digest": entry.input_digest,
        "prev_hash": prev_hash,
    }
    if entry.outcome == "summary":
        document["window_start"] = entry.window_start
        document["window_end"] = entry.window_end
        document["counts"] = dict(entry.counts)
    return document
