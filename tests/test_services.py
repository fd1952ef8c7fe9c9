"""The real-service helpers in tests/services.py start, stop and restart real servers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis
import redis.exceptions

from tests.services import PostgresService, RedisService


@pytest.fixture
def redis_service(tmp_path: Path) -> Iterator[RedisService]:
    service = RedisService(tmp_path)
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture
def postgres_service(tmp_path: Path) -> Iterator[PostgresService]:
    service = PostgresService(tmp_path)
    try:
        yield service
    finally:
        service.close()


def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)


def test_redis_set_get_stop_restart(redis_service: RedisService) -> None:
    url = redis_service.url
    assert url == f"redis://127.0.0.1:{redis_service.port}/0"
    assert not redis_service.running

    redis_service.start()
    assert redis_service.running
    with _client(url) as client:
        assert client.set("k", "v")
        assert client.get("k") == b"v"

    redis_service.stop()
    assert not redis_service.running
    redis_service.stop()  # idempotent
    with _client(url) as client, pytest.raises(redis.exceptions.ConnectionError):
        client.ping()

    redis_service.start()
    assert redis_service.running
    assert redis_service.url == url
    with _client(url) as client:
        assert client.ping()
        assert client.get("k") is None  # no persistence across restarts


async def _select_one(dsn: str) -> int:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        value: int = await conn.fetchval("SELECT 1")
        return value
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_postgres_select_stop_restart(postgres_service: PostgresService) -> None:
    dsn = postgres_service.dsn
    assert dsn == f"postgresql://postgres@127.0.0.1:{postgres_service.port}/postgres"
    assert not postgres_service.running

    postgres_service.start()
    assert postgres_service.running
    assert await _select_one(dsn) == 1
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        await conn.execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)")
        data_dir = await conn.fetchval("SELECT current_setting('data_directory')")
    finally:
        await conn.close()
    if os.geteuid() == 0:  # PostgreSQL must not run as root
        assert os.stat(data_dir).st_uid != 0

    postgres_service.stop()
    assert not postgres_service.running
    postgres_service.stop()  # idempotent
    with pytest.raises(OSError):  # noqa: PT011 - refused connections are plain OSErrors
        await _select_one(dsn)

    postgres_service.start()
    assert postgres_service.running
    assert postgres_service.dsn == dsn
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        assert await conn.fetchval("SELECT v FROM kept") == 42  # same cluster
    finally:
        await conn.close()
