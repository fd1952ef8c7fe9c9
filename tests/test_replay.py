"""The replay (nonce) store: memory and real Redis, concurrent duplicates, shared Redis, outages."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from gateway.app import REDIS
from gateway.config import ConfigError, parse_config
from gateway.replay import (
    MemoryNonceStore,
    RedisNonceStore,
    ReplayStoreFull,
    ReplayStoreUnavailable,
    nonce_key,
)
from tests.conftest import GatewayFactory, PinnedClock, Signer, free_port
from tests.problems import assert_problem
from tests.services import RedisService

Client = TestClient[Any, Any]


class TestMemoryNonceStore:
    async def test_first_claim_wins(self) -> None:
        """A key is new once; the same key again is a replay; another key is new."""
        store = MemoryNonceStore(max_entries=10, clock=PinnedClock())
        assert await store.claim("a", 60) is True
        assert await store.claim("a", 60) is False
        assert await store.claim("b", 60) is True

    async def test_claims_expire_after_ttl(self) -> None:
        """A claim is forgotten once its TTL has passed, and its memory freed."""
        clock = PinnedClock()
        store = MemoryNonceStore(max_entries=10, clock=clock)
        await store.claim("a", 60)
        clock.advance(59)
        assert await store.claim("a", 60) is False
        clock.advance(1)
        assert await store.claim("a", 60) is True
        clock.advance(61)
        await store.claim("b", 60)
        assert len(store) == 1

    async def test_full_store_fails_closed(self) -> None:
        """At capacity new claims are refused rather than a live nonce forgotten."""
        clock = PinnedClock()
        store = MemoryNonceStore(max_entries=2, clock=clock)
        await store.claim("a", 60)
        await store.claim("b", 60)
        with pytest.raises(ReplayStoreFull):
            await store.claim("c", 60)
        assert await store.claim("a", 60) is False  # still remembered
        clock.advance(60)
        assert await store.claim("c", 60) is True  # expiry made room

    async def test_concurrent_claims_have_one_winner(self) -> None:
        """Many concurrent claims of one key: exactly one True."""
        store = MemoryNonceStore(max_entries=100, clock=PinnedClock())
        results = await asyncio.gather(*(store.claim("k", 60) for _ in range(50)))
        assert results.count(True) == 1


class TestRedisNonceStore:
    async def test_set_nx_ex(self, redis_server: RedisService) -> None:
        """A claim is SET NX with the TTL; the second claim of a key loses."""
        client: Redis = Redis.from_url(redis_server.url)
        try:
            store = RedisNonceStore(client)
            key = nonce_key("acme", "acme-k1", "redis-unit-nonce")
            await client.delete(key)
            assert await store.claim(key, 600) is True
            assert await store.claim(key, 600) is False
            assert 590 <= await client.ttl(key) <= 600
        finally:
            await client.aclose()

    async def test_unreachable_redis_raises(self) -> None:
        """No Redis: the store says so (the stage then fails closed)."""
        client: Redis = Redis.from_url(
            f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5
        )
        try:
            with pytest.raises(ReplayStoreUnavailable):
                await RedisNonceStore(client).claim("k", 60)
        finally:
            await client.aclose()


def redis_deps(redis: RedisService) -> dict[str, Any]:
    return {"dependencies": {"redis_url": redis.url}}


def same_host(client: Client) -> dict[str, str]:
    """The Host a load balancer would keep when it sends a request to any replica."""
    return {"Host": f"127.0.0.1:{client.port}"}


async def fire_copies(
    targets: list[tuple[Client, dict[str, str]]], headers: dict[str, str], copies: int = 50
) -> Counter[int]:
    """Send ``copies`` of one signed request at once, spread over the targets; count statuses."""
    responses = await asyncio.gather(
        *(
            targets[i % len(targets)][0].get(
                "/echo/x", headers={**headers, **targets[i % len(targets)][1]}
            )
            for i in range(copies)
        )
    )
    for response in responses:
        if response.status == 409:
            await assert_problem(response, 409, "replayed-nonce", ["nonce_reused"])
    return Counter(response.status for response in responses)


class TestConcurrentDuplicates:
    async def test_memory_store_one_winner(self, make_gateway: GatewayFactory) -> None:
        """50 concurrent copies of one signed request on one node: one 200, 49 409."""
        client = await make_gateway()
        headers = Signer(client).sign("GET", "/echo/x")
        assert await fire_copies([(client, {})], headers) == Counter({200: 1, 409: 49})

    async def test_redis_store_one_winner(
        self, make_gateway: GatewayFactory, redis_server: RedisService
    ) -> None:
        """The same through the Redis store."""
        client = await make_gateway(**redis_deps(redis_server))
        headers = Signer(client).sign("GET", "/echo/x")
        assert await fire_copies([(client, {})], headers) == Counter({200: 1, 409: 49})

    async def test_two_gateways_sharing_redis_one_winner(
        self, make_gateway: GatewayFactory, redis_server: RedisService
    ) -> None:
        """50 copies spread over two gateway instances sharing Redis: still one winner."""
        first = await make_gateway(**redis_deps(redis_server))
        second = await make_gateway(**redis_deps(redis_server))
        headers = Signer(first).sign("GET", "/echo/x")
        targets = [(first, {}), (second, same_host(first))]
        assert await fire_copies(targets, headers) == Counter({200: 1, 409: 49})


class TestSharedRedis:
    async def test_replay_to_second_gateway_is_refused(
        self, make_gateway: GatewayFactory, redis_server: RedisService
    ) -> None:
        """A request accepted by one gateway and replayed to another sharing Redis gets 409."""
        first = await make_gateway(**redis_deps(redis_server))
        second = await make_gateway(**redis_deps(redis_server))
        headers = Signer(first).sign("GET", "/echo/x?q=1")
        assert (await first.get("/echo/x?q=1", headers=headers)).status == 200
        replay = await second.get("/echo/x?q=1", headers={**headers, **same_host(first)})
        await assert_problem(replay, 409, "replayed-nonce", ["nonce_reused"])

    async def test_second_gateway_verifies_the_same_request(
        self, make_gateway: GatewayFactory, redis_server: RedisService
    ) -> None:
        """Control: the second gateway accepts the request while it is new."""
        first = await make_gateway(**redis_deps(redis_server))
        second = await make_gateway(**redis_deps(redis_server))
        headers = Signer(first).sign("GET", "/echo/x?q=1")
        response = await second.get("/echo/x?q=1", headers={**headers, **same_host(first)})
        assert response.status == 200

    async def test_nonce_key_and_ttl_in_redis(
        self, make_gateway: GatewayFactory, redis_server: RedisService
    ) -> None:
        """The claim is namespaced by tenant and keyid and lives max_skew_s + max_age_s."""
        client = await make_gateway(
            freshness={"max_skew_s": 30, "max_age_s": 90}, **redis_deps(redis_server)
        )
        response = await Signer(client, "globex-k1").request("GET", "/echo/x", nonce="ttl-probe")
        assert response.status == 200
        redis = client.app[REDIS]
        assert redis is not None
        key = nonce_key("globex", "globex-k1", "ttl-probe")
        assert 110 <= await redis.ttl(key) <= 120
        await redis.delete(key)

    async def test_redis_down_fails_closed(
        self, make_gateway: GatewayFactory, redis_server: RedisService
    ) -> None:
        """Redis down: signed requests get 503, unsigned ones still pass; back up, all pass."""
        client = await make_gateway(
            dependencies={"redis_url": redis_server.url, "probe_timeout_s": 0.5}
        )
        signer = Signer(client)
        redis_server.stop()
        try:
            response = await signer.request("GET", "/echo/x")
            await assert_problem(
                response, 503, "dependency-unavailable", ["replay_store_unavailable"]
            )
            assert (await client.get("/echo/x")).status == 200
        finally:
            redis_server.start()
        assert (await signer.request("GET", "/echo/x")).status == 200


class TestStoreChoice:
    def test_redis_store_needs_redis_url(self) -> None:
        """nonce_store = "redis" without dependencies.redis_url is a config error."""
        with pytest.raises(ConfigError) as caught:
            parse_config({"freshness": {"nonce_store": "redis"}})
        assert caught.value.key == "freshness.nonce_store"

    async def test_memory_store_is_per_node(
        self, make_gateway: GatewayFactory, redis_server: RedisService
    ) -> None:
        """nonce_store = "memory" keeps nonces per node even with Redis: not for a cluster."""
        deps = {"freshness": {"nonce_store": "memory"}, **redis_deps(redis_server)}
        first = await make_gateway(**deps)
        second = await make_gateway(**deps)
        headers = Signer(first).sign("GET", "/echo/x")
        assert (await first.get("/echo/x", headers=headers)).status == 200
        replay = await second.get("/echo/x", headers={**headers, **same_host(first)})
        assert replay.status == 200
        assert (await first.get("/echo/x", headers=headers)).status == 409
