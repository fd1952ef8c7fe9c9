"""The API contract: the OpenAPI 3.1 documents of the gateway, the registry and the bus.

``GET /_openapi/{document}`` serves them, unauthenticated and read-only,
outside the pipeline (like ``/health``). They are hand-written files kept
next to the code they describe (``gateway/openapi/gateway.json``,
``registry/openapi/registry.json``, ``bus/openapi/bus.json``); the tests
hold each one to its application's route table and run schemathesis
against the live services (tests/test_contract_*.py).
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Final

from aiohttp import web

from gateway.context import REQUEST_CONTEXT
from gateway.errors import NoRoute

__all__ = ["DOCUMENTS", "OPENAPI_PREFIX", "document_bytes", "openapi_document"]

OPENAPI_PREFIX: Final = "/_openapi"
#: Served name -> (package, resource) of the document.
DOCUMENTS: Final = {
    "gateway.json": ("gateway", "openapi/gateway.json"),
    "registry.json": ("registry", "openapi/registry.json"),
    "bus.json": ("bus", "openapi/bus.json"),
}


@cache
def document_bytes(name: str) -> bytes:
    """The document served as ``name`` (a key of :data:`DOCUMENTS`), read once."""
    package, resource = DOCUMENTS[name]
    return resources.files(package).joinpath(resource).read_bytes()


async def openapi_document(request: web.Request) -> web.Response:
    """``GET /_openapi/{document}``: one of :data:`DOCUMENTS`, else 404 no-route."""
    request[REQUEST_CONTEXT].stage = "openapi"
    name = request.match_info["document"]
    if name not in DOCUMENTS:
        raise NoRoute("no such OpenAPI document")
    return web.Response(body=document_bytes(name), content_type="application/json")
