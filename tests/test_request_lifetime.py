"""A finished request is freed by reference counting, not left to the cyclic GC.

The request's context referred to the request and the request to its context;
every request then waited for a collection, and the full ones paused the loop
for tens of ms under load (ADR 0021). With the collector off, nothing of a
finished request may remain.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from aiohttp import web

from gateway.context import RequestContext
from tests.conftest import GatewayClient


@pytest.fixture
def collector_off() -> Iterator[None]:
    """The cyclic collector disabled: only reference counting frees objects."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _alive(kind: type) -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, kind))


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        pytest.param("GET", "/echo/a", 200, id="proxied-streamed"),
        pytest.param("DELETE", "/readonly/x", 403, id="problem-after-the-edge"),
        pytest.param("GET", "/nowhere", 404, id="no-route"),
        pytest.param("GET", "/health", 200, id="own-route"),
    ],
)
async def test_finished_requests_leave_nothing_for_the_collector(
    gateway: GatewayClient, collector_off: None, method: str, path: str, status: int
) -> None:
    """20 requests of each kind: no RequestContext and no server Request stays alive."""
    response = await gateway.request(method, path)  # warm pools and caches first
    assert response.status == status
    await response.read()
    contexts, requests = _alive(RequestContext), _alive(web.Request)
    for _ in range(20):
        response = await gateway.request(method, path)
        assert response.status == status
        await response.read()
    assert (_alive(RequestContext), _alive(web.Request)) == (contexts, requests)
