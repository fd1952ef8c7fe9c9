"""Versioned schema migrations, applied at start and reversible.

Migrations are SQL files in ``registry/migrations``: ``NNNN_name.up.sql`` and
its ``NNNN_name.down.sql``, numbered from 0001 without gaps. Everything the
registry stores lives in the PostgreSQL schema ``registry``;
``registry.schema_migrations`` records each applied version with the
SHA-256 of its up script.

A run (up or down) is one transaction holding a transaction-level advisory
lock, so replicas starting together apply each migration once, and a failed
migration leaves the database as it was. A database whose applied scripts
differ from the files, or that is newer than this code, is refused rather
than guessed at.

``python -m registry migrate up [N]`` applies N pending migrations (all by
default); ``migrate down N`` rolls back the last N; ``migrate status``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import Final

from registry.db import Conn

__all__ = [
    "LOCK_KEY",
    "Migration",
    "MigrationError",
    "applied_versions",
    "load_migrations",
    "migrate_down",
    "migrate_up",
]

#: pg_advisory_xact_lock key: the first 8 bytes of sha256("nops.registry.migrations").
LOCK_KEY: Final = int.from_bytes(
    hashlib.sha256(b"nops.registry.migrations").digest()[:8], "big", signed=True
)
_FILE: Final = re.compile(r"(\d{4})_([a-z0-9_]+)\.(up|down)\.sql")
_BOOTSTRAP: Final = """
CREATE SCHEMA IF NOT EXISTS registry;
CREATE TABLE IF NOT EXISTS registry.schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""


class MigrationError(RuntimeError):
    """The migrations or the database's record of them are not as expected."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    up: str
    down: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.up.encode()).hexdigest()


def load_migrations() -> tuple[Migration, ...]:
    """The packaged migrations, in order; a gap or a missing half is an error."""
    found: dict[int, dict[str, str]] = {}
    names: dict[int, str] = {}
    for entry in resources.files("registry").joinpath("migrations").iterdir():
        match = _FILE.fullmatch(entry.name)
        if match is None:
            continue
        version = int(match.group(1))
        if names.setdefault(version, match.group(2)) != match.group(2):
            raise MigrationError(f"migration {version:04d} has two names")
        found.setdefault(version, {})[match.group(3)] = entry.read_text(encoding="utf-8")
    migrations = []
    for expected, version in enumerate(sorted(found), start=1):
        if version != expected:
            raise MigrationError(f"migration {expected:04d} is missing")
        halves = found[version]
        if set(halves) != {"up", "down"}:
            raise MigrationError(f"migration {version:04d} needs both .up.sql and .down.sql")
        migrations.append(Migration(version, names[version], halves["up"], halves["down"]))
    return tuple(migrations)


async def applied_versions(conn: Conn) -> list[int]:
    """Versions recorded in the database, ascending (empty on a fresh database)."""
    exists = await conn.fetchval("SELECT to_regclass('registry.schema_migrations') IS NOT NULL")
    if not exists:
        return []
    rows = await conn.fetch("SELECT version FROM registry.schema_migrations ORDER BY version")
    return [row["version"] for row in rows]


async def migrate_up(
    conn: Conn, steps: int | None = None, *, migrations: tuple[Migration, ...] = ()
) -> list[int]:
    """Apply pending migrations (``steps`` of them, or all); the versions applied."""
    known = migrations or load_migrations()
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
        await conn.execute(_BOOTSTRAP)
        applied = await _verified(conn, known)
        pending = [m for m in known if m.version > (applied[-1] if applied else 0)]
        if steps is not None:
            pending = pending[:steps]
        for migration in pending:
            await conn.execute(migration.up)
            await conn.execute(
                "INSERT INTO registry.schema_migrations (version, name, checksum)"
                " VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.checksum,
            )
        return [m.version for m in pending]


async def migrate_down(
    conn: Conn, steps: int, *, migrations: tuple[Migration, ...] = ()
) -> list[int]:
    """Roll back the last ``steps`` applied migrations; the versions rolled back."""
    if steps < 0:
        raise MigrationError("steps must be >= 0")
    known = {m.version: m for m in (migrations or load_migrations())}
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
        await conn.execute(_BOOTSTRAP)
        applied = await _verified(conn, tuple(known.values()))
        undone = list(reversed(applied))[:steps]
        for version in undone:
            await conn.execute(known[version].down)
            await conn.execute("DELETE FROM registry.schema_migrations WHERE version = $1", version)
        return undone


async def _verified(conn: Conn, known: tuple[Migration, ...]) -> list[int]:
    """The applied versions, checked against the packaged migrations."""
    by_version = {m.version: m for m in known}
    rows = await conn.fetch(
        "SELECT version, checksum FROM registry.schema_migrations ORDER BY version"
    )
    for row in rows:
        migration = by_version.get(row["version"])
        if migration is None:
            raise MigrationError(
                f"the database has migration {row['version']:04d}, newer than this registry"
                f" knows ({max(by_version, default=0):04d}); run a newer registry"
            )
        if row["checksum"] != migration.checksum:
            raise MigrationError(
                f"migration {migration.version:04d}_{migration.name} was changed after it was"
                " applied; add a new migration instead of editing an applied one"
            )
    versions = [row["version"] for row in rows]
    if versions != list(range(1, len(versions) + 1)):
        raise MigrationError(f"applied migrations are not contiguous: {versions}")
    return versions
