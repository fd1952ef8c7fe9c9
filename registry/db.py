"""The asyncpg pool the registry runs on, and the connection type its queries take."""

from __future__ import annotations

from typing import Final, TypeAlias

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

__all__ = ["STORE_ERRORS", "Conn", "create_pool"]

#: A connection, or one borrowed from the pool.
Conn: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"

#: What a query raises when PostgreSQL is down or goes away mid-query: its
#: errors, a dropped connection, and (releasing a pooled connection while the
#: server shuts down) asyncpg's InternalClientError, which is neither.
STORE_ERRORS: Final = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


async def _init_connection(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda value: orjson.dumps(value).decode(),
        decoder=orjson.loads,
        schema="pg_catalog",
    )


async def create_pool(
    dsn: str, *, min_size: int = 1, max_size: int = 10, command_timeout: float = 5.0
) -> asyncpg.Pool[asyncpg.Record]:
    """A connection pool with the jsonb codec the store and the outbox rely on."""
    pool: asyncpg.Pool[asyncpg.Record] = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        command_timeout=command_timeout,
        init=_init_connection,
    )
    return pool
