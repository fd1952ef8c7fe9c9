"""The durability floor: how long this machine takes to make one small write durable.

    python -m bench.fsync_probe [--dir DIR] [--dsn DSN] [--count 300]

The gateway forwards a request only once its audit record is durable, so a
request waits for at least one durable write: an ``fsync`` of the JSONL file
(file store) or a PostgreSQL commit with ``synchronous_commit = on`` (a WAL
flush). Under load a request that arrives while a write is in flight waits
for that one and then for its own, so up to two. Whatever the gateway's own
code costs, its added p99 cannot go below this disk's write-durable p99.

Measured, one at a time, each sample timed on its own:

- ``file_fsync``: append a 512-byte line to a file in ``--dir`` (the audit
  store's directory: same file system, same disk) and ``os.fsync`` it, as
  the file store does for a batch;
- ``postgres_commit``: one single-row ``INSERT`` into a scratch table,
  committed on its own, as the PostgreSQL store commits a batch (dropped
  afterwards); without ``--dsn`` a private durable PostgreSQL
  (``registry.devdb``, data kept under ``--dir``, ``fsync = on``) is started;
- ``postgres_round_trip``: ``SELECT 1`` on the same connection, the part of
  a commit that is not the disk.

Prints, and returns from :func:`probe`, the p50/p99/max of each in ms.
``bench.run`` runs it against its own audit store's directory and PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Final

from bench.loadgen import percentile

__all__ = ["file_fsync", "postgres_commit", "probe", "summary"]

_LINE: Final = b"x" * 511 + b"\n"  # about an audit record's size
_WARMUP: Final = 5
_TABLE: Final = "nops_bench_fsync_probe"


def summary(samples_s: list[float]) -> dict[str, Any]:
    """p50, p99 and max in ms of durations in seconds, and how many there were."""
    return {
        "p50_ms": round(percentile(samples_s, 50) * 1e3, 3),
        "p99_ms": round(percentile(samples_s, 99) * 1e3, 3),
        "max_ms": round(max(samples_s) * 1e3, 3),
        "samples": len(samples_s),
    }


def file_fsync(directory: Path, count: int) -> list[float]:
    """Seconds for each of ``count`` append + fsync of a fresh file in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".fsync-probe-{uuid.uuid4().hex[:8]}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    samples: list[float] = []
    try:
        for n in range(_WARMUP + count):
            started = time.perf_counter()
            os.write(fd, _LINE)
            os.fsync(fd)
            if n >= _WARMUP:
                samples.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return samples


async def postgres_commit(dsn: str, count: int) -> dict[str, Any]:
    """Commit and round-trip samples (seconds) and the server's durability settings."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        settings = {
            name: await conn.fetchval(f"SHOW {name}")
            for name in ("fsync", "synchronous_commit", "wal_sync_method")
        }
        table = f"{_TABLE}_{uuid.uuid4().hex[:8]}"
        await conn.execute(f"CREATE TABLE {table} (n bigint, pad text)")
        try:
            round_trips: list[float] = []
            commits: list[float] = []
            pad = _LINE.decode()
            for n in range(_WARMUP + count):
                started = time.perf_counter()
                await conn.fetchval("SELECT 1")
                round_trip = time.perf_counter() - started
                started = time.perf_counter()
                # Outside a transaction block: the statement commits on its own.
                await conn.execute(f"INSERT INTO {table} VALUES ($1, $2)", n, pad)  # noqa: S608
                commit = time.perf_counter() - started
                if n >= _WARMUP:
                    round_trips.append(round_trip)
                    commits.append(commit)
        finally:
            await conn.execute(f"DROP TABLE {table}")
    finally:
        await conn.close()
    return {"commits": commits, "round_trips": round_trips, "settings": settings}


def probe(directory: Path, dsn: str | None, *, count: int = 300) -> dict[str, Any]:
    """The durability floor on ``directory``'s disk and, with ``dsn``, of that PostgreSQL."""
    result: dict[str, Any] = {
        "directory": str(directory),
        "count": count,
        "file_fsync": summary(file_fsync(directory, count)),
    }
    if dsn:
        pg = asyncio.run(postgres_commit(dsn, count))
        result["postgres_commit"] = summary(pg["commits"])
        result["postgres_round_trip"] = summary(pg["round_trips"])
        result["postgres_settings"] = pg["settings"]
    return result


def describe(floor: dict[str, Any]) -> str:
    """One line per measurement, for the bench reports."""
    lines = []
    names = (
        ("file_fsync", "file append + fsync"),
        ("postgres_commit", "PostgreSQL commit"),
        ("postgres_round_trip", "PostgreSQL SELECT 1"),
    )
    for key, label in names:
        row = floor.get(key)
        if row:
            lines.append(
                f"{label:22} p50 {row['p50_ms']:7.3f}  p99 {row['p99_ms']:7.3f}  "
                f"max {row['max_ms']:7.3f} ms  ({row['samples']} samples)"
            )
    settings = floor.get("postgres_settings")
    if settings:
        lines.append("PostgreSQL " + ", ".join(f"{k} = {v}" for k, v in settings.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fsync_probe")
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write (default: a temp dir)"
    )
    parser.add_argument("--dsn", default="", help="a PostgreSQL (default: a private durable one)")
    parser.add_argument("--count", type=int, default=300, help="samples of each kind")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nops-fsync-") as tmp:
        directory = args.dir or Path(tmp)
        service = None
        dsn = args.dsn
        if not dsn:
            from registry.devdb import PostgresService

            # A kept data directory makes the cluster durable (fsync on).
            service = PostgresService(Path(tmp), data_dir=Path(tmp) / "pg")
            service.start()
            dsn = service.dsn
        try:
            floor = probe(directory, dsn, count=args.count)
        finally:
            if service is not None:
                service.close()
    print(describe(floor))
    print(json.dumps(floor))
    return 0


if __name__ == "__main__":
    sys.exit(main())
