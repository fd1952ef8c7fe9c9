"""The PostgreSQL store against a real PostgreSQL: group commit, spooling, tampering."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from audit import AuditLog
from audit.record import canonical, record_hash
from audit.setup import open_audit_log
from audit.stores import StoreError
from audit.stores.postgres import application_name
from audit.verify import Report, verify_postgres
from tests.audit_support import append_behind_a_held_write, entry, settings, trusted_keys
from tests.services import PostgresService


def _chain() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


async def _open(directory: Path, dsn: str, chain_id: str, **changes: Any) -> AuditLog:
    return await open_audit_log(
        settings(directory, store="postgres", dsn=dsn, chain_id=chain_id, **changes)
    )


async def _verify(directory: Path, dsn: str, chain_id: str) -> Report:
    return await verify_postgres(dsn, chain_id, keys=trusted_keys(directory))


async def _seqs(dsn: str, chain_id: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT record FROM audit_records WHERE chain_id = $1 ORDER BY seq", chain_id
        )
    finally:
        await conn.close()
    return [orjson.loads(row["record"])["seq"] for row in rows]


async def _transactions(dsn: str, chain_id: str) -> list[list[int]]:
    """The chain's seqs grouped by the transaction that inserted them, in seq order."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT xmin::text AS xid, seq FROM audit_records WHERE chain_id = $1 ORDER BY seq",
            chain_id,
        )
    finally:
        await conn.close()
    groups: dict[str, list[int]] = {}
    for row in rows:
        groups.setdefault(row["xid"], []).append(row["seq"])
    return list(groups.values())


async def _terminate_writer(dsn: str, chain_id: str) -> int:
    """End the chain's store connection from the server side; how many were ended."""
    conn = await asyncpg.connect(dsn)
    try:
        ended: list[bool] = [
            row[0]
            for row in await conn.fetch(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = $1",
                application_name(chain_id),
            )
        ]
    finally:
        await conn.close()
    return sum(ended)


class TestPostgresStore:
    async def test_chain_in_postgres_verifies(
        self, tmp_path: Path, postgres_server: PostgresService
    ) -> None:
        """Records and checkpoints land in the tables; the verifier finds them intact."""
        chain = _chain()
        log = await _open(tmp_path, postgres_server.dsn, chain, checkpoint_every=10)
        for n in range(25):
            await log.append(entry(n))
        await log.close()
        report = await _verify(tmp_path, postgres_server.dsn, chain)
        assert report.intact, report.damage
        assert (report.records, report.last_seq, report.checkpoints) == (25, 25, 3)

    async def test_concurrent_appends_share_transactions(
        self, tmp_path: Path, postgres_server: PostgresService
    ) -> None:
        """1000 concurrent appends commit in far fewer transactions than records."""
        chain = _chain()
        log = await _open(tmp_path, postgres_server.dsn, chain, checkpoint_every=10_000)
        records = await asyncio.gather(*(log.append(entry(n)) for n in range(1000)))
        transactions = log.store.syncs
        await log.close()
        assert sorted(r.seq for r in records) == list(range(1, 1001))
        assert transactions <= 10, f"{transactions} transactions for 1000 records"
        assert await _seqs(postgres_server.dsn, chain) == list(range(1, 1001))

    async def test_each_write_is_one_transaction_holding_its_whole_batch(
        self, tmp_path: Path, postgres_server: PostgresService
    ) -> None:
        """Records arriving while a write is in flight go in ONE next statement, ONE commit.

        The store's ``write`` is held on its first batch (as a slow commit
        would be); each row's ``xmin`` names the transaction that inserted it.
        """
        chain = _chain()
        log = await _open(tmp_path, postgres_server.dsn, chain, checkpoint_every=10_000)
        held = await append_behind_a_held_write(log, 200)
        syncs = log.store.syncs
        await log.close()
        assert held.writes == [1, 200]
        assert syncs == 2
        assert [r.seq for r in held.records] == list(range(1, 202))
        assert await _transactions(postgres_server.dsn, chain) == [[1], list(range(2, 202))]
        report = await _verify(tmp_path, postgres_server.dsn, chain)
        assert report.intact, report.damage
        assert report.last_seq == 201

    async def test_a_lost_connection_is_replaced(
        self, tmp_path: Path, postgres_server: PostgresService
    ) -> None:
        """The server ends the store's connection: the next appends still become durable."""
        chain = _chain()
        log = await _open(tmp_path, postgres_server.dsn, chain)
        for n in range(3):
            await log.append(entry(n))
        assert await _terminate_writer(postgres_server.dsn, chain) == 1
        after = [await log.append(entry(n)) for n in range(3, 8)]
        await asyncio.wait_for(log.wait_drained(), timeout=30)
        after += [await log.append(entry(8))]
        await log.close()
        assert [r.seq for r in after] == list(range(4, 10))
        assert await _seqs(postgres_server.dsn, chain) == list(range(1, 10))
        assert (await _verify(tmp_path, postgres_server.dsn, chain)).intact

    async def test_reopening_continues_the_chain(
        self, tmp_path: Path, postgres_server: PostgresService
    ) -> None:
        """A restarted instance continues its own chain from the table's last record."""
        chain = _chain()
        for run in range(2):
            log = await _open(tmp_path, postgres_server.dsn, chain)
            for n in range(3):
                await log.append(entry(run * 3 + n))
            await log.close()
        assert (await _verify(tmp_path, postgres_server.dsn, chain)).last_seq == 6

    async def test_chains_of_replicas_do_not_mix(
        self, tmp_path: Path, postgres_server: PostgresService
    ) -> None:
        """Two instances write two chains into the same table concurrently."""
        chains = [_chain(), _chain()]
        logs = [
            await _open(tmp_path / str(i), postgres_server.dsn, chain)
            for i, chain in enumerate(chains)
        ]
        await asyncio.gather(*(log.append(entry(n)) for n in range(200) for log in logs))
        for log in logs:
            await log.close()
        for i, chain in enumerate(chains):
            report = await _verify(tmp_path / str(i), postgres_server.dsn, chain)
            assert report.intact
            assert report.last_seq == 200

    async def test_tables_refuse_update_and_delete(
        self, tmp_path: Path, postgres_server: PostgresService
    ) -> None:
        """A trigger makes the tables append-only for ordinary sessions."""
        chain = _chain()
        log = await _open(tmp_path, postgres_server.dsn, chain)
        await log.append(entry())
        await log.close()
        conn = await asyncpg.connect(postgres_server.dsn)
        try:
            for statement in (
                "UPDATE audit_records SET tenant = 'x' WHERE chain_id = $1",
                "DELETE FROM audit_records WHERE chain_id = $1",
            ):
                with pytest.raises(asyncpg.RaiseError, match="append-only"):
                    await conn.execute(statement, chain)
        finally:
            await conn.close()

    async def test_a_role_with_insert_and_select_only_can_write(
        self, tmp_path: Path, postgres_server: PostgresService
    ) -> None:
        """Once the tables exist the gateway needs no DDL, UPDATE or DELETE rights."""
        owner = _chain()
        await (await _open(tmp_path / "owner", postgres_server.dsn, owner)).close()
        conn = await asyncpg.connect(postgres_server.dsn)
        try:
            await conn.execute(
                "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = "
                "'audit_writer') THEN CREATE ROLE audit_writer LOGIN; END IF; END $$"
            )
            await conn.execute(
                "GRANT SELECT, INSERT ON audit_records, audit_checkpoints TO audit_writer"
            )
        finally:
            await conn.close()
        dsn = postgres_server.dsn.replace("postgres@", "audit_writer@", 1)
        chain = _chain()
        log = await _open(tmp_path, dsn, chain)
        await log.append(entry())
        await log.close()
        assert (await _verify(tmp_path, dsn, chain)).intact

    async def test_store_down_at_start_without_spool_refuses(self, tmp_path: Path) -> None:
        """No database and nothing spooled: the head is unknown, so the log does not start."""
        from tests.conftest import free_port

        dead = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
        with pytest.raises(StoreError, match="postgres"):
            await _open(tmp_path, dead, _chain())


@pytest.fixture
async def stopped_postgres(postgres_server: PostgresService) -> AsyncIterator[PostgresService]:
    """The session PostgreSQL; started again after the test, whatever happened."""
    yield postgres_server
    await asyncio.to_thread(postgres_server.start)


class TestSpool:
    async def test_outage_is_spooled_then_drained_in_order(
        self, tmp_path: Path, stopped_postgres: PostgresService
    ) -> None:
        """PostgreSQL down: appends still succeed (spooled); back up: drained in order."""
        dsn = stopped_postgres.dsn
        chain = _chain()
        log = await _open(tmp_path, dsn, chain, checkpoint_every=25)
        before = await asyncio.gather(*(log.append(entry(n)) for n in range(50)))
        await asyncio.to_thread(stopped_postgres.stop)
        during = await asyncio.gather(*(log.append(entry(n)) for n in range(50, 150)))
        during += [await log.append(entry(n)) for n in range(150, 160)]
        assert log.spooling
        assert (tmp_path / "spool.jsonl").stat().st_size > 0
        await asyncio.to_thread(stopped_postgres.start)
        await asyncio.wait_for(log.wait_drained(), timeout=30)
        after = [await log.append(entry(n)) for n in range(160, 170)]
        await log.close()
        acked = sorted(r.seq for r in [*before, *during, *after])
        assert acked == list(range(1, 171))
        assert await _seqs(dsn, chain) == list(range(1, 171))
        assert (tmp_path / "spool.jsonl").stat().st_size == 0
        report = await _verify(tmp_path, dsn, chain)
        assert report.intact, report.damage
        assert report.last_checkpoint_seq == 170
        assert log.stats.spooled == 110
        assert log.stats.drained == 110

    async def test_restart_during_outage_continues_on_the_spool(
        self, tmp_path: Path, stopped_postgres: PostgresService
    ) -> None:
        """A gateway restarted while PostgreSQL is down resumes from the spool's tail."""
        dsn = stopped_postgres.dsn
        chain = _chain()
        log = await _open(tmp_path, dsn, chain)
        for n in range(5):
            await log.append(entry(n))
        await asyncio.to_thread(stopped_postgres.stop)
        for n in range(5, 10):
            await log.append(entry(n))
        await log.close()
        restarted = await _open(tmp_path, dsn, chain)
        assert restarted.spooling
        record = await restarted.append(entry(10))
        assert record.seq == 11
        await asyncio.to_thread(stopped_postgres.start)
        await asyncio.wait_for(restarted.wait_drained(), timeout=30)
        await restarted.close()
        assert await _seqs(dsn, chain) == list(range(1, 12))
        assert (await _verify(tmp_path, dsn, chain)).intact


async def _tamper(dsn: str, *statements: tuple[str, tuple[Any, ...]]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            # A superuser can switch the append-only triggers off: the chain is what holds.
            await conn.execute("SET LOCAL session_replication_role = replica")
            for sql, args in statements:
                await conn.execute(sql, *args)
    finally:
        await conn.close()


async def _record(dsn: str, chain: str, seq: int) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        text = await conn.fetchval(
            "SELECT record FROM audit_records WHERE chain_id = $1 AND seq = $2", chain, seq
        )
    finally:
        await conn.close()
    document: dict[str, Any] = orjson.loads(text)
    return document


class TestPostgresTampering:
    @pytest.fixture
    async def chain(self, tmp_path: Path, postgres_server: PostgresService) -> str:
        chain = _chain()
        log = await _open(tmp_path, postgres_server.dsn, chain, checkpoint_every=10)
        for n in range(50):
            await log.append(entry(n))
        await log.close()
        return chain

    async def _first(self, tmp_path: Path, dsn: str, chain: str) -> tuple[str, int]:
        report = await _verify(tmp_path, dsn, chain)
        assert report.first is not None
        return report.first.kind, report.first.seq

    async def test_modified(
        self, tmp_path: Path, postgres_server: PostgresService, chain: str
    ) -> None:
        """An UPDATE of a record's text is found at that record."""
        dsn = postgres_server.dsn
        document = await _record(dsn, chain, 20)
        document["outcome"] = "deny"
        await _tamper(
            dsn,
            (
                "UPDATE audit_records SET record = $3 WHERE chain_id = $1 AND seq = $2",
                (chain, 20, canonical(document).decode()),
            ),
        )
        assert await self._first(tmp_path, dsn, chain) == ("modified", 20)

    async def test_deleted(
        self, tmp_path: Path, postgres_server: PostgresService, chain: str
    ) -> None:
        """A DELETEd row is a gap at its seq."""
        dsn = postgres_server.dsn
        await _tamper(
            dsn, ("DELETE FROM audit_records WHERE chain_id = $1 AND seq = $2", (chain, 20))
        )
        assert await self._first(tmp_path, dsn, chain) == ("deleted", 20)

    async def test_inserted(
        self, tmp_path: Path, postgres_server: PostgresService, chain: str
    ) -> None:
        """A forged row (seqs shifted to make room) is found where it was slipped in."""
        dsn = postgres_server.dsn
        forged = await _record(dsn, chain, 20)
        forged["tenant"] = "forged"
        forged["hash"] = record_hash(forged)
        await _tamper(
            dsn,
            (
                "UPDATE audit_records SET seq = seq + 1000 WHERE chain_id = $1 AND seq >= 20",
                (chain,),
            ),
            (
                "INSERT INTO audit_records (chain_id, seq, ts, outcome, hash, record) "
                "VALUES ($1, 1019, now(), 'allow', $2, $3)",
                (chain, forged["hash"], canonical(forged).decode()),
            ),
        )
        assert await self._first(tmp_path, dsn, chain) == ("inserted", 20)

    async def test_reordered(
        self, tmp_path: Path, postgres_server: PostgresService, chain: str
    ) -> None:
        """Two rows' contents swapped are out of order at the first of them."""
        dsn = postgres_server.dsn
        a, b = await _record(dsn, chain, 20), await _record(dsn, chain, 21)
        sql = "UPDATE audit_records SET record = $3 WHERE chain_id = $1 AND seq = $2"
        await _tamper(
            dsn,
            (sql, (chain, 20, canonical(b).decode())),
            (sql, (chain, 21, canonical(a).decode())),
        )
        assert await self._first(tmp_path, dsn, chain) == ("reordered", 20)

    async def test_truncated(
        self, tmp_path: Path, postgres_server: PostgresService, chain: str
    ) -> None:
        """Rows cut off behind the last checkpoint are a truncation."""
        dsn = postgres_server.dsn
        await _tamper(dsn, ("DELETE FROM audit_records WHERE chain_id = $1 AND seq > 45", (chain,)))
        assert await self._first(tmp_path, dsn, chain) == ("truncated", 46)

    async def test_forged_checkpoint(
        self, tmp_path: Path, postgres_server: PostgresService, chain: str
    ) -> None:
        """A checkpoint edited in its table fails its signature."""
        dsn = postgres_server.dsn
        conn = await asyncpg.connect(dsn)
        try:
            text = await conn.fetchval(
                "SELECT checkpoint FROM audit_checkpoints WHERE chain_id = $1 AND seq = 30", chain
            )
        finally:
            await conn.close()
        document = orjson.loads(text)
        document["head_hash"] = "f" * 64
        await _tamper(
            dsn,
            (
                "UPDATE audit_checkpoints SET checkpoint = $2 WHERE chain_id = $1 AND seq = 30",
                (chain, canonical(document).decode()),
            ),
        )
        assert await self._first(tmp_path, dsn, chain) == ("forged-checkpoint", 30)

    async def test_cli_verifies_postgres(
        self, tmp_path: Path, postgres_server: PostgresService, chain: str
    ) -> None:
        """`audit verify --dsn --chain` exits 0 on the intact chain."""
        from audit.__main__ import main
        from tests.audit_support import public_key_file

        argv = ["verify", "--dsn", postgres_server.dsn, "--chain", chain]
        argv += ["--public-key", str(public_key_file(tmp_path))]
        assert await asyncio.to_thread(main, argv) == 0
