"""The cluster store: PostgreSQL via asyncpg, one INSERT statement (one transaction) per batch.

Every gateway instance writes its own chain (``chain_id``), so replicas never
contend for a row. ``record`` holds the canonical JSON document exactly as
hashed (text, not jsonb: jsonb would reject a NUL escape and re-order keys);
the other columns are copies for querying and are not trusted by ``verify``.

A trigger refuses UPDATE, DELETE and TRUNCATE on both tables. That is a guard
against accidents, not the security property: a superuser can disable it,
which is why the chain and the signed checkpoints exist.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any, Final

import asyncpg
import orjson

from audit.record import Record, RecordFormatError, canonical, record_hash
from audit.stores import Head, StoreError

__all__ = ["SCHEMA", "PostgresStore", "application_name", "iter_checkpoints", "iter_records"]

_log = logging.getLogger("audit.postgres")

# Serialises schema creation between replicas starting at once.
_DDL_LOCK: Final = 0x6E6F7073_61756474  # "nopsaudt"

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS audit_records (
    chain_id   text        NOT NULL,
    seq        bigint      NOT NULL CHECK (seq > 0),
    ts         timestamptz NOT NULL,
    request_id text,
    tenant     text,
    outcome    text        NOT NULL,
    code       text,
    hash       text        NOT NULL,
    record     text        NOT NULL,
    PRIMARY KEY (chain_id, seq)
);
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    chain_id   text   NOT NULL,
    seq        bigint NOT NULL,
    hash       text   NOT NULL,
    checkpoint text   NOT NULL,
    PRIMARY KEY (chain_id, seq)
);
CREATE OR REPLACE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit tables are append-only (% on %)', TG_OP, TG_TABLE_NAME;
END $$;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'audit_records_append_only') THEN
        CREATE TRIGGER audit_records_append_only BEFORE UPDATE OR DELETE ON audit_records
            FOR EACH ROW EXECUTE FUNCTION audit_append_only();
        CREATE TRIGGER audit_records_no_truncate BEFORE TRUNCATE ON audit_records
            FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
        CREATE TRIGGER audit_checkpoints_append_only BEFORE UPDATE OR DELETE ON audit_checkpoints
            FOR EACH ROW EXECUTE FUNCTION audit_append_only();
    END IF;
END $$;
"""

_SCHEMA_READY: Final = """
SELECT to_regclass('audit_records') IS NOT NULL
   AND to_regclass('audit_checkpoints') IS NOT NULL
   AND EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'audit_records_append_only')
"""
_INSERT: Final = """
INSERT INTO audit_records (chain_id, seq, ts, request_id, tenant, outcome, code, hash, record)
SELECT $1, * FROM unnest(
    $2::bigint[], $3::timestamptz[], $4::text[], $5::text[], $6::text[], $7::text[],
    $8::text[], $9::text[]
)
"""
_HEAD: Final = """
SELECT record FROM audit_records WHERE chain_id = $1 ORDER BY seq DESC LIMIT 1
"""
_LAST_CHECKPOINT: Final = """
SELECT checkpoint FROM audit_checkpoints WHERE chain_id = $1 ORDER BY seq DESC LIMIT 1
"""
_INSERT_CHECKPOINT: Final = """
INSERT INTO audit_checkpoints (chain_id, seq, hash, checkpoint) VALUES ($1, $2, $3, $4)
"""

#: Exceptions that mean "the database could not be used", as opposed to a bug.
#: InternalClientError: asyncpg's protocol state when the server goes away
#: mid-operation (seen releasing a pooled connection as PostgreSQL shuts down).
_DB_ERRORS: Final = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)


class PostgresStore:
    """One chain's records in PostgreSQL, over one connection of its own.

    Every call comes from the chain's writer, drainer or probe, which take
    turns (``AuditLog``'s I/O lock), so a pool would only add its acquire and
    its reset query (a round trip) to every batch. A connection that failed
    is dropped and the next call connects again.
    """

    kind = "postgres"

    def __init__(self, dsn: str, *, chain_id: str, timeout_s: float = 2.0) -> None:
        self.chain_id = chain_id
        self.head: Head | None = None
        self.dirty = False
        self.opened = False
        self.syncs = 0
        self._dsn = dsn
        self._timeout = timeout_s
        self._active = False
        self._conn: asyncpg.Connection | None = None

    async def _connection(self) -> asyncpg.Connection:
        conn = self._conn
        if conn is None or conn.is_closed():
            conn = await asyncpg.connect(
                self._dsn,
                timeout=self._timeout,
                command_timeout=self._timeout,
                # Names the chain's writer in pg_stat_activity (63 bytes at most).
                server_settings={"application_name": application_name(self.chain_id)},
            )
            self._conn = conn
        return conn

    def _drop(self) -> None:
        """Forget a connection whose state is unknown after an error."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def open(self) -> Head | None:
        self.opened = False
        self._active = True
        try:
            conn = await self._connection()
            # Only create what is missing, so a role with INSERT and SELECT
            # alone can run the gateway once the tables exist.
            if not await conn.fetchval(_SCHEMA_READY):
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", _DDL_LOCK)
                    await conn.execute(SCHEMA)
            line = await conn.fetchval(_HEAD, self.chain_id)
        except _DB_ERRORS as exc:
            self._drop()
            raise StoreError(f"postgres: cannot open the audit tables: {_describe(exc)}") from None
        self.head = None if line is None else _head(line, self.chain_id)
        self.dirty = False
        self.opened = True
        return self.head

    async def write(self, records: Sequence[Record]) -> None:
        if not records:
            return
        if not self._active or not self.opened or self.dirty:
            raise StoreError("postgres: the store is not open")
        columns = _columns(records)
        phase = "connect"
        try:
            conn = await self._connection()
            # One statement outside a transaction block: PostgreSQL runs it in
            # its own transaction and commits it (durably, with
            # synchronous_commit on) before it answers ReadyForQuery, which is
            # when asyncpg returns. All rows or none, in one round trip instead
            # of BEGIN, INSERT, COMMIT.
            # SECURITY: once it is sent, an error leaves the outcome unknown
            # (the commit may have landed): the store must re-read its tail.
            phase = "insert"
            await conn.execute(_INSERT, self.chain_id, *columns)
        except _DB_ERRORS as exc:
            self._drop()
            if phase == "insert":
                self.dirty = True
            raise StoreError(f"postgres: batch not written ({phase}): {_describe(exc)}") from None
        self.syncs += 1
        self.head = Head(records[-1].seq, records[-1].hash)

    async def write_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not self._active:
            raise StoreError("postgres: the store is not open")
        try:
            conn = await self._connection()
            await conn.execute(
                _INSERT_CHECKPOINT,
                self.chain_id,
                checkpoint["seq"],
                checkpoint["hash"],
                canonical(checkpoint).decode(),
            )
        except _DB_ERRORS as exc:
            self._drop()
            raise StoreError(f"postgres: checkpoint not written: {_describe(exc)}") from None

    async def last_checkpoint(self) -> dict[str, Any] | None:
        if not self._active:
            raise StoreError("postgres: the store is not open")
        try:
            conn = await self._connection()
            text = await conn.fetchval(_LAST_CHECKPOINT, self.chain_id)
        except _DB_ERRORS as exc:
            self._drop()
            raise StoreError(f"postgres: cannot read checkpoints: {_describe(exc)}") from None
        if text is None:
            return None
        document: dict[str, Any] = orjson.loads(text)
        return document

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        self._active = False
        self.opened = False
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), timeout=self._timeout)
            except (TimeoutError, *_DB_ERRORS):
                conn.terminate()


def application_name(chain_id: str) -> str:
    """The ``application_name`` of a chain's connection."""
    return f"nops-audit {chain_id}"[:63]


def _describe(exc: BaseException) -> str:
    # SECURITY: the exception type and message, never the DSN (it may hold a password).
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _head(line: str, chain_id: str) -> Head:
    try:
        document = orjson.loads(line)
        record = Record.from_document(document)
    except (orjson.JSONDecodeError, RecordFormatError) as exc:
        raise StoreError(
            f"postgres: the last record is damaged ({exc}); run audit verify"
        ) from None
    if record_hash(document) != record.hash or record.chain_id != chain_id:
        raise StoreError(f"postgres: the last record (seq {record.seq}) fails its hash check")
    return Head(record.seq, record.hash)


def _column_text(value: str | None) -> str | None:
    # PostgreSQL text cannot hold NUL; these columns are only for querying.
    return None if value is None else value.replace("\x00", "\ufffd")


def _columns(records: Sequence[Record]) -> list[list[Any]]:
    return [
        [r.seq for r in records],
        [datetime.fromisoformat(r.ts) for r in records],
        [_column_text(r.entry.request_id) for r in records],
        [_column_text(r.entry.tenant) for r in records],
        [r.entry.outcome for r in records],
        [_column_text(r.entry.code) for r in records],
        [r.hash for r in records],
        [r.to_line()[:-1].decode() for r in records],
    ]


async def iter_records(
    conn: asyncpg.Connection, chain_id: str, *, page: int = 5000
) -> AsyncIterator[tuple[int, str]]:
    """``(seq column, record text)`` of a chain in ``seq`` order, page by page."""
    last = 0
    while True:
        rows = await conn.fetch(
            "SELECT seq, record FROM audit_records WHERE chain_id = $1 AND seq > $2 "
            "ORDER BY seq LIMIT $3",
            chain_id,
            last,
            page,
        )
        for row in rows:
            yield row["seq"], row["record"]
        if len(rows) < page:
            return
        last = rows[-1]["seq"]


async def iter_checkpoints(conn: asyncpg.Connection, chain_id: str) -> list[str]:
    """The checkpoint documents of a chain, in ``seq`` order."""
    rows = await conn.fetch(
        "SELECT checkpoint FROM audit_checkpoints WHERE chain_id = $1 ORDER BY seq", chain_id
    )
    return [row["checkpoint"] for row in rows]
