"""Helpers shared by the audit tests: build logs, read them back, load keys."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from audit import AuditLog, Entry, Record
from audit.checkpoint import DEFAULT_KEY_NAME, key_id, load_public_key, public_key_path
from audit.setup import AuditSettings, open_audit_log


def settings(directory: Path, **changes: Any) -> AuditSettings:
    """File-store settings with everything under ``directory``."""
    values: dict[str, Any] = {
        "path": directory / "audit.jsonl",
        "spool_path": directory / "spool.jsonl",
        "chain_id": "test-chain",
    }
    values.update(changes)
    return AuditSettings(**values)


async def open_log(directory: Path, **changes: Any) -> AuditLog:
    return await open_audit_log(settings(directory, **changes))


def entry(n: int = 0, **changes: Any) -> Entry:
    values: dict[str, Any] = {
        "outcome": "allow",
        "stage": "audit",
        "request_id": f"req-{n}",
        "decision_id": f"dec-{n}",
        "tenant": "acme",
        "subject": "svc-42",
        "reasons": ("allowed",),
        "policy_revision": "rev-1",
        "input_digest": "0" * 64,
    }
    values.update(changes)
    return Entry(**values)


def read_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def read_records(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in read_lines(path)]


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def public_key_file(directory: Path) -> Path:
    return directory / public_key_path(Path(DEFAULT_KEY_NAME)).name


def trusted_keys(directory: Path) -> dict[str, Ed25519PublicKey]:
    """The public key the log in ``directory`` signs its checkpoints with, by key id."""
    key = load_public_key(public_key_file(directory))
    return {key_id(key): key}


@dataclass
class HeldWrite:
    """What :func:`append_behind_a_held_write` saw."""

    #: The appended records, the first one first.
    records: list[Record]
    #: Records per durable write of the store, in order.
    writes: list[int]
    #: ``writes`` as it was while the first write was still held.
    writes_while_held: list[int]


async def append_behind_a_held_write(log: AuditLog, count: int) -> HeldWrite:
    """Append one entry, hold the store's write of it in flight (as a slow fsync or
    commit would), append ``count`` more meanwhile, then let the write finish."""
    real_write = log.store.write
    in_flight = asyncio.Event()
    release = asyncio.Event()
    writes: list[int] = []

    async def held_write(records: Sequence[Record]) -> None:
        writes.append(len(records))
        if len(writes) == 1:
            in_flight.set()
            await release.wait()
        await real_write(records)

    log.store.write = held_write  # type: ignore[method-assign]
    first = asyncio.ensure_future(log.append(entry(0)))
    await in_flight.wait()
    later = [asyncio.ensure_future(log.append(entry(n))) for n in range(1, count + 1)]
    for _ in range(5):
        await asyncio.sleep(0)  # the writer is stuck in write: nothing else starts
    writes_while_held = list(writes)
    release.set()
    records = await asyncio.gather(first, *later)
    return HeldWrite(records, writes, writes_while_held)
