"""Fixtures and assertions for the bus tests (import the fixtures you use).

Every test gets its own tenant name, so tests sharing the session's real
Redis never see each other's streams.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from bus.app import create_app
from bus.config import BusConfig
from bus.problem import PROBLEM_CONTENT_TYPE, problem_type
from bus.streams import BusClient
from tests.services import RedisService

BusFactory = Callable[..., Awaitable[TestClient[Any, Any]]]

#: Small limits so tests run fast: 1 s visibility, 3 deliveries.
TEST_LIMITS: dict[str, Any] = {
    "visibility_timeout_s": 1.0,
    "max_deliveries": 3,
    "max_poll_s": 5.0,
    "max_message_bytes": 4096,
    "max_batch": 50,
    "max_stream_len": 1000,
}


@pytest.fixture
def tenant() -> str:
    """A tenant name no other test uses."""
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def bus_config(redis_server: RedisService) -> BusConfig:
    return BusConfig(redis_url=redis_server.url, **TEST_LIMITS)


@pytest.fixture
async def bus(bus_config: BusConfig) -> AsyncIterator[BusClient]:
    """The Python API on the session Redis."""
    client = BusClient.connect(bus_config)
    yield client
    await client.aclose()


@pytest.fixture
async def raw_redis(redis_server: RedisService) -> AsyncIterator[Redis]:
    """A plain client to look at what the bus wrote."""
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
async def make_bus(bus_config: BusConfig) -> AsyncIterator[BusFactory]:
    """Start bus services (real HTTP on loopback) with config overrides."""
    clients: list[TestClient[Any, Any]] = []

    async def factory(**overrides: Any) -> TestClient[Any, Any]:
        config = bus_config.replace(**overrides)
        client: TestClient[Any, Any] = TestClient(TestServer(create_app(config), host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.close()


@pytest.fixture
async def bus_http(make_bus: BusFactory) -> TestClient[Any, Any]:
    """A bus service with the test limits."""
    return await make_bus()


def as_tenant(tenant: str, **headers: str) -> dict[str, str]:
    """Headers of a request the gateway forwarded for ``tenant``."""
    return {"X-Nops-Tenant": tenant, **headers}


async def assert_bus_problem(
    response: aiohttp.ClientResponse, status: int, code: str, reasons: list[str] | None = None
) -> dict[str, Any]:
    """The response is a bus problem+json with this status, type and (optionally) reasons."""
    assert response.status == status
    assert response.content_type == PROBLEM_CONTENT_TYPE
    body: dict[str, Any] = await response.json(content_type=PROBLEM_CONTENT_TYPE)
    assert body["type"] == problem_type(code)
    assert body["status"] == status
    assert body["request_id"] == response.headers["X-Request-Id"]
    if reasons is not None:
        assert body.get("reasons") == reasons
    return body
