"""One Redis round trip: the nonce claim and the quota take in one script (real Redis)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import limits
import pytest
from limits.aio.storage import RedisStorage
from limits.aio.strategies import STRATEGIES
from redis.asyncio import Redis

from gateway.admission import RedisAdmission, Strategy
from gateway.ratelimits import KEY_PREFIX
from tests.conftest import TEST_SECRETS, GatewayFactory, Signer
from tests.problems import assert_problem
from tests.services import RedisService
from tests.test_ratelimit import _key_config, parse_field, unique

STRATEGY_NAMES: list[Strategy] = ["sliding-window-counter", "moving-window", "fixed-window"]


@pytest.fixture
async def redis_client(redis_server: RedisService) -> AsyncIterator[Redis]:
    client: Redis = Redis.from_url(redis_server.url, socket_connect_timeout=5, socket_timeout=5)
    yield client
    await client.aclose()


def item(limit: str, policy: str = "tenant") -> limits.RateLimitItem:
    parsed = limits.parse(limit)
    return type(parsed)(parsed.amount, parsed.multiples, namespace=policy)


def admission(redis: Redis, strategy: Strategy) -> RedisAdmission:
    return RedisAdmission(redis, strategy=strategy, key_prefix=f"{KEY_PREFIX}:{strategy}")


class TestScript:
    @pytest.mark.parametrize("strategy", STRATEGY_NAMES)
    async def test_takes_until_the_first_quota_runs_out(
        self, redis_client: Redis, strategy: Strategy
    ) -> None:
        """Each call takes one unit of every quota; the exhausted one refuses, nothing taken."""
        script = admission(redis_client, strategy)
        tenant, agent = unique("acme"), unique("agent")
        quotas = [(item("5/hour"), (tenant,)), (item("2/hour", "agent"), (tenant, agent))]
        seen = []
        for _ in range(3):
            admitted = await script.admit(quotas)
            seen.append((admitted.refused, [w.remaining for w in admitted.windows]))
        assert seen == [(None, [5, 2]), (None, [4, 1]), (1, [3, 0])]
        # The refused call took nothing from the tenant quota either.
        admitted = await script.admit(quotas[:1])
        assert [w.remaining for w in admitted.windows] == [3]

    @pytest.mark.parametrize("strategy", STRATEGY_NAMES)
    async def test_replayed_nonce_takes_nothing(
        self, redis_client: Redis, strategy: Strategy
    ) -> None:
        """A nonce claimed before ends the script: no quota is read or taken."""
        script = admission(redis_client, strategy)
        quotas = [(item("5/hour"), (unique("acme"),))]
        nonce = f"nops:nonce:{unique('t')}:k:{uuid.uuid4().hex}"
        first = await script.admit(quotas, nonce_key=nonce, nonce_ttl_s=120)
        again = await script.admit(quotas, nonce_key=nonce, nonce_ttl_s=120)
        after = await script.admit(quotas)
        assert (first.nonce_claimed, first.windows[0].remaining) == (True, 5)
        assert (again.nonce_claimed, again.refused, again.windows) == (False, None, ())
        assert after.windows[0].remaining == 4
        assert 110_000 <= await redis_client.pttl(nonce) <= 120_000

    async def test_refused_request_still_claims_its_nonce(self, redis_client: Redis) -> None:
        """As when freshness ran before ratelimit: a 429'd signature cannot be replayed later."""
        script = admission(redis_client, "sliding-window-counter")
        quotas = [(item("1/hour"), (unique("acme"),))]
        await script.admit(quotas)
        nonce = f"nops:nonce:{unique('t')}:k:n"
        refused = await script.admit(quotas, nonce_key=nonce, nonce_ttl_s=60)
        assert (refused.nonce_claimed, refused.refused) == (True, 0)
        assert not (await script.admit([], nonce_key=nonce, nonce_ttl_s=60)).nonce_claimed

    @pytest.mark.parametrize("strategy", STRATEGY_NAMES)
    async def test_shares_windows_with_limits(
        self, redis_client: Redis, strategy: Strategy
    ) -> None:
        """Same keys and data as the ``limits`` library: a node on either sees the other's takes."""
        storage = RedisStorage(
            "async+redis://",
            implementation="redispy",
            key_prefix=f"{KEY_PREFIX}:{strategy}",
            connection_pool=redis_client.connection_pool,  # type: ignore[arg-type]
        )
        library = STRATEGIES[strategy](storage)  # type: ignore[abstract]
        script = admission(redis_client, strategy)
        quota, tenant = item("4/hour"), unique("acme")
        assert await library.hit(quota, tenant)
        admitted = await script.admit([(quota, (tenant,))])
        assert admitted.windows[0].remaining == 3
        stats = await library.get_window_stats(quota, tenant)
        assert stats.remaining == 2
        assert await library.hit(quota, tenant)
        assert (await script.admit([(quota, (tenant,))])).windows[0].remaining == 1
        assert not await library.hit(quota, tenant)

    @pytest.mark.parametrize("strategy", STRATEGY_NAMES)
    async def test_concurrent_takes_never_exceed(
        self, redis_client: Redis, strategy: Strategy
    ) -> None:
        """Atomic: 20 concurrent takes of a 7-unit quota admit exactly 7."""
        script = admission(redis_client, strategy)
        quotas = [(item("7/hour"), (unique("acme"),))]
        results = await asyncio.gather(*(script.admit(quotas) for _ in range(20)))
        assert sum(r.refused is None for r in results) == 7


async def _gateway_commands(redis: Redis, send: Any) -> list[str]:
    """The commands clients (not scripts) sent to Redis while ``send()`` ran."""
    marker = f"marker-{uuid.uuid4().hex}"
    commands: list[str] = []
    async with redis.monitor() as monitor:
        await send()
        await redis.echo(marker)
        while True:
            entry = await asyncio.wait_for(monitor.next_command(), timeout=5)
            if marker in entry["command"]:
                return commands
            if entry["client_type"] != "lua":
                commands.append(entry["command"])


class TestThroughTheGateway:
    @pytest.mark.parametrize(
        ("ratelimit", "command", "remaining"),
        [
            pytest.param({}, "EVALSHA", 3, id="quotas-in-redis"),
            pytest.param({"storage": "memory"}, "SET", 3, id="quotas-in-memory"),
            pytest.param({"enabled": False}, "SET", None, id="ratelimit-off"),
        ],
    )
    async def test_one_round_trip_per_signed_request(
        self,
        make_gateway: GatewayFactory,
        redis_server: RedisService,
        redis_client: Redis,
        ratelimit: dict[str, Any],
        command: str,
        remaining: int | None,
    ) -> None:
        """One Redis command per signed request: the script, or the plain SET without quotas."""
        tenant = unique("acme")
        client = await make_gateway(
            tenants=[{"id": tenant, "keys": [_key_config("acme-k1")]}],
            dependencies={"redis_url": redis_server.url},
            ratelimit={"tiers": {"free": {"tenant": "5/hour"}}, **ratelimit},
        )
        signer = Signer(client, keyid="acme-k1", secret=TEST_SECRETS["acme-k1"])
        assert (await signer.request("GET", "/echo/x")).status == 200  # loads the script
        responses = []

        async def send() -> None:
            responses.append(await signer.request("GET", "/echo/x"))

        commands = await _gateway_commands(redis_client, send)
        ours = [c for c in commands if tenant in c]
        assert len(ours) == 1, commands
        assert ours[0].split()[0] == command
        assert responses[0].status == 200
        if remaining is None:
            assert "RateLimit" not in responses[0].headers
        else:
            assert parse_field(responses[0].headers["RateLimit"])["tenant"]["r"] == remaining

    async def test_replay_and_limit_answers_are_unchanged(
        self, make_gateway: GatewayFactory, redis_server: RedisService
    ) -> None:
        """Over the combined call: a replay is 409 and takes nothing; the limit is 429."""
        tenant = unique("acme")
        client = await make_gateway(
            tenants=[{"id": tenant, "keys": [_key_config("acme-k1")]}],
            dependencies={"redis_url": redis_server.url},
            ratelimit={"tiers": {"free": {"tenant": "2/hour"}}},
        )
        signer = Signer(client, keyid="acme-k1")
        headers = signer.sign("GET", "/echo/x")
        first = await client.get("/echo/x", headers=headers)
        assert parse_field(first.headers["RateLimit"])["tenant"]["r"] == 1
        replay = await client.get("/echo/x", headers=headers)
        await assert_problem(replay, 409, "replayed-nonce", ["nonce_reused"])
        second = await signer.request("GET", "/echo/x")
        assert parse_field(second.headers["RateLimit"])["tenant"]["r"] == 0
        third = await signer.request("GET", "/echo/x")
        await assert_problem(third, 429, "rate-limited", ["tenant_limit"])
        assert int(third.headers["Retry-After"]) > 0
