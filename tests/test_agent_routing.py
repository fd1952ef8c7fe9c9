"""Agent routing end to end: a real gateway, OPA, registry on PostgreSQL, and real agents."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestServer, make_mocked_request

from gateway.agents import parse_agent_target
from gateway.apikeys import hash_secret
from gateway.app import CONFIG
from gateway.config import AgentRouteConfig, ConfigError, RouteConfig, parse_config
from gateway.context import RequestContext
from gateway.errors import MalformedRequest, NoRoute
from gateway.policy.input import build_input
from tests.agentkit import AgentProcess, create_agent_app
from tests.conftest import GatewayFactory, PinnedClock, free_port
from tests.problems import assert_problem
from tests.registrykit import Client, RegistryFactory, tenant
from tests.secretscan import register_secret

SECRET = "s3cret-" + "x" * 40
register_secret(SECRET, "API key secret (agent routing)")
ACME_KEY = {"Authorization": f"ApiKey acme-key.{SECRET}"}
GLOBEX_KEY = {"Authorization": f"ApiKey globex-key.{SECRET}"}
API_KEYS = [
    {"id": "acme-key", "tenant": "acme", "hash": hash_secret(SECRET)},
    {"id": "globex-key", "tenant": "globex", "hash": hash_secret(SECRET)},
]

AgentGatewayFactory = Callable[..., Awaitable[Client]]
Register = Callable[..., Awaitable[None]]


@pytest.fixture
async def registry(make_registry: RegistryFactory) -> Client:
    """The registry service on the test database, with a pinned clock."""
    return await make_registry()


@pytest.fixture
def register(registry: Client) -> Register:
    """Register an agent at ``url`` for a tenant."""

    async def register(agent_id: str, url: str, *, owner: str = "acme", **fields: Any) -> None:
        body = {"id": agent_id, "endpoint_url": url, **fields}
        response = await registry.post("/agents", json=body, headers=tenant(owner))
        assert response.status == 201, await response.text()

    return register


@pytest.fixture
async def make_agent_gateway(make_gateway: GatewayFactory, registry: Client) -> AgentGatewayFactory:
    """Gateways with one agent route, /agents/, reading the test registry."""

    async def factory(
        route: dict[str, Any] | None = None,
        *,
        sign_as: str | None = None,
        span_exporter: Any = None,
        **agent: Any,
    ) -> Client:
        settings = {"registry_url": str(registry.make_url("")).rstrip("/"), "cache_ttl_s": 0}
        settings.update(agent)
        table = {
            "name": "agents",
            "prefix": "/agents/",
            "kind": "agent",
            "auth": "api_key",
            # Unsigned requests pass as unsigned; the API key names the tenant.
            # TestSignedPipeline covers the route with signatures required.
            "require_signature": False,
            "timeout_s": 2.0,
            "connect_timeout_s": 1.0,
            "agent": settings,
        }
        table.update(route or {})
        # Unsigned traffic counts against the per-IP anonymous quota (100/minute);
        # these tests send hundreds of requests to exercise routing, not quotas.
        return await make_gateway(
            routes=[table],
            api_keys=API_KEYS,
            sign_as=sign_as,
            ratelimit={"anonymous": "100000/minute"},
            span_exporter=span_exporter,
        )

    return factory


@pytest.fixture
async def agents() -> AsyncIterator[Callable[[str], Awaitable[str]]]:
    """Start in-process agents by name; each returns its base URL."""
    servers: list[TestServer] = []

    async def start(name: str) -> str:
        server = TestServer(create_agent_app(name), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
def processes() -> Iterator[Callable[[str], AgentProcess]]:
    """Start agents as processes (killable); all stopped at the end."""
    started: list[AgentProcess] = []

    def start(name: str) -> AgentProcess:
        agent = AgentProcess(name, free_port())
        agent.start()
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.kill()


async def _agent_of(response: Any) -> str:
    assert response.status == 200, await response.text()
    name: str = (await response.json())["agent"]
    return name


class TestTargetParsing:
    @pytest.mark.parametrize(
        ("path", "agent_id", "capability", "rest"),
        [
            pytest.param("/agents/a1", "a1", None, "/", id="bare-id"),
            pytest.param("/agents/a1/", "a1", None, "/", id="id-slash"),
            pytest.param("/agents/a1/tasks/7?x=1", "a1", None, "/tasks/7", id="id-rest"),
            pytest.param("/agents/by-capability/sum", None, "sum", "/", id="capability"),
            pytest.param(
                "/agents/by-capability/nlp:summarize/v1/run",
                None,
                "nlp:summarize",
                "/v1/run",
                id="capability-rest",
            ),
        ],
    )
    def test_paths_name_an_agent_or_a_capability(
        self, path: str, agent_id: str | None, capability: str | None, rest: str
    ) -> None:
        """The first segment is an agent id, or by-capability/<name>; the rest goes to the agent."""
        route = RouteConfig(
            name="agents", prefix="/agents/", kind="agent", agent=AgentRouteConfig("http://r")
        )
        target = parse_agent_target(route, path)
        assert (target.agent_id, target.capability, target.path) == (agent_id, capability, rest)

    @pytest.mark.parametrize(
        ("path", "error", "reasons"),
        [
            pytest.param("/agents/", NoRoute, (), id="no-id"),
            pytest.param("/agents", NoRoute, (), id="prefix-only"),
            pytest.param("/agents/by-capability", NoRoute, (), id="no-capability"),
            pytest.param("/agents/by-capability/", NoRoute, (), id="empty-capability"),
            pytest.param("/agents/A1/x", MalformedRequest, ("invalid_agent_id",), id="upper"),
            pytest.param("/agents/a%41/x", MalformedRequest, ("invalid_agent_id",), id="encoded"),
            pytest.param(
                "/agents/by-capability/Bad!/x",
                MalformedRequest,
                ("invalid_capability",),
                id="bad-capability",
            ),
        ],
    )
    def test_bad_paths(self, path: str, error: type[Exception], reasons: tuple[str, ...]) -> None:
        """A path naming nothing is a 404; one naming something impossible is a 400."""
        route = RouteConfig(
            name="agents", prefix="/agents/", kind="agent", agent=AgentRouteConfig("http://r")
        )
        with pytest.raises(error) as caught:
            parse_agent_target(route, path)
        assert getattr(caught.value, "reasons", ()) == reasons


class TestDirectRouting:
    async def test_request_reaches_the_agent(
        self,
        make_agent_gateway: AgentGatewayFactory,
        register: Register,
        agents: Callable[[str], Awaitable[str]],
    ) -> None:
        """/agents/{id}/rest reaches the agent at {endpoint}/rest with query, body and identity."""
        url = await agents("a1")
        await register("a1", url + "/base")
        gateway = await make_agent_gateway()
        response = await gateway.post(
            "/agents/a1/tasks/7?mode=fast&x=%20y",
            data=b"x" * 1000,
            headers={**ACME_KEY, "X-Nops-Tenant": "globex"},
        )
        assert response.status == 200
        seen = await response.json()
        assert seen["agent"] == "a1"
        assert seen["method"] == "POST"
        assert seen["raw_path"] == "/base/tasks/7?mode=fast&x=%20y"
        assert seen["body_bytes"] == 1000
        assert seen["headers"]["x-nops-tenant"] == "acme"  # the verified one, not the caller's
        assert seen["headers"]["x-nops-subject"] == "acme-key"
        assert "authorization" not in seen["headers"]
        assert seen["headers"]["x-request-id"] == response.headers["X-Request-Id"]

    @pytest.mark.parametrize(
        ("path", "headers", "status", "code", "reasons"),
        [
            pytest.param("/agents/ghost/x", ACME_KEY, 404, "agent-not-found", ["unknown_agent"],
                         id="unknown"),
            pytest.param("/agents/a1/x", GLOBEX_KEY, 404, "agent-not-found", ["unknown_agent"],
                         id="other-tenants-agent"),
            pytest.param("/agents/a1/x", {}, 401, "missing-credentials", None, id="anonymous"),
            pytest.param("/agents/A1/x", ACME_KEY, 400, "malformed-request", ["invalid_agent_id"],
                         id="bad-id"),
            pytest.param("/agents/", ACME_KEY, 404, "no-route", None, id="no-id"),
        ],
    )  # fmt: skip
    async def test_refusals(
        self,
        make_agent_gateway: AgentGatewayFactory,
        register: Register,
        agents: Callable[[str], Awaitable[str]],
        path: str,
        headers: dict[str, str],
        status: int,
        code: str,
        reasons: list[str] | None,
    ) -> None:
        """Requests that cannot reach an agent get a problem naming why."""
        await register("a1", await agents("a1"))
        gateway = await make_agent_gateway()
        response = await gateway.get(path, headers=headers)
        await assert_problem(response, status, code, reasons)

    @pytest.mark.parametrize(
        ("age", "status", "reason"),
        [
            pytest.param(14, 200, None, id="healthy"),
            pytest.param(20, 503, "agent_stale", id="stale"),
            pytest.param(120, 503, "agent_zombie", id="zombie"),
        ],
    )
    async def test_only_healthy_agents_get_traffic(
        self,
        make_agent_gateway: AgentGatewayFactory,
        register: Register,
        agents: Callable[[str], Awaitable[str]],
        clock: PinnedClock,
        age: float,
        status: int,
        reason: str | None,
    ) -> None:
        """An agent whose heartbeat is too old is not called: 503 agent-unavailable."""
        await register("a1", await agents("a1"))
        gateway = await make_agent_gateway()
        clock.advance(age)
        response = await gateway.get("/agents/a1/x", headers=ACME_KEY)
        if reason is None:
            assert await _agent_of(response) == "a1"
        else:
            await assert_problem(response, status, "agent-unavailable", [reason])

    async def test_heartbeat_brings_an_agent_back(
        self,
        make_agent_gateway: AgentGatewayFactory,
        register: Register,
        registry: Client,
        agents: Callable[[str], Awaitable[str]],
        clock: PinnedClock,
    ) -> None:
        """An agent that dies (no heartbeat) is routed around; one that heartbeats is back."""
        await register("a1", await agents("a1"))
        gateway = await make_agent_gateway()
        clock.advance(120)
        await assert_problem(
            await gateway.get("/agents/a1/x", headers=ACME_KEY), 503, "agent-unavailable"
        )
        await registry.post("/agents/a1/heartbeat", headers=tenant("acme"))
        assert await _agent_of(await gateway.get("/agents/a1/x", headers=ACME_KEY)) == "a1"

    async def test_registry_down_is_503_then_cached_answers_serve(
        self,
        make_agent_gateway: AgentGatewayFactory,
        register: Register,
        registry: Client,
        agents: Callable[[str], Awaitable[str]],
    ) -> None:
        """No registry answer: fail closed (503), except for answers within stale_if_error_s."""
        await register("a1", await agents("a1"))
        no_cache = await make_agent_gateway(stale_if_error_s=0)
        cached = await make_agent_gateway(cache_ttl_s=0.01, stale_if_error_s=60)
        assert await _agent_of(await cached.get("/agents/a1/x", headers=ACME_KEY)) == "a1"
        await registry.close()
        await asyncio.sleep(0.02)
        response = await no_cache.get("/agents/a1/x", headers=ACME_KEY)
        await assert_problem(response, 503, "dependency-unavailable", ["registry_unavailable"])
        assert await _agent_of(await cached.get("/agents/a1/x", headers=ACME_KEY)) == "a1"
        unseen = await cached.get("/agents/a2/x", headers=ACME_KEY)
        await assert_problem(unseen, 503, "dependency-unavailable", ["registry_unavailable"])


class TestSignedPipeline:
    async def test_signed_request_reaches_the_agent_through_every_stage(
        self,
        make_agent_gateway: AgentGatewayFactory,
        register: Register,
        agents: Callable[[str], Awaitable[str]],
    ) -> None:
        """With signatures required, a signed request with its body reaches the agent intact."""
        await register("a1", await agents("a1"))
        gateway = await make_agent_gateway({"require_signature": True}, sign_as="acme-k1")
        response = await gateway.post("/agents/a1/tasks", data=b"x" * 500, headers=ACME_KEY)
        seen = await response.json()
        assert (response.status, seen["agent"], seen["body_bytes"]) == (200, "a1", 500)
        assert seen["headers"]["x-nops-tenant"] == "acme"
        assert "signature" not in seen["headers"]

    async def test_signer_and_key_of_different_tenants_are_refused(
        self,
        make_agent_gateway: AgentGatewayFactory,
        register: Register,
        agents: Callable[[str], Awaitable[str]],
    ) -> None:
        """acme's signature with globex's API key never reaches globex's agents."""
        await register("g1", await agents("g1"), owner="globex")
        gateway = await make_agent_gateway({"require_signature": True}, sign_as="acme-k1")
        response = await gateway.get("/agents/g1/x", headers=GLOBEX_KEY)
        await assert_problem(response, 403, "tenant-mismatch")

    async def test_unsigned_request_is_refused(
        self, make_agent_gateway: AgentGatewayFactory
    ) -> None:
        """On a route that requires signatures, an unsigned request stops at the signature stage."""
        gateway = await make_agent_gateway({"require_signature": True})
        response = await gateway.get("/agents/a1/x", headers=ACME_KEY)
        await assert_problem(response, 401, "missing-signature")


class TestCapabilityRouting:
    async def test_weighted_choice_among_healthy_instances(
        self,
        make_agent_gateway: AgentGatewayFactory,
        register: Register,
        agents: Callable[[str], Awaitable[str]],
    ) -> None:
        """Traffic for a capability spreads over its healthy instances in proportion to weight."""
        await register("light", await agents("light"), capabilities=["sum"], weight=1)
        await register("heavy", await agents("heavy"), capabilities=["sum"], weight=3)
        await register("other", await agents("other"), capabilities=["translate"])
        gateway = await make_agent_gateway(cache_ttl_s=60)
        served = Counter(
            [
                await _agent_of(await gateway.get("/agents/by-capability/sum/x", headers=ACME_KEY))
                for _ in range(400)
            ]
        )
        assert set(served) == {"light", "heavy"}
        assert 0.65 < served["heavy"] / 400 < 0.85  # expected 0.75; ±0.10 is > 4 sigma

    async def test_stale_zombie_and_drained_agents_get_nothing(
        self,
        make_agent_gateway: AgentGatewayFactory,
        register: Register,
        registry: Client,
        agents: Callable[[str], Awaitable[str]],
        clock: PinnedClock,
    ) -> None:
        """Only healthy instances with weight > 0 are chosen."""
        await register("zombie", await agents("zombie"), capabilities=["sum"])
        clock.advance(50)
        await register("stale", await agents("stale"), capabilities=["sum"])
        clock.advance(20)
        await register("drained", await agents("drained"), capabilities=["sum"], weight=0)
        await register("live", await agents("live"), capabilities=["sum"])
        gateway = await make_agent_gateway()
        served = {
            await _agent_of(await gateway.get("/agents/by-capability/sum/x", headers=ACME_KEY))
            for _ in range(40)
        }
        assert served == {"live"}
        # A drained agent is still reachable by id.
        assert (
            await _agent_of(await gateway.get("/agents/drained/x", headers=ACME_KEY)) == "drained"
        )

    async def test_no_healthy_instance_is_503(
        self,
        make_agent_gateway: AgentGatewayFactory,
        register: Register,
        agents: Callable[[str], Awaitable[str]],
        clock: PinnedClock,
    ) -> None:
        """A capability with no healthy instance (or none at all) is a 503 naming why."""
        await register("z", await agents("z"), capabilities=["sum"])
        clock.advance(61)
        gateway = await make_agent_gateway()
        for path in ("/agents/by-capability/sum/x", "/agents/by-capability/none/x"):
            response = await gateway.get(path, headers=ACME_KEY)
            await assert_problem(response, 503, "agent-unavailable", ["no_healthy_agent"])

    async def test_capability_is_per_tenant(
        self,
        make_agent_gateway: AgentGatewayFactory,
        register: Register,
        agents: Callable[[str], Awaitable[str]],
    ) -> None:
        """A tenant's capability lookup never finds another tenant's agents."""
        await register("g1", await agents("g1"), owner="globex", capabilities=["sum"])
        gateway = await make_agent_gateway()
        response = await gateway.get("/agents/by-capability/sum/x", headers=ACME_KEY)
        await assert_problem(response, 503, "agent-unavailable", ["no_healthy_agent"])
        assert (
            await _agent_of(await gateway.get("/agents/by-capability/sum/x", headers=GLOBEX_KEY))
            == "g1"
        )


class TestFailover:
    async def test_agent_killed_mid_traffic_loses_no_request(
        self,
        make_agent_gateway: AgentGatewayFactory,
        register: Register,
        processes: Callable[[str], AgentProcess],
    ) -> None:
        """Kill one of two instances under load: every request succeeds, within 3 s, elsewhere."""
        doomed, survivor = processes("doomed"), processes("survivor")
        for agent in (doomed, survivor):
            await register(agent.name, agent.url, capabilities=["sum"])
        gateway = await make_agent_gateway(cache_ttl_s=60)
        results: list[tuple[int, str, float, float]] = []

        async def one(i: int) -> None:
            path = (
                f"/agents/by-capability/sum/slow/0.05?i={i}"
                if i % 3
                else "/agents/by-capability/sum/x"
            )
            started = time.monotonic()
            response = await gateway.get(path, headers=ACME_KEY)
            body = await response.json() if response.status == 200 else {}
            results.append((response.status, body.get("agent", ""), started, time.monotonic()))

        async def stream(worker: int) -> None:
            for i in range(worker, 300, 10):
                await one(i)

        traffic = asyncio.gather(*(stream(w) for w in range(10)))
        # Kill only once both instances have answered (a fixed sleep raced a loaded machine).
        for _ in range(500):
            if {agent for _, agent, _, _ in results} == {"doomed", "survivor"}:
                break
            await asyncio.sleep(0.01)
        killed_at = time.monotonic()
        doomed.kill()
        await traffic

        statuses = Counter(status for status, *_ in results)
        assert statuses == {200: 300}
        after = [r for r in results if r[2] > killed_at + 0.01]
        assert after
        assert {agent for _, agent, _, _ in after} == {"survivor"}
        in_flight = [end - start for _, _, start, end in results if start <= killed_at <= end]
        assert max(in_flight, default=0) < 3.0
        served_before = {agent for _, agent, start, _ in results if start < killed_at}
        assert served_before == {"doomed", "survivor"}

    async def test_post_fails_over_when_nothing_was_sent(
        self,
        make_agent_gateway: AgentGatewayFactory,
        register: Register,
        agents: Callable[[str], Awaitable[str]],
        processes: Callable[[str], AgentProcess],
    ) -> None:
        """A POST to a dead instance (connection refused) goes to another one: nothing was sent."""
        dead = processes("dead")
        dead.kill()
        await register("dead", dead.url, capabilities=["sum"], weight=1000)
        await register("live", await agents("live"), capabilities=["sum"], weight=1)
        gateway = await make_agent_gateway()
        for _ in range(20):
            response = await gateway.post(
                "/agents/by-capability/sum/x", json={"task": 1}, headers=ACME_KEY
            )
            assert await _agent_of(response) == "live"

    async def test_post_in_flight_when_the_agent_dies_is_not_retried(
        self,
        make_agent_gateway: AgentGatewayFactory,
        register: Register,
        agents: Callable[[str], Awaitable[str]],
        processes: Callable[[str], AgentProcess],
    ) -> None:
        """A POST the agent may have acted on is not repeated: 502, while a GET is retried."""
        doomed = processes("doomed")
        await register("doomed", doomed.url, capabilities=["sum"], weight=1000)
        await register("live", await agents("live"), capabilities=["sum"], weight=1)
        gateway = await make_agent_gateway(retries=3)
        post = asyncio.ensure_future(
            gateway.post("/agents/by-capability/sum/slow/1", json={}, headers=ACME_KEY)
        )
        get = asyncio.ensure_future(
            gateway.get("/agents/by-capability/sum/slow/1", headers=ACME_KEY)
        )
        await asyncio.sleep(0.4)
        doomed.kill()
        await assert_problem(await post, 502, "upstream-unavailable")
        assert await _agent_of(await get) == "live"

    @pytest.mark.parametrize(
        ("method", "agents_called", "status"),
        [
            pytest.param("GET", ["sick", "well"], 200, id="get-retried"),
            pytest.param("PUT", ["sick", "well"], 200, id="put-retried"),
            pytest.param("POST", ["sick"], 503, id="post-relayed"),
        ],
    )
    async def test_503_from_an_agent(
        self,
        make_agent_gateway: AgentGatewayFactory,
        register: Register,
        agents: Callable[[str], Awaitable[str]],
        method: str,
        agents_called: list[str],
        status: int,
    ) -> None:
        """An agent's 502/503/504 is retried elsewhere for idempotent methods, else relayed."""
        sick_url = await agents("sick")
        well_url = await agents("well")
        await register("sick", sick_url, capabilities=["sum"], weight=1000)
        await register("well", well_url, capabilities=["sum"], weight=1)
        gateway = await make_agent_gateway()
        response = await gateway.request(
            method, "/agents/by-capability/sum/fail-if/sick/503", headers=ACME_KEY
        )
        assert response.status == status
        body = await response.json()
        assert body["agent"] == agents_called[-1]

    async def test_slow_agent_times_out_and_fails_over(
        self,
        make_agent_gateway: AgentGatewayFactory,
        register: Register,
        agents: Callable[[str], Awaitable[str]],
    ) -> None:
        """A GET to an instance slower than timeout_s is retried on another within the budget."""
        laggard_url, quick_url = await agents("laggard"), await agents("quick")
        await register("laggard", laggard_url, capabilities=["sum"], weight=1000)
        await register("quick", quick_url, capabilities=["sum"], weight=1)
        gateway = await make_agent_gateway(route={"timeout_s": 0.3})
        started = time.monotonic()
        path = "/agents/by-capability/sum/slow-if/laggard/5"
        assert await _agent_of(await gateway.get(path, headers=ACME_KEY)) == "quick"
        assert time.monotonic() - started < 3.0

    async def test_direct_route_to_dead_agent_is_502_after_retries(
        self,
        make_agent_gateway: AgentGatewayFactory,
        register: Register,
        processes: Callable[[str], AgentProcess],
    ) -> None:
        """With one instance and nowhere to fail over, the caller gets 502 quickly."""
        dead = processes("dead")
        dead.kill()
        await register("dead", dead.url)
        gateway = await make_agent_gateway()
        started = time.monotonic()
        response = await gateway.get("/agents/dead/x", headers=ACME_KEY)
        await assert_problem(response, 502, "upstream-unavailable")
        assert time.monotonic() - started < 1.0


class TestCircuitBreakerInTheGateway:
    async def test_open_half_open_closed(
        self,
        make_agent_gateway: AgentGatewayFactory,
        register: Register,
        processes: Callable[[str], AgentProcess],
    ) -> None:
        """Failures open the circuit (fast 503s, no calls); after open_s a trial closes it."""
        agent = processes("flaky")
        await register("flaky", agent.url)
        gateway = await make_agent_gateway(
            retries=0, circuit_failures=3, circuit_open_s=3.0, cache_ttl_s=60
        )
        assert await _agent_of(await gateway.get("/agents/flaky/x", headers=ACME_KEY)) == "flaky"
        agent.kill()
        for _ in range(3):
            await assert_problem(
                await gateway.get("/agents/flaky/x", headers=ACME_KEY), 502, "upstream-unavailable"
            )
        opened = time.monotonic()
        refused = await gateway.get("/agents/flaky/x", headers=ACME_KEY)
        await assert_problem(refused, 503, "agent-unavailable", ["circuit_open"])

        agent.start()  # back on the same port, but the circuit is still open
        assert time.monotonic() - opened < 3.0
        await assert_problem(
            await gateway.get("/agents/flaky/x", headers=ACME_KEY), 503, "agent-unavailable"
        )
        await asyncio.sleep(3.05 - (time.monotonic() - opened))
        # Half-open: one trial goes through and closes the circuit.
        assert await _agent_of(await gateway.get("/agents/flaky/x", headers=ACME_KEY)) == "flaky"
        assert await _agent_of(await gateway.get("/agents/flaky/x", headers=ACME_KEY)) == "flaky"

    async def test_open_circuit_fails_over_to_another_instance(
        self,
        make_agent_gateway: AgentGatewayFactory,
        register: Register,
        agents: Callable[[str], Awaitable[str]],
        processes: Callable[[str], AgentProcess],
    ) -> None:
        """Once an instance's circuit is open, capability traffic skips it without trying."""
        dead = processes("dead")
        dead.kill()
        await register("dead", dead.url, capabilities=["sum"], weight=1)
        await register("live", await agents("live"), capabilities=["sum"], weight=1)
        gateway = await make_agent_gateway(circuit_failures=2, circuit_open_s=60, cache_ttl_s=60)
        served = Counter(
            [
                await _agent_of(await gateway.get("/agents/by-capability/sum/x", headers=ACME_KEY))
                for _ in range(50)
            ]
        )
        assert served == {"live": 50}


class TestPolicyInput:
    @pytest.mark.parametrize(
        ("path", "destination"),
        [
            pytest.param("/agents/a1/x", "a1", id="by-id"),
            pytest.param("/agents/by-capability/sum/x", "capability:sum", id="by-capability"),
        ],
    )
    async def test_policy_sees_the_agent_target(
        self, make_agent_gateway: AgentGatewayFactory, path: str, destination: str
    ) -> None:
        """The decision input names target kind "agent" and the agent id or capability."""
        gateway = await make_agent_gateway()
        route = gateway.app[CONFIG].routes[0]
        ctx = RequestContext(
            request=make_mocked_request("GET", path), request_id="r", client_ip="127.0.0.1"
        )
        ctx.route = route
        ctx.agent_target = parse_agent_target(route, path)
        assert build_input(ctx)["target"] == {
            "kind": "agent",
            "destination": destination,
            "classification": None,
        }


AGENT_ROUTE: dict[str, Any] = {
    "name": "agents",
    "prefix": "/agents/",
    "kind": "agent",
    "auth": "api_key",
    "agent": {"registry_url": "http://127.0.0.1:8083"},
}


class TestAgentRouteConfig:
    def test_defaults(self) -> None:
        """An agent route needs only the registry URL; the rest has documented defaults."""
        route = parse_config({"routes": [AGENT_ROUTE]}).routes[0]
        assert route.kind == "agent"
        assert route.agent == AgentRouteConfig(registry_url="http://127.0.0.1:8083")
        assert (route.agent.retries, route.agent.circuit_failures) == (2, 5)

    @pytest.mark.parametrize(
        ("change", "key", "message"),
        [
            pytest.param({"agent": None}, "routes[0].agent", "needs an agent table", id="no-agent"),
            pytest.param({"upstream": "http://h"}, "routes[0].upstream", "no fixed upstream",
                         id="upstream-on-agent"),
            pytest.param({"auth": "none"}, "routes[0].auth", "cannot be auth", id="anonymous"),
            pytest.param({"strip_prefix": True}, "routes[0].strip_prefix", "always",
                         id="strip-prefix"),
            pytest.param({"kind": "upstream", "upstream": "http://h"}, "routes[0].agent",
                         "only for kind", id="agent-on-upstream"),
            pytest.param({"kind": "bus"}, "routes[0].kind", "one of", id="kind"),
            pytest.param({"agent": {"registry_url": "ftp://r"}}, "routes[0].agent.registry_url",
                         "http", id="registry-scheme"),
            pytest.param({"agent": {"registry_url": "http://u:p@r"}},
                         "routes[0].agent.registry_url", "credentials", id="registry-creds"),
            pytest.param({"agent": {"registry_url": "http://r", "retries": 11}},
                         "routes[0].agent.retries", "between", id="retries"),
            pytest.param({"agent": {"registry_url": "http://r", "backoff_max_s": 0.001}},
                         "routes[0].agent.backoff_max_s", ">=", id="backoff"),
            pytest.param({"agent": {"registry_url": "http://r", "circuit_failures": 0}},
                         "routes[0].agent.circuit_failures", ">= 1", id="circuit-failures"),
            pytest.param({"agent": {"registry_url": "http://r", "circuit_open_s": 0}},
                         "routes[0].agent.circuit_open_s", "> 0", id="circuit-open"),
            pytest.param({"agent": {"registry_url": "http://r", "cache_ttl_s": -1}},
                         "routes[0].agent.cache_ttl_s", ">= 0", id="cache-ttl"),
            pytest.param({"agent": {"registry_url": "http://r", "surprise": 1}},
                         "routes[0].agent.surprise", "unknown", id="unknown-key"),
        ],
    )  # fmt: skip
    def test_bad_agent_routes_name_the_key(
        self, change: dict[str, Any], key: str, message: str
    ) -> None:
        """A bad agent route is refused with the dotted key at fault."""
        route = {**AGENT_ROUTE, **change}
        if route.get("agent") is None:
            route.pop("agent")
        with pytest.raises(ConfigError) as caught:
            parse_config({"routes": [route]})
        assert caught.value.key == key
        assert message in caught.value.message


class TestTraceContext:
    async def test_agent_gets_the_gateways_traceparent(
        self, make_agent_gateway: AgentGatewayFactory, register: Register, agents: Any
    ) -> None:
        """The agent call is an upstream span under the route stage; the agent sees its context."""
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        spans = InMemorySpanExporter()
        await register("a1", await agents("one"))
        gateway = await make_agent_gateway(span_exporter=spans)
        trace = "5b8aa5a2d2c872e8321cf37308d69df2"
        response = await gateway.get(
            "/agents/a1/x", headers={**ACME_KEY, "traceparent": f"00-{trace}-051581bf3cb55c13-01"}
        )
        assert response.status == 200
        sent = (await response.json())["headers"]["traceparent"]
        finished = {span.name: span for span in spans.get_finished_spans()}
        upstream = finished["upstream agents"]
        assert upstream.parent is not None
        assert upstream.parent.span_id == finished["stage route"].context.span_id
        assert sent == f"00-{trace}-{upstream.context.span_id:016x}-01"
