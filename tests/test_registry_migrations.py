"""Schema migrations against a real PostgreSQL: up, down, concurrency, tampering, the CLI."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import orjson
import pytest

from registry.migrate import (
    Migration,
    MigrationError,
    applied_versions,
    load_migrations,
    migrate_down,
    migrate_up,
)
from tests.conftest import free_port
from tests.secretscan import observe_output

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
async def conn(registry_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(registry_dsn)
    yield connection
    await connection.close()


async def _tables(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'registry'"
    )
    return {row["table_name"] for row in rows}


class TestMigrations:
    def test_packaged_migrations_are_complete(self) -> None:
        """Every migration has an up and a down half, numbered from 1 without gaps."""
        migrations = load_migrations()
        assert [(m.version, m.name) for m in migrations] == [(1, "agents"), (2, "outbox")]
        assert all(m.up.strip() and m.down.strip() for m in migrations)

    async def test_up_then_down_then_up(self, conn: asyncpg.Connection) -> None:
        """up applies all, down N rolls back the last N, and up again restores them."""
        assert await applied_versions(conn) == []
        assert await migrate_up(conn) == [1, 2]
        assert await _tables(conn) == {"schema_migrations", "agents", "outbox"}
        assert await migrate_up(conn) == []  # idempotent

        assert await migrate_down(conn, 1) == [2]
        assert await _tables(conn) == {"schema_migrations", "agents"}
        assert await migrate_down(conn, 5) == [1]
        assert await _tables(conn) == {"schema_migrations"}
        assert await applied_versions(conn) == []

        assert await migrate_up(conn, 1) == [1]
        assert await applied_versions(conn) == [1]
        assert await migrate_up(conn) == [2]

    async def test_concurrent_starts_apply_once(self, registry_dsn: str) -> None:
        """Replicas migrating at the same moment apply each migration exactly once."""
        conns = [await asyncpg.connect(registry_dsn) for _ in range(4)]
        try:
            results = await asyncio.gather(*(migrate_up(c) for c in conns))
            assert sorted(results, key=len) == [[], [], [], [1, 2]]
            assert await applied_versions(conns[0]) == [1, 2]
        finally:
            for c in conns:
                await c.close()

    async def test_failed_migration_leaves_nothing_behind(self, conn: asyncpg.Connection) -> None:
        """A migration that fails rolls back the whole run, including earlier steps."""
        broken = Migration(3, "broken", "CREATE TABLE registry.x (); SELECT 1/0;", "SELECT 1;")
        with pytest.raises(asyncpg.DivisionByZeroError):
            await migrate_up(conn, migrations=(*load_migrations(), broken))
        assert await applied_versions(conn) == []
        assert await _tables(conn) <= {"schema_migrations"}

    async def test_edited_migration_is_refused(self, conn: asyncpg.Connection) -> None:
        """A migration changed after it was applied is refused, not silently skipped."""
        await migrate_up(conn)
        first, second = load_migrations()
        edited = dataclasses.replace(first, up=first.up + "\n-- edited\n")
        with pytest.raises(MigrationError, match="was changed after it was applied"):
            await migrate_up(conn, migrations=(edited, second))

    async def test_newer_database_is_refused(self, conn: asyncpg.Connection) -> None:
        """Code older than the database refuses to run against it."""
        await migrate_up(conn)
        with pytest.raises(MigrationError, match="newer than this registry"):
            await migrate_up(conn, migrations=load_migrations()[:1])

    async def test_down_keeps_data_of_remaining_tables(self, conn: asyncpg.Connection) -> None:
        """Rolling back the outbox keeps the agents table and its rows."""
        await migrate_up(conn)
        await conn.execute(
            "INSERT INTO registry.agents (tenant, id, name, endpoint_url, heartbeat_at,"
            " created_at, updated_at) VALUES ('t', 'a', 'a', 'http://h/', now(), now(), now())"
        )
        await migrate_down(conn, 1)
        assert await conn.fetchval("SELECT count(*) FROM registry.agents") == 1

    @pytest.mark.parametrize(
        ("column", "value"),
        [
            pytest.param("id", "'UPPER'", id="id"),
            pytest.param("endpoint_url", "'ftp://h/'", id="scheme"),
            pytest.param("endpoint_url", "'http://h/#f'", id="fragment"),
            pytest.param("weight", "5000", id="weight"),
            pytest.param("labels", "'[]'::jsonb", id="labels"),
        ],
    )
    async def test_schema_checks_are_a_second_line(
        self, conn: asyncpg.Connection, column: str, value: str
    ) -> None:
        """The table's CHECKs refuse what validation would, should a bug let it through."""
        await migrate_up(conn)
        values = {
            "tenant": "'t'",
            "id": "'a'",
            "name": "'a'",
            "endpoint_url": "'http://h/'",
            "weight": "1",
            "labels": "'{}'::jsonb",
        } | {column: value}
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                f"INSERT INTO registry.agents ({', '.join(values)}, heartbeat_at, created_at,"  # noqa: S608
                f" updated_at) VALUES ({', '.join(values.values())}, now(), now(), now())"
            )


def _cli(*args: str, dsn: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "registry", *args, "--dsn", dsn],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )


class TestCli:
    def test_migrate_commands(self, registry_dsn: str) -> None:
        """python -m registry migrate up|down N|status does what it says."""
        assert "pending: [1, 2]" in _cli("migrate", "status", dsn=registry_dsn).stdout
        assert "applied: [1, 2]" in _cli("migrate", "up", dsn=registry_dsn).stdout
        assert "rolled back: [2]" in _cli("migrate", "down", "1", dsn=registry_dsn).stdout
        status = _cli("migrate", "status", dsn=registry_dsn).stdout
        assert "applied: [1]  pending: [2]" in status
        refused = _cli("migrate", "down", dsn=registry_dsn)
        assert refused.returncode == 2
        assert "needs the number" in refused.stderr

    def test_no_dsn_is_a_usage_error(self) -> None:
        """Without --dsn or NOPS_REGISTRY_DSN the CLI says so and exits 2."""
        env = {k: v for k, v in os.environ.items() if k != "NOPS_REGISTRY_DSN"}
        proc = subprocess.run(
            [sys.executable, "-m", "registry", "migrate", "status"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
            cwd=ROOT,
        )
        assert proc.returncode == 2
        assert "no database" in proc.stderr

    def test_serve_runs_on_its_own(self, registry_dsn: str) -> None:
        """python -m registry serve migrates, answers the API and stops on SIGTERM."""
        port = free_port()
        env = {**os.environ, "NOPS_REGISTRY_DSN": registry_dsn, "ADMIN_KEY": "x" * 40}
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "registry",
                "serve",
                "--port",
                str(port),
                "--admin-key-env",
                "ADMIN_KEY",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    with urllib.request.urlopen(f"{base}/_readyz", timeout=1) as response:
                        assert orjson.loads(response.read())["status"] == "ready"
                        break
                except OSError:
                    assert proc.poll() is None, "registry exited during start"
                    assert time.monotonic() < deadline, "registry did not become ready"
                    time.sleep(0.1)
            request = urllib.request.Request(
                f"{base}/agents",
                data=orjson.dumps({"id": "a1", "endpoint_url": "http://127.0.0.1:9/"}),
                headers={"Content-Type": "application/json", "X-Nops-Tenant": "acme"},
                method="POST",
            )
            with urllib.request.urlopen(request, timeout=5) as response:
                assert response.status == 201
            admin = urllib.request.Request(
                f"{base}/admin/agents", headers={"X-Nops-Admin-Key": "x" * 40}
            )
            with urllib.request.urlopen(admin, timeout=5) as response:
                assert [a["id"] for a in orjson.loads(response.read())["agents"]] == ["a1"]
        finally:
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=20)
        observe_output(stderr, "registry subprocess stderr")
        assert proc.returncode == 0
        lines = [orjson.loads(line) for line in stderr.splitlines() if line.startswith("{")]
        assert any(line["message"] == "migrations applied" for line in lines)
        assert "x" * 40 not in stderr  # the admin key is never logged
        assert registry_dsn not in stderr
