"""registry.devdb: the kept local PostgreSQL that make run uses."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from registry.devdb import PostgresService, main


@pytest.fixture
def kept_dir() -> Iterator[Path]:
    # Not tmp_path: under root the PostgreSQL user must traverse the parents.
    base = Path(tempfile.mkdtemp(prefix="nops-devdb-"))
    try:
        yield base / "postgres"
    finally:
        PostgresService(base, data_dir=base / "postgres").stop()
        shutil.rmtree(base, ignore_errors=True)


class TestKeptCluster:
    async def test_start_adopt_stop_restart(
        self, kept_dir: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """start prints a DSN; a second start adopts the running server; data survives restarts."""
        assert main(["start", str(kept_dir)]) == 0
        dsn = capsys.readouterr().out.strip()
        assert dsn.startswith("postgresql://postgres@127.0.0.1:")
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (7)")
        finally:
            await conn.close()

        assert main(["start", str(kept_dir)]) == 0  # already running: same server
        assert capsys.readouterr().out.strip() == dsn
        assert main(["dsn", str(kept_dir)]) == 0
        assert capsys.readouterr().out.strip() == dsn

        assert main(["stop", str(kept_dir)]) == 0
        assert main(["dsn", str(kept_dir)]) == 1
        assert "no PostgreSQL running" in capsys.readouterr().err

        assert main(["start", str(kept_dir)]) == 0
        conn = await asyncpg.connect(capsys.readouterr().out.strip())
        try:
            assert await conn.fetchval("SELECT v FROM kept") == 7
            assert await conn.fetchval("SHOW fsync") == "on"  # kept clusters are durable
        finally:
            await conn.close()
