"""The registry against its OpenAPI document, live: real HTTP, real PostgreSQL.

Stateless cases for every operation (valid data, then invalid data that
must be refused with a 4xx problem), and the state machine the document's
links describe (register -> get, update, heartbeat, deregister).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import pytest
from aiohttp import web
from schemathesis import GenerationMode

from registry.app import create_app
from registry.settings import admin_key_digest
from tests.contractkit import CHECKS, REGISTRY_DOC, SETTINGS, load, run_stateful
from tests.livethread import LiveServer
from tests.registrykit import fresh_database, registry_settings
from tests.services import PostgresService

if TYPE_CHECKING:
    # schemathesis names the type of an OpenAPI case for type checkers only.
    from schemathesis.specs.openapi.schemas import OpenApiCase

positive = load(REGISTRY_DOC, GenerationMode.POSITIVE)
# Operations without parameters or a body have no invalid form.
negative = load(REGISTRY_DOC, GenerationMode.NEGATIVE).exclude(
    path=["/health", "/_readyz", "/openapi.json"]
)
ADMIN_KEY = "contract-admin-key-0123456789abcdef"


@pytest.fixture(scope="module")
def live_registry(postgres_service: PostgresService) -> Iterator[LiveServer]:
    """A registry on its own fresh database, served from a thread."""
    postgres_service.start()

    @contextlib.asynccontextmanager
    async def serve() -> AsyncIterator[web.Application]:
        async with fresh_database(postgres_service.dsn) as dsn:
            settings = registry_settings(dsn, admin_key_sha256=admin_key_digest(ADMIN_KEY))
            yield create_app(settings, background=False)

    server = LiveServer(serve).start()
    yield server
    server.stop()


@positive.parametrize()
@SETTINGS
def test_valid_requests(case: OpenApiCase, live_registry: LiveServer) -> None:
    """Valid requests get documented answers, never a 5xx."""
    case.call_and_validate(base_url=live_registry.url, checks=CHECKS)


@negative.parametrize()
@SETTINGS
def test_invalid_requests(case: OpenApiCase, live_registry: LiveServer) -> None:
    """Invalid requests are refused with a documented 4xx problem, never a 5xx."""
    case.call_and_validate(base_url=live_registry.url, checks=CHECKS)


#: registry/app.py's detail when the database refuses what validation let through.
STORE_REFUSED = "the store refused a value in this request"


def test_stateful(live_registry: LiveServer) -> None:
    """Sequences along the document's links keep to the contract, and the links work."""
    steps = run_stateful(load(REGISTRY_DOC, GenerationMode.POSITIVE), live_registry.url)
    # Valid input is never refused by the database after passing validation
    # (found here: an upper-case "HTTP://" scheme passed validation, then the
    # table's CHECK refused it, so no agent registered that way could be updated).
    refused = [
        s.sent for s in steps if isinstance(s.body, dict) and s.body.get("detail") == STORE_REFUSED
    ]
    assert refused == []
    seen = {(step.operation, step.status) for step in steps}
    # Registered agents were found, changed, kept alive and removed by the id they got.
    assert {
        ("registerAgent", 201),
        ("getAgent", 200),
        ("updateAgent", 200),
        ("heartbeatAgent", 200),
        ("deleteAgent", 204),
    } <= seen, sorted(seen)
