"""Test helpers for the registry: a fresh database, a pinned clock, a real fake bus."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
import yarl
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from registry.app import PROBLEM_CONTENT_TYPE, PROBLEM_TYPE_BASE, create_app
from registry.settings import RegistrySettings

Client = TestClient[Any, Any]
RegistryFactory = Callable[..., Awaitable[Client]]

#: 2026-11-23T00:00:00Z: registry tests pin their clock (tests.conftest.PinnedClock) here.
T0 = 1_795_392_000.0


@asynccontextmanager
async def fresh_database(server_dsn: str) -> AsyncIterator[str]:
    """A new, empty database on the server for one test; dropped afterwards."""
    name = f"reg_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(server_dsn, timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield str(yarl.URL(server_dsn).with_path(f"/{name}"))
    finally:
        admin = await asyncpg.connect(server_dsn, timeout=10)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def registry_settings(dsn: str, **overrides: Any) -> RegistrySettings:
    values: dict[str, Any] = {"dsn": dsn, "outbox_idle_s": 0.05, "sweep_interval_s": 0.05}
    values.update(overrides)
    return RegistrySettings(**values)


async def start_registry(
    dsn: str, clock: Callable[[], float], *, background: bool = False, **kwargs: Any
) -> Client:
    publisher = kwargs.pop("publisher", None)
    app = create_app(
        registry_settings(dsn, **kwargs), clock=clock, publisher=publisher, background=background
    )
    client: Client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client


def tenant(name: str) -> dict[str, str]:
    return {"X-Nops-Tenant": name}


def agent_body(agent_id: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"id": agent_id, "endpoint_url": f"http://127.0.0.1:9/{agent_id}"}
    body.update(fields)
    return body


async def assert_registry_problem(
    response: Any, status: int, code: str, *, reasons: list[str] | None = None
) -> dict[str, Any]:
    """The response is a registry problem+json with this status and type."""
    assert response.status == status, await response.text()
    assert response.content_type == PROBLEM_CONTENT_TYPE
    body: dict[str, Any] = await response.json(content_type=PROBLEM_CONTENT_TYPE)
    assert body["type"] == PROBLEM_TYPE_BASE + code
    assert body["status"] == status
    assert body["request_id"] == response.headers["X-Request-Id"]
    if reasons is not None:
        assert body["reasons"] == reasons
    return body


@dataclass
class FakeBus:
    """A real HTTP server speaking the bus's publish API; can go down and come back."""

    port: int
    #: Status to answer publishes with.
    status: int = 201
    received: list[dict[str, Any]] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _publish(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        self.received.append(
            {
                "topic": request.match_info["topic"],
                "tenant": request.headers.get("X-Nops-Tenant"),
                "idempotency_key": request.headers.get("Idempotency-Key"),
                "event": body,
            }
        )
        return web.json_response({"id": str(len(self.received))}, status=self.status)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/topics/{topic}/messages", self._publish)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def eventually(check: Callable[[], bool | Awaitable[bool]], *, within_s: float = 5.0) -> None:
    """Wait until ``check()`` (sync or async) is true; fail after ``within_s`` seconds."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {within_s} s")
        await asyncio.sleep(0.01)
