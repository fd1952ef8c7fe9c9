"""The bus against its OpenAPI document, live: real HTTP, real Redis.

Stateless cases for every operation (valid data, then invalid data that
must be refused with a 4xx problem), and the state machine the document's
links describe (publish -> consume -> ack, pending; publish -> dead letters).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import pytest
from aiohttp import web
from schemathesis import GenerationMode

from bus.app import create_app
from bus.config import BusConfig
from tests.busfixtures import TEST_LIMITS
from tests.contractkit import BUS_DOC, CHECKS, SETTINGS, load, run_stateful
from tests.livethread import LiveServer
from tests.services import RedisService

if TYPE_CHECKING:
    # schemathesis names the type of an OpenAPI case for type checkers only.
    from schemathesis.specs.openapi.schemas import OpenApiCase

positive = load(BUS_DOC, GenerationMode.POSITIVE)
# Operations without parameters or a body have no invalid form.
negative = load(BUS_DOC, GenerationMode.NEGATIVE).exclude(
    path=["/health", "/_readyz", "/openapi.json"]
)
#: Long polls end quickly: a generated ``wait`` above this is refused (400).
LIMITS = {**TEST_LIMITS, "max_poll_s": 0.05}


@pytest.fixture(scope="module")
def live_bus(redis_service: RedisService) -> Iterator[LiveServer]:
    """A bus on the session Redis, served from a thread."""
    redis_service.start()

    @contextlib.asynccontextmanager
    async def serve() -> AsyncIterator[web.Application]:
        yield create_app(BusConfig(redis_url=redis_service.url, **LIMITS))

    server = LiveServer(serve).start()
    yield server
    server.stop()


@positive.parametrize()
@SETTINGS
def test_valid_requests(case: OpenApiCase, live_bus: LiveServer) -> None:
    """Valid requests get documented answers, never a 5xx."""
    case.call_and_validate(base_url=live_bus.url, checks=CHECKS)


@negative.parametrize()
@SETTINGS
def test_invalid_requests(case: OpenApiCase, live_bus: LiveServer) -> None:
    """Invalid requests are refused with a documented 4xx problem, never a 5xx."""
    case.call_and_validate(base_url=live_bus.url, checks=CHECKS)


def test_stateful(live_bus: LiveServer) -> None:
    """Sequences along the document's links keep to the contract, and the links work."""
    steps = run_stateful(load(BUS_DOC, GenerationMode.POSITIVE), live_bus.url)
    # A published message was consumed and then acknowledged by the id consume gave.
    assert any(s.operation == "publish" and s.status == 201 for s in steps)
    assert any(s.operation == "consume" and s.status == 200 and s.body["messages"] for s in steps)
    assert any(s.operation == "ack" and s.status == 200 and s.body["acked"] >= 1 for s in steps)
