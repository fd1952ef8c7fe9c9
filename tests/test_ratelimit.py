"""The ratelimit stage: quotas per tenant, agent, route and anonymous IP; real Redis and memory."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from redis.asyncio import Redis

from gateway.app import METRICS
from gateway.config import ConfigError, RouteConfig, load_config, parse_config
from gateway.context import RequestContext, Subject, Tenant
from gateway.errors import RateLimited
from gateway.metrics import Metrics
from gateway.pipeline.ratelimit import Ratelimit
from gateway.ratelimits import KEY_PREFIX
from tests.conftest import TEST_SECRETS, GatewayFactory, Signer
from tests.problems import assert_problem
from tests.services import RedisService

UPSTREAM = "http://127.0.0.1:9"
ROUTES = [
    {"name": "echo", "prefix": "/echo/", "upstream": UPSTREAM},
    {"name": "readonly", "prefix": "/readonly/", "upstream": UPSTREAM},
    {"name": "locked", "prefix": "/locked/", "upstream": UPSTREAM},
]
ROUTE_BY_NAME = {
    r["name"]: RouteConfig(name=r["name"], prefix=r["prefix"], upstream=r["upstream"])
    for r in ROUTES
}
STRATEGIES = ["sliding-window-counter", "moving-window", "fixed-window"]
# Hour-long windows: a test never straddles a window edge, so counts are exact.
_ITEM = re.compile(r'^"(?P<policy>[a-z]+)"((?:;[a-z]+=\d+)+)$')

StageFactory = Callable[..., Ratelimit]


def unique(prefix: str) -> str:
    """An id no other test (or earlier run against the same Redis) has used."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _key_config(keyid: str) -> dict[str, str]:
    """A tenant key entry with the test secret of ``keyid``."""
    return {"keyid": keyid, "secret": base64.b64encode(TEST_SECRETS[keyid]).decode()}


def unique_ip() -> str:
    raw = uuid.uuid4().bytes
    return f"10.{raw[0]}.{raw[1]}.{raw[2]}"


def parse_field(value: str) -> dict[str, dict[str, int]]:
    """A RateLimit / RateLimit-Policy field value: policy -> its integer parameters."""
    items: dict[str, dict[str, int]] = {}
    for member in value.split(", "):
        match = _ITEM.match(member)
        assert match is not None, value
        params = (p.split("=") for p in match.group(2).split(";")[1:])
        items[match.group("policy")] = {k: int(v) for k, v in params}
    return items


def make_ctx(
    tenant: str | None = None,
    *,
    tier: str | None = None,
    agent: str | None = None,
    route: str = "echo",
    ip: str = "203.0.113.7",
) -> RequestContext:
    request = make_mocked_request("GET", f"/{route}/x")
    return RequestContext(
        request=request,
        request_id=uuid.uuid4().hex,
        client_ip=ip,
        route=ROUTE_BY_NAME[route],
        tenant=Tenant(tenant, tier) if tenant is not None else None,
        subject=Subject(agent_id=agent),
    )


async def allowed(stage: Ratelimit, ctx: RequestContext) -> RequestContext:
    assert await stage.run(ctx) is None
    return ctx


async def refused(stage: Ratelimit, ctx: RequestContext) -> RateLimited:
    with pytest.raises(RateLimited) as info:
        await stage.run(ctx)
    return info.value


@pytest.fixture
async def redis_client(redis_server: RedisService) -> AsyncIterator[Redis]:
    # Generous timeouts: on a loaded CI machine a 0.5 s stall would (correctly)
    # degrade to per-node memory and make the shared-quota tests meaningless.
    client: Redis = Redis.from_url(redis_server.url, socket_connect_timeout=5, socket_timeout=5)
    yield client
    await client.aclose()


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> RedisService | None:
    """Each stage test runs once on memory and once on the real Redis."""
    if request.param == "memory":
        return None
    service: RedisService = request.getfixturevalue("redis_server")
    return service


@pytest.fixture
async def make_stage(backend: RedisService | None) -> AsyncIterator[StageFactory]:
    client: Redis | None = None
    if backend is not None:
        client = Redis.from_url(backend.url, socket_connect_timeout=0.5, socket_timeout=0.5)

    def factory(*, metrics: Metrics | None = None, **ratelimit: Any) -> Ratelimit:
        config = parse_config({"ratelimit": ratelimit, "routes": ROUTES})
        return Ratelimit.create(config.ratelimit, redis=client, metrics=metrics or Metrics())

    yield factory
    if client is not None:
        await client.aclose()


class TestConfig:
    def test_defaults(self) -> None:
        """Without a [ratelimit] table: 100/min per anonymous IP, default tier 1000/min, 100/s."""
        config = parse_config({}).ratelimit
        assert config.enabled
        assert (config.strategy, config.storage) == ("sliding-window-counter", "auto")
        assert config.anonymous == "100/minute"
        tier = config.tiers[config.default_tier]
        assert (tier.tenant, tier.agent, tier.route) == ("1000/minute", "100/second", "")

    def test_tiers_and_routes_parse(self) -> None:
        """Tiers and per-route overrides are tables keyed by name."""
        config = parse_config(
            {
                "routes": ROUTES,
                "ratelimit": {
                    "default_tier": "free",
                    "tiers": {"free": {"tenant": "10/minute"}, "gold": {"route": "5/second"}},
                    "routes": {"locked": {"limit": "1/second"}},
                },
            }
        ).ratelimit
        assert config.tiers["free"].tenant == "10/minute"
        assert config.tiers["gold"].route == "5/second"
        assert config.routes["locked"].limit == "1/second"

    def test_environment_override(self) -> None:
        """NOPS_GATEWAY__RATELIMIT__ANONYMOUS sets the anonymous limit."""
        config = load_config(None, environ={"NOPS_GATEWAY__RATELIMIT__ANONYMOUS": "5/second"})
        assert config.ratelimit.anonymous == "5/second"

    @pytest.mark.parametrize(
        ("table", "key", "message"),
        [
            pytest.param({"anonymous": "lots"}, "ratelimit.anonymous", "not a rate", id="syntax"),
            pytest.param(
                {"tiers": {"free": {"tenant": "5/fortnight"}}},
                "ratelimit.tiers.free.tenant",
                "not a rate",
                id="granularity",
            ),
            pytest.param(
                {"tiers": {"free": {"agent": "1/second;9/minute"}}},
                "ratelimit.tiers.free.agent",
                "not several",
                id="several",
            ),
            pytest.param(
                {"tiers": {"free": {"route": "0/minute"}}},
                "ratelimit.tiers.free.route",
                "at least one",
                id="zero",
            ),
            pytest.param(
                {"default_tier": "gold"}, "ratelimit.default_tier", "not defined", id="tier"
            ),
            pytest.param(
                {"tiers": {"gold": {}}}, "ratelimit.default_tier", "not defined", id="no-default"
            ),
            pytest.param(
                {"routes": {"nowhere": {"limit": "1/second"}}},
                "ratelimit.routes.nowhere",
                "no route",
                id="unknown-route",
            ),
            pytest.param(
                {"routes": {"echo": {"limit": ""}}},
                "ratelimit.routes.echo.limit",
                "empty",
                id="empty-route-limit",
            ),
            pytest.param(
                {"routes": {"echo": {}}}, "ratelimit.routes.echo.limit", "required", id="no-limit"
            ),
            pytest.param({"storage": "redis"}, "ratelimit.storage", "redis_url", id="no-redis"),
            pytest.param({"strategy": "token-bucket"}, "ratelimit.strategy", "one of", id="algo"),
            pytest.param({"fallback_retry_s": 0}, "ratelimit.fallback_retry_s", "> 0", id="retry"),
            pytest.param({"anonymus": "1/second"}, "ratelimit.anonymus", "unknown", id="typo"),
        ],
    )
    def test_bad_values_name_the_key(self, table: dict[str, Any], key: str, message: str) -> None:
        """A bad limit, tier, route or storage fails at load time, naming its key."""
        with pytest.raises(ConfigError) as info:
            parse_config({"routes": ROUTES, "ratelimit": table})
        assert info.value.key == key
        assert message in info.value.message


class TestTenantQuota:
    @pytest.mark.parametrize("strategy", STRATEGIES)
    async def test_burst_on_one_tenant_does_not_affect_another(
        self, make_stage: StageFactory, strategy: str
    ) -> None:
        """Tenant A past its quota gets 429 tenant_limit with Retry-After; tenant B is served."""
        stage = make_stage(strategy=strategy, tiers={"free": {"tenant": "3/hour"}})
        a, b = unique("acme"), unique("globex")
        for _ in range(3):
            await allowed(stage, make_ctx(a))
        ctx = make_ctx(a)
        error = await refused(stage, ctx)
        assert error.reasons == ("tenant_limit",)
        retry_after = int(error.headers["Retry-After"])
        assert 1 <= retry_after <= 3600
        assert error.extra == {"retry_after": retry_after}
        assert parse_field(ctx.response_headers["RateLimit"]) == {
            "tenant": {"r": 0, "t": retry_after}
        }
        assert parse_field(ctx.response_headers["RateLimit-Policy"]) == {
            "tenant": {"q": 3, "w": 3600}
        }
        ctx_b = await allowed(stage, make_ctx(b))
        assert parse_field(ctx_b.response_headers["RateLimit"]) == {"tenant": {"r": 2, "t": 3600}}

    async def test_headers_count_down(self, make_stage: StageFactory) -> None:
        """Each allowed request reports one unit less under every quota it took."""
        stage = make_stage(tiers={"free": {"tenant": "3/hour", "agent": "5/hour"}})
        tenant = unique("acme")
        seen = []
        for _ in range(3):
            ctx = await allowed(stage, make_ctx(tenant, agent="a1"))
            assert parse_field(ctx.response_headers["RateLimit-Policy"]) == {
                "tenant": {"q": 3, "w": 3600},
                "agent": {"q": 5, "w": 3600},
            }
            fields = parse_field(ctx.response_headers["RateLimit"])
            assert all(0 < item["t"] <= 3600 for item in fields.values())
            seen.append((fields["tenant"]["r"], fields["agent"]["r"]))
        assert seen == [(2, 4), (1, 3), (0, 2)]

    async def test_tier_of_the_tenant_applies(self, make_stage: StageFactory) -> None:
        """A tenant's tier picks its limits; a missing or unknown tier is the default tier."""
        stage = make_stage(
            tiers={"free": {"tenant": "1/hour"}, "gold": {"tenant": "3/hour"}},
        )
        outcomes = {}
        for tier in ("gold", None, "platinum"):
            tenant = unique("t")
            served = 0
            for _ in range(4):
                try:
                    await allowed(stage, make_ctx(tenant, tier=tier))
                    served += 1
                except RateLimited:
                    break
            outcomes[tier] = served
        assert outcomes == {"gold": 3, None: 1, "platinum": 1}


class TestAgentAndRouteQuotas:
    async def test_agent_quota_is_per_agent(self, make_stage: StageFactory) -> None:
        """One agent past its quota gets agent_limit; another agent of the tenant is served."""
        stage = make_stage(tiers={"free": {"tenant": "100/hour", "agent": "2/hour"}})
        tenant = unique("acme")
        for _ in range(2):
            await allowed(stage, make_ctx(tenant, agent="a1"))
        assert (await refused(stage, make_ctx(tenant, agent="a1"))).reasons == ("agent_limit",)
        await allowed(stage, make_ctx(tenant, agent="a2"))

    async def test_agent_quota_only_when_agent_is_known(self, make_stage: StageFactory) -> None:
        """Without an agent id the agent quota is not taken (and not advertised)."""
        stage = make_stage(tiers={"free": {"tenant": "100/hour", "agent": "1/hour"}})
        tenant = unique("acme")
        for _ in range(3):
            ctx = await allowed(stage, make_ctx(tenant))
        assert set(parse_field(ctx.response_headers["RateLimit"])) == {"tenant"}

    async def test_agent_ids_of_two_tenants_do_not_share(self, make_stage: StageFactory) -> None:
        """Agent quotas are keyed by tenant too, even when ids contain the key separator."""
        stage = make_stage(tiers={"free": {"tenant": "100/hour", "agent": "1/hour"}})
        tenant = unique("acme")
        await allowed(stage, make_ctx(f"{tenant}/x", agent="y"))
        await allowed(stage, make_ctx(tenant, agent="x/y"))
        await allowed(stage, make_ctx(tenant, agent="x%2Fy"))

    async def test_route_quota_is_per_tenant_and_route(self, make_stage: StageFactory) -> None:
        """A tier's route limit is per (tenant, route); an override replaces it for one route."""
        stage = make_stage(
            tiers={"free": {"tenant": "100/hour", "route": "2/hour"}},
            routes={"locked": {"limit": "1/hour"}},
        )
        tenant, other = unique("acme"), unique("globex")
        for _ in range(2):
            await allowed(stage, make_ctx(tenant, route="echo"))
        assert (await refused(stage, make_ctx(tenant, route="echo"))).reasons == ("route_limit",)
        await allowed(stage, make_ctx(tenant, route="readonly"))
        await allowed(stage, make_ctx(other, route="echo"))
        ctx = await allowed(stage, make_ctx(tenant, route="locked"))
        assert parse_field(ctx.response_headers["RateLimit-Policy"])["route"] == {
            "q": 1,
            "w": 3600,
        }
        assert (await refused(stage, make_ctx(tenant, route="locked"))).reasons == ("route_limit",)

    @pytest.mark.parametrize(
        ("tier", "reason"),
        [
            pytest.param({"tenant": "1/hour", "agent": "1/hour", "route": "1/hour"}, "tenant_limit",
                         id="tenant-first"),
            pytest.param({"tenant": "9/hour", "agent": "1/hour", "route": "1/hour"}, "agent_limit",
                         id="then-agent"),
            pytest.param({"tenant": "9/hour", "agent": "9/hour", "route": "1/hour"}, "route_limit",
                         id="then-route"),
        ],
    )  # fmt: skip
    async def test_first_exhausted_quota_in_order_refuses(
        self, make_stage: StageFactory, tier: dict[str, str], reason: str
    ) -> None:
        """Quotas are checked tenant, then agent, then route; the first one used up answers."""
        stage = make_stage(tiers={"free": tier})
        tenant = unique("acme")
        await allowed(stage, make_ctx(tenant, agent="a1"))
        assert (await refused(stage, make_ctx(tenant, agent="a1"))).reasons == (reason,)

    async def test_refused_request_consumes_no_quota(self, make_stage: StageFactory) -> None:
        """An agent hammering past its own quota does not use up its tenant's quota."""
        stage = make_stage(tiers={"free": {"tenant": "3/hour", "agent": "1/hour"}})
        tenant = unique("acme")
        await allowed(stage, make_ctx(tenant, agent="noisy"))
        for _ in range(5):
            ctx = make_ctx(tenant, agent="noisy")
            assert (await refused(stage, ctx)).reasons == ("agent_limit",)
            fields = parse_field(ctx.response_headers["RateLimit"])
            assert (fields["tenant"]["r"], fields["agent"]["r"]) == (2, 0)
        await allowed(stage, make_ctx(tenant, agent="a2"))
        ctx = await allowed(stage, make_ctx(tenant, agent="a3"))
        assert parse_field(ctx.response_headers["RateLimit"])["tenant"]["r"] == 0
        assert (await refused(stage, make_ctx(tenant, agent="a4"))).reasons == ("tenant_limit",)


class TestAnonymousQuota:
    async def test_per_client_ip(self, make_stage: StageFactory) -> None:
        """Requests with no tenant take the per-IP quota; another address is unaffected."""
        stage = make_stage(anonymous="2/hour")
        ip, other = unique_ip(), unique_ip()
        for _ in range(2):
            await allowed(stage, make_ctx(ip=ip))
        ctx = make_ctx(ip=ip)
        assert (await refused(stage, ctx)).reasons == ("anonymous_limit",)
        assert set(parse_field(ctx.response_headers["RateLimit"])) == {"anonymous"}
        await allowed(stage, make_ctx(ip=other))

    @pytest.mark.parametrize(
        ("first", "second", "shared"),
        [
            pytest.param("2001:db8:{a}:{b}::1", "2001:db8:{a}:{b}:ff::9", True, id="same-ipv6-64"),
            pytest.param("2001:db8:{a}:{b}::1", "2001:db8:{a}:{c}::1", False, id="other-ipv6-64"),
            pytest.param("::ffff:10.{a}.{b}.1", "10.{a}.{b}.1", True, id="ipv4-mapped"),
            pytest.param("10.{a}.{b}.1", "10.{a}.{b}.2", False, id="ipv4"),
        ],
    )
    async def test_address_partitions(
        self, make_stage: StageFactory, first: str, second: str, shared: bool
    ) -> None:
        """IPv6 clients share a quota per /64; IPv4-mapped addresses count as IPv4."""
        raw = uuid.uuid4().bytes
        numbers = {"a": raw[0], "b": raw[1], "c": (raw[1] + 1) % 256}
        stage = make_stage(anonymous="1/hour")
        await allowed(stage, make_ctx(ip=first.format(**numbers)))
        ctx = make_ctx(ip=second.format(**numbers))
        if shared:
            assert (await refused(stage, ctx)).reasons == ("anonymous_limit",)
        else:
            await allowed(stage, ctx)

    async def test_empty_limit_turns_a_level_off(self, make_stage: StageFactory) -> None:
        """anonymous = "" sets no anonymous quota: no 429 and no header fields."""
        stage = make_stage(anonymous="")
        for _ in range(3):
            ctx = await allowed(stage, make_ctx(ip=unique_ip()))
        assert ctx.response_headers == {}

    async def test_disabled_stage_takes_nothing(self, make_stage: StageFactory) -> None:
        """enabled = false: every request passes and no header fields are set."""
        stage = make_stage(enabled=False, anonymous="1/hour")
        ip = unique_ip()
        for _ in range(3):
            ctx = await allowed(stage, make_ctx(ip=ip))
        assert ctx.response_headers == {}


class TestSharedRedis:
    async def test_two_nodes_share_the_quota(self, redis_server: RedisService) -> None:
        """Two limiters on their own Redis clients draw from one tenant quota."""
        config = parse_config(
            {
                "routes": ROUTES,
                "dependencies": {"redis_url": redis_server.url},
                "ratelimit": {"storage": "redis", "tiers": {"free": {"tenant": "3/hour"}}},
            }
        ).ratelimit
        clients = [Redis.from_url(redis_server.url) for _ in range(2)]
        try:
            first, second = (Ratelimit.create(config, redis=c, metrics=Metrics()) for c in clients)
            tenant = unique("acme")
            await allowed(first, make_ctx(tenant))
            await allowed(second, make_ctx(tenant))
            await allowed(first, make_ctx(tenant))
            assert (await refused(second, make_ctx(tenant))).reasons == ("tenant_limit",)
            assert (await refused(first, make_ctx(tenant))).reasons == ("tenant_limit",)
            keys = [k.decode() async for k in clients[0].scan_iter(f"{KEY_PREFIX}:*{tenant}*")]
            assert keys, "quota keys live under the nops:rl: prefix"
        finally:
            for client in clients:
                await client.aclose()

    async def test_strategies_keep_apart(self, redis_client: Redis) -> None:
        """Nodes on different strategies (a rolling change) never share a key; none degrades."""
        tenant = unique("acme")
        for strategy in STRATEGIES:
            config = parse_config(
                {"ratelimit": {"strategy": strategy, "tiers": {"free": {"tenant": "2/hour"}}}}
            )
            stage = Ratelimit.create(config.ratelimit, redis=redis_client, metrics=Metrics())
            for _ in range(2):
                await allowed(stage, make_ctx(tenant))
            assert (await refused(stage, make_ctx(tenant))).reasons == ("tenant_limit",)
            assert not stage.degraded
        keys = {k.decode() async for k in redis_client.scan_iter(f"{KEY_PREFIX}:*{tenant}*")}
        assert {k.split(":")[2] for k in keys} == set(STRATEGIES)

    async def test_concurrent_requests_never_exceed_the_quota(self, redis_client: Redis) -> None:
        """Many concurrent requests for one tenant: exactly the quota is served."""
        config = parse_config({"ratelimit": {"tiers": {"free": {"tenant": "10/hour"}}}})
        stages = [
            Ratelimit.create(config.ratelimit, redis=redis_client, metrics=Metrics())
            for _ in range(3)
        ]
        tenant = unique("acme")

        async def one(index: int) -> bool:
            try:
                await stages[index % 3].run(make_ctx(tenant))
            except RateLimited:
                return False
            return True

        results = await asyncio.gather(*(one(i) for i in range(40)))
        assert not any(stage.degraded for stage in stages), "Redis stalled: fell back to memory"
        assert sum(results) == 10


class TestRedisDown:
    async def test_falls_back_to_memory_and_recovers(
        self,
        redis_server: RedisService,
        redis_client: Redis,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Redis down: limits hold per node in memory, degraded is flagged once; back: shared."""
        metrics = Metrics()
        config = parse_config(
            {"ratelimit": {"fallback_retry_s": 0.2, "tiers": {"free": {"tenant": "2/hour"}}}}
        ).ratelimit
        stage = Ratelimit.create(config, redis=redis_client, metrics=metrics)
        tenant = unique("acme")
        await allowed(stage, make_ctx(tenant))
        assert not stage.degraded
        caplog.set_level(logging.WARNING, logger="gateway.ratelimit")
        redis_server.stop()
        try:
            # Memory starts from zero: two more are served, then the limit holds.
            await allowed(stage, make_ctx(tenant))
            await allowed(stage, make_ctx(tenant))
            assert (await refused(stage, make_ctx(tenant))).reasons == ("tenant_limit",)
            assert stage.degraded
            assert metrics.ratelimit_degraded
            assert metrics.ratelimit_storage_errors >= 1
            warnings = [r for r in caplog.records if r.name == "gateway.ratelimit"]
            assert len(warnings) == 1
            assert "memory" in warnings[0].getMessage()
        finally:
            redis_server.start()
        deadline = time.monotonic() + 10
        while stage.degraded:
            assert time.monotonic() < deadline, "never went back to Redis"
            await asyncio.sleep(0.25)
            await allowed(stage, make_ctx(unique("probe")))
        assert not metrics.ratelimit_degraded
        # Back on Redis (restarted empty: the test server keeps no data), not on
        # memory, where this tenant's quota is used up: two more, then 429.
        for remaining in (1, 0):
            ctx = await allowed(stage, make_ctx(tenant))
            assert parse_field(ctx.response_headers["RateLimit"])["tenant"]["r"] == remaining
        assert (await refused(stage, make_ctx(tenant))).reasons == ("tenant_limit",)


class TestThroughTheGateway:
    @staticmethod
    async def get(client: TestClient[Any, Any], ip: str, path: str = "/echo/x") -> Any:
        return await client.get(path, headers={"X-Forwarded-For": ip})

    @pytest.fixture
    def sections(self) -> dict[str, Any]:
        return {
            "server": {"trusted_proxies": ["127.0.0.1"]},
            "ratelimit": {"anonymous": "3/hour"},
        }

    async def test_anonymous_limit_end_to_end(
        self, make_gateway: GatewayFactory, sections: dict[str, Any]
    ) -> None:
        """Unsigned requests: 3 proxied with RateLimit fields, then 429 problem; other IP served."""
        client = await make_gateway(**sections)
        ip = unique_ip()
        for remaining in (2, 1, 0):
            response = await self.get(client, ip)
            assert response.status == 200
            assert response.headers["RateLimit-Policy"] == '"anonymous";q=3;w=3600'
            assert parse_field(response.headers["RateLimit"])["anonymous"]["r"] == remaining
            assert response.headers["X-Content-Type-Options"] == "nosniff"
        response = await self.get(client, ip)
        body = await assert_problem(response, 429, "rate-limited", ["anonymous_limit"])
        retry_after = int(response.headers["Retry-After"])
        assert body["retry_after"] == retry_after
        assert parse_field(response.headers["RateLimit"]) == {
            "anonymous": {"r": 0, "t": retry_after}
        }
        assert response.headers["RateLimit-Policy"] == '"anonymous";q=3;w=3600'
        assert (await self.get(client, unique_ip())).status == 200
        metrics = client.app[METRICS]
        assert metrics.denial_reasons[("ratelimit", "anonymous_limit")] == 1
        assert metrics.denials[("ratelimit", "rate-limited")] == 1

    async def test_signed_burst_on_one_tenant_spares_another(
        self, make_gateway: GatewayFactory, redis_server: RedisService
    ) -> None:
        """Signed requests: tenant A past its tier's quota gets 429 on Redis; tenant B is served."""
        a, b = unique("acme"), unique("globex")
        tenants = [
            {"id": a, "tier": "professional", "keys": [_key_config("acme-k1")]},
            {"id": b, "tier": "free", "keys": [_key_config("globex-k1")]},
        ]
        client = await make_gateway(
            tenants=tenants,
            dependencies={"redis_url": redis_server.url},
            ratelimit={
                "anonymous": "1/hour",
                "tiers": {"free": {"tenant": "5/hour"}, "professional": {"tenant": "2/hour"}},
            },
        )
        acme, globex = Signer(client, keyid="acme-k1"), Signer(client, keyid="globex-k1")
        for remaining in (1, 0):
            response = await acme.request("GET", "/echo/x")
            assert response.status == 200
            assert response.headers["RateLimit-Policy"] == '"tenant";q=2;w=3600'
            assert parse_field(response.headers["RateLimit"])["tenant"]["r"] == remaining
        response = await acme.request("GET", "/echo/x")
        body = await assert_problem(response, 429, "rate-limited", ["tenant_limit"])
        assert body["retry_after"] == int(response.headers["Retry-After"]) > 0
        response = await globex.request("GET", "/echo/x")
        assert response.status == 200
        assert parse_field(response.headers["RateLimit"]) == {"tenant": {"r": 4, "t": 3600}}

    async def test_two_gateways_share_redis(
        self, make_gateway: GatewayFactory, sections: dict[str, Any], redis_server: RedisService
    ) -> None:
        """Two gateway processes on one Redis enforce one quota per client IP."""
        deps = {"redis_url": redis_server.url}
        first = await make_gateway(**sections, dependencies=deps)
        second = await make_gateway(**sections, dependencies=deps)
        ip = unique_ip()
        statuses = [(await self.get(gw, ip)).status for gw in (first, second, first, second)]
        assert statuses == [200, 200, 200, 429]

    async def test_redis_down_degrades_to_memory(
        self, make_gateway: GatewayFactory, sections: dict[str, Any], redis_server: RedisService
    ) -> None:
        """Redis stops: requests are still limited (per node) and metrics say degraded."""
        client = await make_gateway(
            **sections, dependencies={"redis_url": redis_server.url, "probe_timeout_s": 0.5}
        )
        ip = unique_ip()
        assert (await self.get(client, ip)).status == 200
        redis_server.stop()
        try:
            statuses = [(await self.get(client, ip)).status for _ in range(4)]
            assert statuses == [200, 200, 200, 429]
            assert client.app[METRICS].ratelimit_degraded
        finally:
            redis_server.start()

    async def test_upstream_ratelimit_fields_are_kept(
        self, make_gateway: GatewayFactory, sections: dict[str, Any]
    ) -> None:
        """An upstream's own RateLimit fields survive next to the gateway's (list members)."""

        async def limited(request: web.Request) -> web.Response:
            return web.Response(headers={"RateLimit": '"upstream";r=5;t=10'})

        app = web.Application()
        app.router.add_get("/{tail:.*}", limited)
        async with TestServer(app, host="127.0.0.1") as upstream:
            url = str(upstream.make_url("")).rstrip("/")
            client = await make_gateway(
                **sections,
                routes=[
                    {
                        "name": "echo",
                        "prefix": "/echo/",
                        "upstream": url,
                        "auth": "none",
                        "require_signature": False,
                    }
                ],
            )
            response = await self.get(client, unique_ip())
            assert response.status == 200
            fields = ", ".join(response.headers.getall("RateLimit"))
            assert set(parse_field(fields)) == {"upstream", "anonymous"}
