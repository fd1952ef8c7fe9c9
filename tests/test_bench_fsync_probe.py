"""bench.fsync_probe: it takes the samples it says, cleans up, and summarises them in order."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from bench.fsync_probe import describe, file_fsync, postgres_commit, probe, summary
from tests.services import PostgresService


class TestSummary:
    @pytest.mark.parametrize(
        ("samples", "expected"),
        [
            ([0.001], (1.0, 1.0, 1.0, 1)),
            ([0.003, 0.001, 0.002], (2.0, 3.0, 3.0, 3)),
            ([i / 1000 for i in range(1, 101)], (50.0, 99.0, 100.0, 100)),
            ([0.0001] * 99 + [0.050], (0.1, 0.1, 50.0, 100)),
            ([0.0001] * 98 + [0.050] * 2, (0.1, 50.0, 50.0, 100)),
        ],
    )
    def test_nearest_rank_in_ms(
        self, samples: list[float], expected: tuple[float, float, float, int]
    ) -> None:
        row = summary(samples)
        assert (row["p50_ms"], row["p99_ms"], row["max_ms"], row["samples"]) == expected


class TestProbe:
    def test_file_fsync_samples_and_leaves_nothing(self, tmp_path: Path) -> None:
        (tmp_path / "audit.jsonl").write_bytes(b"kept\n")
        samples = file_fsync(tmp_path, 20)
        assert len(samples) == 20
        assert all(s > 0 for s in samples)
        assert [p.name for p in tmp_path.iterdir()] == ["audit.jsonl"]

    async def test_postgres_commits_each_row_and_drops_its_table(
        self, postgres_server: PostgresService
    ) -> None:
        result = await postgres_commit(postgres_server.dsn, 15)
        assert len(result["commits"]) == len(result["round_trips"]) == 15
        assert set(result["settings"]) == {"fsync", "synchronous_commit", "wal_sync_method"}
        conn = await asyncpg.connect(postgres_server.dsn)
        try:
            left = await conn.fetchval(
                "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'nops_bench_fsync_probe%'"
            )
        finally:
            await conn.close()
        assert left == 0

    def test_probe_without_postgres_reports_the_file_only(self, tmp_path: Path) -> None:
        floor = probe(tmp_path, None, count=10)
        assert floor["file_fsync"]["samples"] == 10
        assert "postgres_commit" not in floor
        assert describe(floor).startswith("file append + fsync")
