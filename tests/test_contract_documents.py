"""The OpenAPI documents: valid OpenAPI 3.1, served as they are, and held to the code.

Every route an application registers is in its document and every
operation of the document is a registered route, so the contract cannot
drift from the code; shared schemas and the problem ``type`` lists are
compared with their sources.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestClient

import bus.errors
import gateway.errors
import registry.errors
from bus.app import create_app as create_bus
from bus.config import BusConfig
from gateway.apidocs import DOCUMENTS
from gateway.app import create_app as create_gateway
from registry.app import create_app as create_registry
from registry.settings import RegistrySettings
from tests.conftest import GatewayFactory, gateway_config
from tests.contractkit import BUS_DOC, GATEWAY_DOC, REGISTRY_DOC, doc_operations
from tests.problems import assert_problem

Client = TestClient[Any, Any]
DOCS = {"gateway": GATEWAY_DOC, "registry": REGISTRY_DOC, "bus": BUS_DOC}
#: The gateway's catch-all routes and the document entries that describe them.
GATEWAY_CATCH_ALLS = {
    ("*", "/_admin{tail}"): set(),  # 404 no-route for anything else under /_admin
    ("*", "/{tail}"): {(m, "/{route}/{path}") for m in ("GET", "POST", "PUT", "PATCH", "DELETE")},
}


def _document(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DOCS[name].read_text())
    return loaded


def _app_operations(app: web.Application) -> set[tuple[str, str]]:
    """(METHOD, path template) of every route; HEAD (aiohttp's automatic twin of GET) left out."""
    operations = set()
    for route in app.router.routes():
        canonical = route.resource.canonical if route.resource is not None else ""
        if route.method != "HEAD":
            operations.add((route.method, canonical))
    return operations


#: The base error class of a service: its subclasses each carry a ``code``.
ErrorBase = (
    type[gateway.errors.GatewayError]
    | type[registry.errors.RegistryError]
    | type[bus.errors.BusError]
)


def _problem_types(module: Any, base: ErrorBase, prefix: str) -> set[str]:
    classes = [getattr(module, name) for name in module.__all__]
    return {
        prefix + cls.code
        for cls in classes
        if isinstance(cls, type) and issubclass(cls, base) and cls is not base
    }


class TestDocuments:
    @pytest.mark.parametrize("name", sorted(DOCS))
    def test_is_valid_openapi_3_1(self, name: str) -> None:
        """Each document passes the OpenAPI 3.1 schema and describes operations."""
        document = _document(name)
        assert document["openapi"] == "3.1.0"
        schema = schemathesis.openapi.from_dict(document)
        schema.validate()
        assert len(list(schema.get_all_operations())) >= 9

    def test_an_invalid_document_is_refused(self) -> None:
        """The validation used above does reject a broken document."""
        broken = _document("registry")
        broken["paths"]["/agents"]["get"]["responses"] = "none"
        with pytest.raises(Exception, match="responses"):
            schemathesis.openapi.from_dict(broken).validate()

    @pytest.mark.parametrize("name", sorted(DOCS))
    def test_documents_are_package_data(self, name: str) -> None:
        """The gateway serves exactly the files in the repository."""
        from gateway.apidocs import document_bytes

        assert document_bytes(f"{name}.json") == DOCS[name].read_bytes()


class TestRoutesMatchDocuments:
    def test_registry(self) -> None:
        """Every registry route is documented, and every documented operation is a route."""
        app = create_registry(RegistrySettings(dsn="postgresql://127.0.0.1:1/x"))
        assert _app_operations(app) == doc_operations(_document("registry"))

    def test_bus(self) -> None:
        """Every bus route is documented, and every documented operation is a route."""
        app = create_bus(BusConfig(redis_url="redis://127.0.0.1:1/0"))
        assert _app_operations(app) == doc_operations(_document("bus"))

    def test_gateway(self) -> None:
        """Every gateway route (admin plane on) is documented, and vice versa."""
        config = gateway_config(
            "http://127.0.0.1:1",
            "http://127.0.0.1:2",
            admin={"keys": [{"id": "a", "role": "VIEWER", "hash": "sha256:" + "0" * 64}]},
        )
        routes = _app_operations(create_gateway(config))
        documented = doc_operations(_document("gateway"))
        for catch_all, described in GATEWAY_CATCH_ALLS.items():
            assert catch_all in routes
            routes.discard(catch_all)
            documented -= described
        assert routes == documented


class TestSharedSchemas:
    def test_envelope_is_the_bus_schema(self) -> None:
        """The bus document's Envelope is bus/schemas/envelope.v1.json (less $schema and $id)."""
        source = json.loads(
            (Path(bus.__file__).parent / "schemas" / "envelope.v1.json").read_text()
        )
        del source["$schema"], source["$id"]
        assert _document("bus")["components"]["schemas"]["Envelope"] == source

    @pytest.mark.parametrize(
        "name", ["Agent", "AgentPage", "AgentId", "TenantId", "Capability", "AgentStatus"]
    )
    def test_gateway_admin_agents_are_the_registry_records(self, name: str) -> None:
        """/_admin/registry/agents passes the registry's records: one schema for both."""
        gateway_schemas = _document("gateway")["components"]["schemas"]
        assert gateway_schemas[name] == _document("registry")["components"]["schemas"][name]

    @pytest.mark.parametrize(
        ("name", "module", "base", "prefix"),
        [
            ("gateway", gateway.errors, gateway.errors.GatewayError, "urn:nops:gateway:problem:"),
            (
                "registry",
                registry.errors,
                registry.errors.RegistryError,
                "urn:nops:registry:problem:",
            ),
            ("bus", bus.errors, bus.errors.BusError, "urn:nops:bus:problem:"),
        ],
    )
    def test_problem_types_are_the_error_codes(
        self, name: str, module: Any, base: ErrorBase, prefix: str
    ) -> None:
        """The documented problem types are exactly the service's error codes."""
        problem = _document(name)["components"]["schemas"]["Problem"]
        assert set(problem["properties"]["type"]["enum"]) == _problem_types(module, base, prefix)


class TestServed:
    @pytest.mark.parametrize("name", sorted(DOCUMENTS))
    async def test_gateway_serves_each_document(
        self, make_gateway: GatewayFactory, name: str
    ) -> None:
        """GET /_openapi/<name>: unauthenticated, the file's bytes, with the gateway's headers."""
        client = await make_gateway()
        response = await client.get(f"/_openapi/{name}")
        assert response.status == 200
        assert response.content_type == "application/json"
        assert await response.read() == DOCS[name.removesuffix(".json")].read_bytes()
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["X-Request-Id"]

    @pytest.mark.parametrize("path", ["/_openapi/nope.json", "/_openapi/", "/_openapi/gateway"])
    async def test_unknown_document_is_404(self, make_gateway: GatewayFactory, path: str) -> None:
        """Anything else under /_openapi/ is a no-route problem, never proxied."""
        client = await make_gateway()
        await assert_problem(await client.get(path), 404, "no-route")

    async def test_registry_serves_its_own(self, make_registry: Any) -> None:
        """The registry's /openapi.json is its document."""
        client = await make_registry()
        response = await client.get("/openapi.json")
        assert response.status == 200
        assert await response.read() == REGISTRY_DOC.read_bytes()

    async def test_bus_serves_its_own(self, bus_http: Client) -> None:
        """The bus's /openapi.json is its document."""
        response = await bus_http.get("/openapi.json")
        assert response.status == 200
        assert await response.read() == BUS_DOC.read_bytes()
