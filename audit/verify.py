"""Offline verification of a chain and its signed checkpoints.

The verifier trusts nothing stored next to the records but the public key it
is given. It walks the records in storage order and checks, for each one, its
own hash, its sequence number and its link to the previous record; at the
first break it classifies the damage from what follows:

==================  ==========================================================
kind                what it means (first bad ``seq``)
==================  ==========================================================
modified            a record's content changed (that record; or the earliest
                    seq a checkpoint proves was rewritten)
deleted             a record is missing: the sequence jumps (the missing seq)
inserted            a record that does not belong sits in the chain (the seq
                    at which it appears)
reordered           a genuine record appears out of place (the first seq out
                    of place)
truncated           the log ends before a signed checkpoint says it did
                    (the first missing seq)
forged-checkpoint   a checkpoint's signature, hash or link to the previous
                    checkpoint does not verify (its seq)
==================  ==========================================================

Checkpoints come from beside the log (``<log>.checkpoints.jsonl`` or the
``audit_checkpoints`` table) and, better, from an exported copy kept
elsewhere (``--checkpoints``): an exported copy is what makes cutting the
tail of the log *and* of its stored checkpoints detectable.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from audit.checkpoint import GENESIS_CHECKPOINT, Checkpoint, CheckpointError
from audit.record import genesis_hash, record_hash
from audit.stores.file import checkpoints_path, iter_lines

__all__ = [
    "DAMAGE_KINDS",
    "ChainVerifier",
    "Damage",
    "DamageKind",
    "Report",
    "load_checkpoint_documents",
    "verify_file",
    "verify_postgres",
    "verify_records",
]

DamageKind = Literal[
    "modified", "deleted", "inserted", "reordered", "truncated", "forged-checkpoint"
]
DAMAGE_KINDS: Final = (
    "modified",
    "deleted",
    "inserted",
    "reordered",
    "truncated",
    "forged-checkpoint",
)


@dataclass(frozen=True, slots=True)
class Damage:
    kind: DamageKind
    seq: int
    detail: str


@dataclass(slots=True)
class Report:
    chain_id: str | None = None
    records: int = 0
    #: The last seq of the intact prefix of the chain.
    last_seq: int = 0
    head_hash: str | None = None
    #: Checkpoints read (stored and exported) and how many of them verified.
    checkpoints_read: int = 0
    checkpoints: int = 0
    last_checkpoint_seq: int = 0
    damage: list[Damage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.damage

    @property
    def first(self) -> Damage | None:
        return min(self.damage, key=lambda d: d.seq) if self.damage else None

    def to_json(self) -> dict[str, Any]:
        document = asdict(self)
        document["intact"] = self.intact
        first = self.first
        document["first"] = asdict(first) if first else None
        return document


@dataclass(frozen=True, slots=True)
class _Parsed:
    """What the verifier needs of one stored record; ``ok`` False if unreadable."""

    ok: bool
    seq: int = 0
    chain_id: str = ""
    prev_hash: str = ""
    hash: str = ""
    self_ok: bool = False


def _parse(raw: bytes | str) -> _Parsed:
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _Parsed(ok=False)
    if not isinstance(document, dict):
        return _Parsed(ok=False)
    seq = document.get("seq")
    chain_id = document.get("chain_id")
    prev_hash = document.get("prev_hash")
    stored = document.get("hash")
    if (
        not isinstance(seq, int)
        or isinstance(seq, bool)
        or not isinstance(chain_id, str)
        or not isinstance(prev_hash, str)
        or not isinstance(stored, str)
    ):
        return _Parsed(ok=False)
    try:
        self_ok = record_hash(document) == stored
    except ValueError:  # not canonicalisable (e.g. an integer past 2**53)
        self_ok = False
    return _Parsed(True, seq, chain_id, prev_hash, stored, self_ok)


@dataclass(slots=True)
class _Break:
    before: _Parsed | None
    prev: _Parsed
    found: _Parsed
    after: _Parsed | None = None
    expected_seen_later: bool = False
    found_is_genuine: bool = False


class ChainVerifier:
    """Feed records in storage order, then :meth:`finish`; memory use is constant."""

    def __init__(self, chain_id: str | None = None, checkpoint_seqs: Iterable[int] = ()) -> None:
        self.chain_id = chain_id
        self.records = 0
        self._want = set(checkpoint_seqs)
        #: Hashes of intact records at the checkpointed seqs.
        self.hashes_at: dict[int, str] = {}
        self._prev: _Parsed | None = None
        self._before_prev: _Parsed | None = None
        self._break: _Break | None = None

    @property
    def last(self) -> _Parsed | None:
        return self._prev

    def feed(self, raw: bytes | str) -> None:
        record = _parse(raw)
        self.records += 1
        if self.chain_id is None and record.ok:
            self.chain_id = record.chain_id
        if self._break is None:
            prev = self._prev or self._genesis()
            if self._links(record, prev):
                self._before_prev = prev
                self._prev = record
                if record.seq in self._want:
                    self.hashes_at[record.seq] = record.hash
            else:
                self._break = _Break(before=self._before_prev, prev=prev, found=record)
            return
        # After the break: only what classifies it.
        found = self._break
        if found.after is None:
            found.after = record
        if record.ok and record.seq == found.prev.seq + 1:
            found.expected_seen_later = True
            if found.found.ok and found.found.prev_hash == record.hash:
                found.found_is_genuine = True
        if record.ok and found.found.ok and record.prev_hash == found.found.hash:
            found.found_is_genuine = True

    def finish(self) -> Damage | None:
        found = self._break
        if found is None:
            return None
        prev, record, after = found.prev, found.found, found.after
        expected = prev.seq + 1
        after_links = after is not None and self._links(after, prev)
        if not record.ok or not record.self_ok:
            if after_links:
                return Damage("inserted", expected, f"a foreign record sits before seq {expected}")
            return Damage("modified", expected, f"record {expected} does not match its hash")
        if record.seq == expected:
            if after_links:
                return Damage("inserted", expected, f"a second record claims seq {expected}")
            if prev.seq == 0:
                return Damage("modified", expected, "the first record does not start the chain")
            return Damage(
                "modified",
                prev.seq,
                f"record {prev.seq} was changed (record {expected} no longer links to it)",
            )
        if record.seq > expected:
            if not found.expected_seen_later:
                return Damage("deleted", expected, f"seq jumps from {prev.seq} to {record.seq}")
            if found.found_is_genuine:
                return Damage(
                    "reordered",
                    expected,
                    f"record {record.seq} appears where {expected} belongs",
                )
            return Damage("inserted", expected, f"a record claiming seq {record.seq} was added")
        before = found.before
        if (
            record.seq == prev.seq
            and before is not None
            and record.prev_hash == before.hash
            and after is not None
            and after.ok
            and after.prev_hash == record.hash
        ):
            # Two records claim prev.seq and both link back; the chain goes on
            # from the second, so the first one was slipped in.
            return Damage(
                "inserted", prev.seq, f"a forged record claims seq {prev.seq} before the real one"
            )
        return Damage(
            "inserted", expected, f"record {record.seq} appears again where {expected} belongs"
        )

    def _genesis(self) -> _Parsed:
        chain = self.chain_id or ""
        return _Parsed(True, 0, chain, "", genesis_hash(chain), True)

    def _links(self, record: _Parsed, prev: _Parsed) -> bool:
        return (
            record.ok
            and record.self_ok
            and record.seq == prev.seq + 1
            and record.prev_hash == prev.hash
            and record.chain_id == self.chain_id
        )


def _check_checkpoints(
    documents: Iterable[Mapping[str, Any]],
    keys: Mapping[str, Ed25519PublicKey],
    chain_id: str | None,
    report: Report,
) -> list[Checkpoint]:
    """The authentic checkpoints in order; the first forged one becomes damage."""
    good: list[Checkpoint] = []
    prev_hash = GENESIS_CHECKPOINT
    prev_seq = 0
    for document in documents:
        report.checkpoints_read += 1
        seq = document.get("seq") if isinstance(document.get("seq"), int) else prev_seq
        assert isinstance(seq, int)  # noqa: S101 - narrowed just above
        try:
            checkpoint = Checkpoint.from_document(document)
        except CheckpointError as exc:
            report.damage.append(Damage("forged-checkpoint", seq, f"checkpoint unreadable: {exc}"))
            break
        problem = checkpoint.problem(keys)
        if problem is None and checkpoint.chain_id != chain_id:
            problem = f"it belongs to chain {checkpoint.chain_id!r}"
        if problem is None and checkpoint.prev_checkpoint_hash != prev_hash:
            problem = "it does not link to the previous checkpoint (one was removed or replaced)"
        if problem is None and checkpoint.seq < prev_seq:
            problem = "its seq goes backwards"
        if problem is not None:
            report.damage.append(
                Damage("forged-checkpoint", checkpoint.seq, f"checkpoint at seq {seq}: {problem}")
            )
            break
        good.append(checkpoint)
        prev_hash, prev_seq = checkpoint.hash, checkpoint.seq
    report.checkpoints = len(good)
    report.last_checkpoint_seq = prev_seq
    return good


def _merge_checkpoints(
    stored: list[dict[str, Any]], exported: list[dict[str, Any]], report: Report
) -> list[dict[str, Any]]:
    """Stored and exported checkpoints, one per seq, in seq order."""
    by_seq: dict[int, dict[str, Any]] = {}
    for document in [*stored, *exported]:
        seq = document.get("seq")
        if not isinstance(seq, int):
            by_seq.setdefault(-len(by_seq) - 1, document)  # keep: it will fail as unreadable
            continue
        known = by_seq.get(seq)
        if known is not None and known != document:
            report.damage.append(
                Damage(
                    "forged-checkpoint",
                    seq,
                    f"two different checkpoints claim seq {seq} (stored vs exported)",
                )
            )
            continue
        by_seq[seq] = document
    return [by_seq[seq] for seq in sorted(by_seq)]


def verify_records(
    lines: Iterable[bytes | str],
    *,
    chain_id: str | None,
    checkpoints: list[dict[str, Any]],
    keys: Mapping[str, Ed25519PublicKey],
    report: Report | None = None,
) -> Report:
    """Verify records (in storage order) against checkpoint documents."""
    verifier = _verifier(chain_id, checkpoints)
    for line in lines:
        verifier.feed(line)
    return _conclude(verifier, checkpoints, keys, report or Report(chain_id=chain_id))


def _verifier(chain_id: str | None, checkpoints: list[dict[str, Any]]) -> ChainVerifier:
    return ChainVerifier(chain_id, [d["seq"] for d in checkpoints if isinstance(d.get("seq"), int)])


def _conclude(
    verifier: ChainVerifier,
    checkpoints: list[dict[str, Any]],
    keys: Mapping[str, Ed25519PublicKey],
    report: Report,
) -> Report:
    report.chain_id = verifier.chain_id
    report.records = verifier.records
    last = verifier.last
    report.last_seq = last.seq if last else 0
    report.head_hash = last.hash if last else None
    record_damage = verifier.finish()
    if record_damage is not None:
        report.damage.append(record_damage)
        report.last_seq = min(report.last_seq, record_damage.seq - 1)
        report.head_hash = None
    good = _check_checkpoints(checkpoints, keys, report.chain_id, report)
    intact_until = record_damage.seq - 1 if record_damage else report.last_seq
    previous = 0
    for checkpoint in good:
        if checkpoint.seq > intact_until:
            if record_damage is None:
                report.damage.append(
                    Damage(
                        "truncated",
                        report.last_seq + 1,
                        f"the log ends at seq {report.last_seq} but a signed checkpoint "
                        f"covers seq {checkpoint.seq}",
                    )
                )
            break
        if verifier.hashes_at.get(checkpoint.seq) != checkpoint.head_hash:
            report.damage.append(
                Damage(
                    "modified",
                    previous + 1,
                    f"records {previous + 1}..{checkpoint.seq} were rewritten: the chain no "
                    f"longer reaches the head hash signed at seq {checkpoint.seq}",
                )
            )
            break
        previous = checkpoint.seq
    if report.last_seq > report.last_checkpoint_seq and not report.damage:
        report.notes.append(
            f"records {report.last_checkpoint_seq + 1}..{report.last_seq} are not yet covered "
            "by a signed checkpoint"
        )
    return report


def load_checkpoint_documents(path: Path) -> list[dict[str, Any]]:
    """Checkpoints from an export (a JSON array) or a ``.checkpoints.jsonl`` file."""
    data = path.read_bytes()
    stripped = data.lstrip()
    if stripped.startswith(b"["):
        documents = orjson.loads(stripped)
        if not isinstance(documents, list) or not all(isinstance(d, dict) for d in documents):
            raise ValueError(f"{path} is not a JSON array of checkpoints")
        return documents
    result = []
    for line in data.splitlines(keepends=True):
        if line.endswith(b"\n"):  # a torn last line was never a checkpoint
            document = orjson.loads(line)
            if not isinstance(document, dict):
                raise ValueError(f"{path}: a line is not a checkpoint object")
            result.append(document)
    return result


def verify_file(
    path: Path,
    *,
    keys: Mapping[str, Ed25519PublicKey],
    exported: list[dict[str, Any]] | None = None,
    chain_id: str | None = None,
) -> Report:
    """Verify a JSONL log and its sibling checkpoints file."""
    report = Report(chain_id=chain_id)
    stored_path = checkpoints_path(path)
    stored = load_checkpoint_documents(stored_path) if stored_path.exists() else []
    checkpoints = _merge_checkpoints(stored, exported or [], report)

    def lines() -> Iterable[bytes]:
        for line, complete in iter_lines(path):
            if complete:
                yield line
            else:
                report.notes.append(
                    "the last line is torn (a crash during a write that was never "
                    "acknowledged); it is ignored"
                )

    return verify_records(
        lines(), chain_id=chain_id, checkpoints=checkpoints, keys=keys, report=report
    )


async def verify_postgres(
    dsn: str,
    chain_id: str,
    *,
    keys: Mapping[str, Ed25519PublicKey],
    exported: list[dict[str, Any]] | None = None,
) -> Report:
    """Verify one chain stored in PostgreSQL and its checkpoints."""
    import asyncpg

    from audit.stores.postgres import iter_checkpoints, iter_records

    report = Report(chain_id=chain_id)
    conn = await asyncpg.connect(dsn)
    try:
        stored = [orjson.loads(text) for text in await iter_checkpoints(conn, chain_id)]
        checkpoints = _merge_checkpoints(stored, exported or [], report)
        verifier = _verifier(chain_id, checkpoints)
        async for _, text in iter_records(conn, chain_id):
            verifier.feed(text)
    finally:
        await conn.close()
    return _conclude(verifier, checkpoints, keys, report)
