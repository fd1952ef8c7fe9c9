"""Connections are pooled: keep-alive to OPA and to upstreams, no connection per request."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.policy.opa import OpaEngine
from tests.conftest import ECHO_GET_INPUT, GatewayFactory, OpaProcess

INPUT = ECHO_GET_INPUT


class CountingRelay:
    """A TCP relay in front of a real server that counts the connections it accepts."""

    def __init__(self, port: int) -> None:
        self._target = port
        self.connections = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@pytest.fixture
async def relay(opa: OpaProcess) -> AsyncIterator[CountingRelay]:
    relay = CountingRelay(opa.port)
    await relay.start()
    yield relay
    await relay.close()


class TestOpaConnections:
    async def test_decisions_reuse_one_connection(self, relay: CountingRelay) -> None:
        """Twenty decisions one after another: one TCP connection to OPA, all answered."""
        engine = OpaEngine(relay.url, decision_path="nops/authz/decision", timeout_s=2)
        try:
            decisions = [await engine.decide(INPUT, f"d{i}") for i in range(20)]
        finally:
            await engine.close()
        assert {d.decision_id for d in decisions} == {f"d{i}" for i in range(20)}
        assert all(d.reasons for d in decisions)
        assert relay.connections == 1

    async def test_concurrent_decisions_share_a_bounded_pool(self, relay: CountingRelay) -> None:
        """Fifty at once open at most the pool's limit, and the next ones reuse them."""
        engine = OpaEngine(relay.url, decision_path="nops/authz/decision", timeout_s=5)
        try:
            await asyncio.gather(*(engine.decide(INPUT, f"a{i}") for i in range(50)))
            opened = relay.connections
            await asyncio.gather(*(engine.decide(INPUT, f"b{i}") for i in range(10)))
        finally:
            await engine.close()
        assert 1 <= opened <= 50
        assert relay.connections == opened


class TestUpstreamConnections:
    @pytest.fixture
    async def peers(self) -> AsyncIterator[tuple[TestServer, list[Any]]]:
        seen: list[Any] = []

        async def handler(request: web.Request) -> web.Response:
            assert request.transport is not None
            seen.append(request.transport.get_extra_info("peername"))
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_get("/{tail:.*}", handler)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        yield server, seen
        await server.close()

    async def test_proxied_requests_reuse_the_upstream_connection(
        self, make_gateway: GatewayFactory, peers: tuple[TestServer, list[Any]]
    ) -> None:
        """Ten requests through the gateway reach the upstream over one kept-alive connection."""
        server, seen = peers
        route = {
            "name": "echo",  # a route the test policy allows
            "prefix": "/echo/",
            "upstream": str(server.make_url("")).rstrip("/"),
            "require_signature": False,
            "auth": "none",
        }
        client = await make_gateway(routes=[route])
        for i in range(10):
            response = await client.get(f"/echo/{i}")
            assert response.status == 200
        assert len(seen) == 10
        assert len(set(seen)) == 1
