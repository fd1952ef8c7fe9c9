"""Automatic pipelining of bus commands against a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.exceptions
from redis.asyncio import Redis

from bus.pipelining import AutoPipeline, Queue
from tests.services import RedisService


@pytest.fixture
async def client(redis_server: RedisService) -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_server.url)
    yield redis
    await redis.aclose()


class TestAutoPipeline:
    async def test_concurrent_commands_share_round_trips(self, client: Redis, tenant: str) -> None:
        """100 concurrent commands each get their own reply in far fewer round trips."""
        pipeline = AutoPipeline(client)

        def increment(n: int) -> Queue:
            return lambda pipe: pipe.incrby(f"{tenant}:n", n)

        replies = await asyncio.gather(*(pipeline.call(increment(n)) for n in range(100)))
        assert sorted(replies)[-1] == sum(range(100))
        assert len(set(replies)) == 100
        assert pipeline.flushes < 20

    async def test_a_lone_command_is_sent_at_once(self, client: Redis, tenant: str) -> None:
        """With nothing else queued a command takes one round trip of its own."""
        pipeline = AutoPipeline(client)
        assert await pipeline.call(lambda pipe: pipe.set(f"{tenant}:k", "v")) is True
        assert pipeline.flushes == 1

    async def test_one_failing_command_fails_only_its_caller(
        self, client: Redis, tenant: str
    ) -> None:
        """A WRONGTYPE error reaches the caller that sent it; the others succeed."""
        await client.set(f"{tenant}:string", "x")
        pipeline = AutoPipeline(client)
        good = pipeline.call(lambda pipe: pipe.incr(f"{tenant}:counter"))
        bad = pipeline.call(lambda pipe: pipe.xlen(f"{tenant}:string"))
        results = await asyncio.gather(good, bad, return_exceptions=True)
        assert results[0] == 1
        assert isinstance(results[1], redis.exceptions.ResponseError)

    async def test_scripts_survive_a_script_flush(self, client: Redis, tenant: str) -> None:
        """EVALSHA of a script Redis forgot loads it again and still answers."""
        script = client.register_script("return ARGV[1]")
        pipeline = AutoPipeline(client)
        assert await pipeline.script(script, [f"{tenant}:k"], ["a"]) == b"a"
        await client.script_flush()
        assert await pipeline.script(script, [f"{tenant}:k"], ["b"]) == b"b"

    async def test_queue_is_bounded(self, client: Redis, tenant: str) -> None:
        """Past max_pending, callers wait for room instead of queueing without bound."""
        pipeline = AutoPipeline(client, max_pending=3)
        seen: list[int] = []

        async def call(n: int) -> None:
            await pipeline.call(lambda pipe: pipe.incr(f"{tenant}:bounded"))
            seen.append(pipeline.queued)

        tasks = [asyncio.create_task(call(n)) for n in range(30)]
        await asyncio.sleep(0)
        assert pipeline.queued <= 3
        await asyncio.gather(*tasks)
        assert max(seen) <= 3
        assert int(await client.get(f"{tenant}:bounded") or 0) == 30

    async def test_redis_down_fails_every_waiting_caller(
        self, redis_server: RedisService, tenant: str
    ) -> None:
        """A broken connection is every queued caller's error, and none hangs."""
        down = Redis.from_url(redis_server.url, socket_connect_timeout=1, socket_timeout=1)
        pipeline = AutoPipeline(down)
        redis_server.stop()
        try:
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(pipeline.call(lambda pipe: pipe.ping()) for _ in range(5)),
                    return_exceptions=True,
                ),
                timeout=10,
            )
            assert all(isinstance(r, redis.exceptions.ConnectionError) for r in results)
        finally:
            redis_server.start()
            await down.aclose()
