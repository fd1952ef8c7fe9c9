"""gateway.agent_directory: the registry client, its cache, and distrust of its answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.agent_directory import HttpAgentDirectory, RegistryUnavailable, parse_endpoint
from gateway.config import AgentRouteConfig

GOOD = {"id": "a1", "endpoint_url": "http://127.0.0.1:9/", "weight": 1, "status": "healthy"}


class FakeRegistry:
    """A real HTTP server answering like the registry, as scripted by the test."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None]] = []
        self.answer: tuple[int, Any] = (200, GOOD)
        self.delay = 0.0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.path_qs, request.headers.get("X-Nops-Tenant")))
        await asyncio.sleep(self.delay)
        status, body = self.answer
        if isinstance(body, bytes):
            return web.Response(status=status, body=body, content_type="application/json")
        return web.json_response(body, status=status)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeRegistry, str]]:
    registry = FakeRegistry()
    server = TestServer(registry.app(), host="127.0.0.1")
    await server.start_server()
    yield registry, str(server.make_url("")).rstrip("/")
    await server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


class TestParseEndpoint:
    @pytest.mark.parametrize(
        "change",
        [
            pytest.param({"endpoint_url": "http://u:p@h/"}, id="credentials"),
            pytest.param({"endpoint_url": "http://u@h/"}, id="user"),
            pytest.param({"endpoint_url": "file:///etc/passwd"}, id="file"),
            pytest.param({"endpoint_url": "http://h/?q=1"}, id="query"),
            pytest.param({"endpoint_url": "http://h/#f"}, id="fragment"),
            pytest.param({"endpoint_url": "http://h:0/"}, id="port-zero"),
            pytest.param({"endpoint_url": "http://h:99999/"}, id="bad-port"),
            pytest.param({"endpoint_url": 7}, id="url-not-string"),
            pytest.param({"weight": "1"}, id="weight-not-int"),
            pytest.param({"status": None}, id="no-status"),
        ],
    )
    def test_records_the_gateway_would_not_dial_are_dropped(self, change: dict[str, Any]) -> None:
        """Even from the registry, an endpoint with credentials or an odd scheme is refused."""
        assert parse_endpoint({**GOOD, **change}) is None

    def test_good_record(self) -> None:
        """A well-formed record becomes an endpoint."""
        endpoint = parse_endpoint(GOOD)
        assert endpoint is not None
        assert (endpoint.id, endpoint.key, endpoint.weight) == ("a1", "http://127.0.0.1:9/", 1)


class TestHttpAgentDirectory:
    async def test_asks_as_the_tenant_and_caches(
        self, fake: tuple[FakeRegistry, str], session: aiohttp.ClientSession
    ) -> None:
        """Lookups carry the tenant; an answer is reused for cache_ttl_s, per tenant."""
        registry, url = fake
        clock = Clock()
        directory = HttpAgentDirectory(session, AgentRouteConfig(url, cache_ttl_s=2), clock=clock)
        for _ in range(3):
            assert (await directory.agent("acme", "a1")) is not None
        await directory.agent("globex", "a1")
        assert registry.requests == [("/agents/a1", "acme"), ("/agents/a1", "globex")]
        clock.now = 2.0
        await directory.agent("acme", "a1")
        assert len(registry.requests) == 3

    async def test_one_lookup_in_flight_per_key(
        self, fake: tuple[FakeRegistry, str], session: aiohttp.ClientSession
    ) -> None:
        """Concurrent misses for one key share a single registry request."""
        registry, url = fake
        registry.delay = 0.05
        directory = HttpAgentDirectory(session, AgentRouteConfig(url))
        results = await asyncio.gather(*(directory.agent("acme", "a1") for _ in range(20)))
        assert len({r.key for r in results if r is not None}) == 1
        assert len(registry.requests) == 1

    async def test_capability_lookup(
        self, fake: tuple[FakeRegistry, str], session: aiohttp.ClientSession
    ) -> None:
        """A capability lookup asks for healthy agents and drops unusable records."""
        registry, url = fake
        bad = {**GOOD, "id": "a2", "endpoint_url": "http://u:p@h/"}
        registry.answer = (200, {"agents": [GOOD, bad], "next_cursor": None})
        directory = HttpAgentDirectory(session, AgentRouteConfig(url))
        found = await directory.healthy("acme", "sum")
        assert [e.id for e in found] == ["a1"]
        assert registry.requests == [("/agents?capability=sum&status=healthy&limit=500", "acme")]

    @pytest.mark.parametrize(
        ("answer", "reason"),
        [
            pytest.param((404, {"type": "urn:nops:registry:problem:not-found"}),
                         "registry_status_404", id="wrong-registry-url"),
            pytest.param((503, {"type": "urn:nops:registry:problem:store-unavailable"}),
                         "registry_status_503", id="store-down"),
            pytest.param((200, b"not json"), "registry_answer_malformed", id="not-json"),
            pytest.param((200, {**GOOD, "id": "other"}), "registry_answer_malformed",
                         id="another-agent"),
            pytest.param((200, b"[" + b"1," * 2_100_000 + b"1]"), "registry_answer_too_large",
                         id="too-large"),
        ],
    )  # fmt: skip
    async def test_unusable_answers(
        self,
        fake: tuple[FakeRegistry, str],
        session: aiohttp.ClientSession,
        answer: tuple[int, Any],
        reason: str,
    ) -> None:
        """Anything but a clear answer is RegistryUnavailable, never a guess."""
        registry, url = fake
        registry.answer = answer
        directory = HttpAgentDirectory(session, AgentRouteConfig(url))
        with pytest.raises(RegistryUnavailable) as caught:
            await directory.agent("acme", "a1")
        assert caught.value.reason == reason

    async def test_unknown_agent_is_none_and_cached(
        self, fake: tuple[FakeRegistry, str], session: aiohttp.ClientSession
    ) -> None:
        """The registry's agent-not-found is an answer (None), cached like any other."""
        registry, url = fake
        registry.answer = (404, {"type": "urn:nops:registry:problem:agent-not-found"})
        directory = HttpAgentDirectory(session, AgentRouteConfig(url))
        assert await directory.agent("acme", "ghost") is None
        assert await directory.agent("acme", "ghost") is None
        assert len(registry.requests) == 1

    async def test_stale_answers_bridge_an_outage_then_fail_closed(
        self, fake: tuple[FakeRegistry, str], session: aiohttp.ClientSession
    ) -> None:
        """While the registry fails, cached answers serve for stale_if_error_s, then not."""
        registry, url = fake
        clock = Clock()
        config = AgentRouteConfig(url, cache_ttl_s=1, stale_if_error_s=10)
        directory = HttpAgentDirectory(session, config, clock=clock)
        assert await directory.agent("acme", "a1") is not None
        registry.answer = (503, {})
        clock.now = 10.9
        assert await directory.agent("acme", "a1") is not None
        clock.now = 11.0
        with pytest.raises(RegistryUnavailable):
            await directory.agent("acme", "a1")
