"""The registry's HTTP API against a real PostgreSQL: lifecycle, bad input, tenants, admin."""

from __future__ import annotations

import hashlib
from typing import Any

import asyncpg
import pytest
import yarl

from registry import RegistrySettings, create_app
from registry.errors import __all__ as error_names
from registry.settings import admin_key_digest
from tests.conftest import PinnedClock
from tests.registrykit import (
    Client,
    RegistryFactory,
    agent_body,
    assert_registry_problem,
    tenant,
)
from tests.secretscan import register_secret
from tests.services import PostgresService

ACME = tenant("acme")
GLOBEX = tenant("globex")
ADMIN_KEY = "k" * 40
register_secret(ADMIN_KEY, "registry admin key (registry api)")


@pytest.fixture
async def registry(make_registry: RegistryFactory) -> Client:
    return await make_registry()


class TestLifecycle:
    async def test_register_read_update_heartbeat_delete(
        self, registry: Client, clock: PinnedClock
    ) -> None:
        """An agent goes through its whole life over the API, each step answering as documented."""
        body = agent_body(
            "summarizer-1",
            name="Summarizer",
            version="1.2.0",
            capabilities=["summarize", "translate", "summarize"],
            labels={"zone": "eu-1"},
            weight=7,
        )
        created = await registry.post("/agents", json=body, headers=ACME)
        assert created.status == 201
        location = created.headers["Location"]
        assert location == "agents/summarizer-1"
        assert str(created.url.join(yarl.URL(location)).path) == "/agents/summarizer-1"
        agent = await created.json()
        assert agent == {
            "id": "summarizer-1",
            "tenant": "acme",
            "name": "Summarizer",
            "version": "1.2.0",
            "capabilities": ["summarize", "translate"],  # deduplicated, sorted
            "endpoint_url": "http://127.0.0.1:9/summarizer-1",
            "status": "healthy",
            "heartbeat_at": "2026-11-23T00:00:00.000Z",
            "labels": {"zone": "eu-1"},
            "weight": 7,
            "created_at": "2026-11-23T00:00:00.000Z",
            "updated_at": "2026-11-23T00:00:00.000Z",
        }

        read = await registry.get("/agents/summarizer-1", headers=ACME)
        assert read.status == 200
        assert await read.json() == agent

        clock.advance(5)
        patched = await registry.patch(
            "/agents/summarizer-1",
            json={"weight": 50, "endpoint_url": "https://agents.example/s1"},
            headers=ACME,
        )
        assert patched.status == 200
        changed = await patched.json()
        assert changed["weight"] == 50
        assert changed["endpoint_url"] == "https://agents.example/s1"
        assert changed["updated_at"] == "2026-11-23T00:00:05.000Z"
        assert changed["heartbeat_at"] == "2026-11-23T00:00:00.000Z"

        clock.advance(5)
        beat = await registry.post("/agents/summarizer-1/heartbeat", headers=ACME)
        assert beat.status == 200
        assert (await beat.json())["heartbeat_at"] == "2026-11-23T00:00:10.000Z"

        deleted = await registry.delete("/agents/summarizer-1", headers=ACME)
        assert deleted.status == 204
        gone = await registry.get("/agents/summarizer-1", headers=ACME)
        await assert_registry_problem(gone, 404, "agent-not-found")

    @pytest.mark.parametrize(
        ("path", "method", "body"),
        [
            pytest.param("/agents", "POST", agent_body("a1", weight=7.0), id="register"),
            pytest.param("/agents/a1", "PATCH", {"weight": 7.0}, id="update"),
        ],
    )
    async def test_whole_number_weight_is_an_integer(
        self, registry: Client, path: str, method: str, body: dict[str, Any]
    ) -> None:
        """weight 7.0 is the integer 7, as JSON Schema has it (found by the contract tests)."""
        if method == "PATCH":
            await registry.post("/agents", json=agent_body("a1"), headers=ACME)
        response = await registry.request(method, path, json=body, headers=ACME)
        assert response.status in (200, 201), await response.text()
        assert (await response.json())["weight"] == 7
        stored = await (await registry.get("/agents/a1", headers=ACME)).json()
        assert stored["weight"] == 7

    @pytest.mark.parametrize(
        ("path", "method", "url", "stored"),
        [
            pytest.param("/agents", "POST", "HTTP://agents.example/a", "http://agents.example/a",
                         id="register-upper"),
            pytest.param("/agents/a1", "PATCH", "HttPs://Agents.example:8443/a",
                         "https://Agents.example:8443/a", id="update-mixed"),
        ],
    )  # fmt: skip
    async def test_url_scheme_is_stored_in_lower_case(
        self, registry: Client, path: str, method: str, url: str, stored: str
    ) -> None:
        """HTTP://... is a valid URL: stored as http://... (the table's CHECK wants that),
        not refused by the database after passing validation (found by the contract tests)."""
        if method == "PATCH":
            await registry.post("/agents", json=agent_body("a1"), headers=ACME)
        body = agent_body("a1", endpoint_url=url) if method == "POST" else {"endpoint_url": url}
        response = await registry.request(method, path, json=body, headers=ACME)
        assert response.status in (200, 201), await response.text()
        assert (await response.json())["endpoint_url"] == stored
        again = await (await registry.get("/agents/a1", headers=ACME)).json()
        assert again["endpoint_url"] == stored

    async def test_name_defaults_to_id(self, registry: Client) -> None:
        """A registration without a name is named by its id."""
        response = await registry.post("/agents", json=agent_body("a1"), headers=ACME)
        assert (await response.json())["name"] == "a1"

    async def test_duplicate_registration_is_409(self, registry: Client) -> None:
        """Registering a taken id in the same tenant is a 409 and changes nothing."""
        await registry.post("/agents", json=agent_body("a1", weight=1), headers=ACME)
        again = await registry.post("/agents", json=agent_body("a1", weight=9), headers=ACME)
        problem = await assert_registry_problem(again, 409, "agent-exists")
        assert problem["field"] == "id"
        kept = await (await registry.get("/agents/a1", headers=ACME)).json()
        assert kept["weight"] == 1

    @pytest.mark.parametrize(
        ("method", "path"),
        [
            pytest.param("GET", "/agents/ghost", id="get"),
            pytest.param("PATCH", "/agents/ghost", id="patch"),
            pytest.param("DELETE", "/agents/ghost", id="delete"),
            pytest.param("POST", "/agents/ghost/heartbeat", id="heartbeat"),
        ],
    )
    async def test_unknown_agent_is_404(self, registry: Client, method: str, path: str) -> None:
        """Every operation on an agent that does not exist is a 404 problem."""
        response = await registry.request(method, path, json={"weight": 1}, headers=ACME)
        await assert_registry_problem(response, 404, "agent-not-found")


class TestListing:
    async def _register(self, registry: Client, *agents: dict[str, Any]) -> None:
        for body in agents:
            response = await registry.post("/agents", json=body, headers=ACME)
            assert response.status == 201

    async def test_keyset_pagination_visits_every_agent_once(self, registry: Client) -> None:
        """Following next_cursor visits every agent exactly once, in id order."""
        ids = [f"agent-{i:02d}" for i in range(7)]
        await self._register(registry, *(agent_body(i) for i in reversed(ids)))
        seen: list[str] = []
        cursor: str | None = None
        pages = 0
        while True:
            params = {"limit": "3"} | ({"cursor": cursor} if cursor else {})
            page = await (await registry.get("/agents", params=params, headers=ACME)).json()
            seen += [a["id"] for a in page["agents"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == ids
        assert pages == 3

    async def test_filter_by_capability_and_status(
        self, registry: Client, clock: PinnedClock
    ) -> None:
        """capability and status filters combine; status is as of the read."""
        await self._register(
            registry,
            agent_body("a", capabilities=["summarize"]),
            agent_body("b", capabilities=["summarize", "translate"]),
            agent_body("c", capabilities=["translate"]),
        )
        clock.advance(20)  # all stale now
        await registry.post("/agents/b/heartbeat", headers=ACME)

        async def ids(**params: str) -> list[str]:
            page = await (await registry.get("/agents", params=params, headers=ACME)).json()
            return [a["id"] for a in page["agents"]]

        assert await ids(capability="summarize") == ["a", "b"]
        assert await ids(capability="translate", status="healthy") == ["b"]
        assert await ids(status="stale") == ["a", "c"]
        assert await ids(capability="nothing") == []


class TestBadInput:
    """Every malformed request is a 4xx problem naming the code; none is a 500."""

    @pytest.mark.parametrize(
        ("body", "status", "code", "reasons"),
        [
            pytest.param({"endpoint_url": "http://h/"}, 400, "invalid-agent-id", None, id="no-id"),
            pytest.param(agent_body("A1"), 400, "invalid-agent-id", None, id="upper-case-id"),
            pytest.param(agent_body("-a"), 400, "invalid-agent-id", None, id="leading-dash"),
            pytest.param(agent_body("a/b"), 400, "invalid-agent-id", None, id="slash-in-id"),
            pytest.param(agent_body("a" * 64), 400, "invalid-agent-id", None, id="id-too-long"),
            pytest.param(agent_body("by-capability"), 400, "invalid-agent-id", None, id="reserved"),
            pytest.param({"id": 7, "endpoint_url": "http://h/"}, 400, "invalid-agent-id", None,
                         id="id-not-string"),
            pytest.param({"id": "a"}, 400, "invalid-endpoint-url", ["missing"], id="no-url"),
            pytest.param(agent_body("a", endpoint_url="ftp://h/"), 400, "invalid-endpoint-url",
                         ["scheme_not_allowed"], id="ftp"),
            pytest.param(agent_body("a", endpoint_url="javascript:alert(1)"), 400,
                         "invalid-endpoint-url", ["scheme_not_allowed"], id="javascript"),
            pytest.param(agent_body("a", endpoint_url="http://u:p@h/"), 400,
                         "invalid-endpoint-url", ["credentials_in_url"], id="userinfo"),
            pytest.param(agent_body("a", endpoint_url="http://u@h/"), 400,
                         "invalid-endpoint-url", ["credentials_in_url"], id="user-only"),
            pytest.param(agent_body("a", endpoint_url="http://h/#frag"), 400,
                         "invalid-endpoint-url", ["fragment_in_url"], id="fragment"),
            pytest.param(agent_body("a", endpoint_url="http://h/?q=1"), 400,
                         "invalid-endpoint-url", ["query_in_url"], id="query"),
            pytest.param(agent_body("a", endpoint_url="http:///path"), 400,
                         "invalid-endpoint-url", ["no_host"], id="no-host"),
            pytest.param(agent_body("a", endpoint_url="/relative"), 400,
                         "invalid-endpoint-url", ["scheme_not_allowed"], id="relative"),
            pytest.param(agent_body("a", endpoint_url="http://h:99999/"), 400,
                         "invalid-endpoint-url", ["malformed"], id="bad-port"),
            pytest.param(agent_body("a", endpoint_url="http://h x/"), 400,
                         "invalid-endpoint-url", ["malformed"], id="space"),
            pytest.param(agent_body("a", endpoint_url="http://h/\x00"), 400,
                         "invalid-endpoint-url", ["malformed"], id="nul"),
            pytest.param(agent_body("a", endpoint_url="http://169.254.169.254/"), 400,
                         "invalid-endpoint-url", ["address_not_allowed"], id="metadata-ip"),
            pytest.param(agent_body("a", endpoint_url="http://0.0.0.0:80/"), 400,
                         "invalid-endpoint-url", ["address_not_allowed"], id="unspecified"),
            pytest.param(agent_body("a", endpoint_url="http://h/" + "x" * 2048), 400,
                         "invalid-endpoint-url", ["too_long"], id="url-too-long"),
            pytest.param(agent_body("a", endpoint_url=["http://h/"]), 400, "invalid-field", None,
                         id="url-not-string"),
            pytest.param(agent_body("a", capabilities=[f"c{i}" for i in range(33)]), 400,
                         "too-many-capabilities", None, id="33-capabilities"),
            pytest.param(agent_body("a", capabilities=[f"c{i}" for i in range(2000)]), 400,
                         "too-many-capabilities", None, id="2000-capabilities"),
            pytest.param(agent_body("a", capabilities=["x" * 65]), 400, "invalid-capability",
                         None, id="capability-too-long"),
            pytest.param(agent_body("a", capabilities=["Bad Cap"]), 400, "invalid-capability",
                         None, id="capability-shape"),
            pytest.param(agent_body("a", capabilities=[1]), 400, "invalid-capability", None,
                         id="capability-not-string"),
            pytest.param(agent_body("a", capabilities="summarize"), 400, "invalid-field", None,
                         id="capabilities-not-array"),
            pytest.param(agent_body("a", weight=-1), 400, "invalid-field", None, id="weight-neg"),
            pytest.param(agent_body("a", weight=10**30), 400, "invalid-field", None,
                         id="weight-huge"),
            pytest.param(agent_body("a", weight=True), 400, "invalid-field", None,
                         id="weight-bool"),
            pytest.param(agent_body("a", weight=1.5), 400, "invalid-field", None,
                         id="weight-float"),
            pytest.param(agent_body("a", name="x\x00y"), 400, "invalid-field", None,
                         id="name-nul"),
            pytest.param(agent_body("a", name="n" * 129), 400, "invalid-field", None,
                         id="name-too-long"),
            pytest.param(agent_body("a", version=3), 400, "invalid-field", None,
                         id="version-not-string"),
            pytest.param(agent_body("a", labels=["x"]), 400, "invalid-field", None,
                         id="labels-not-object"),
            pytest.param(agent_body("a", labels={"k": 1}), 400, "invalid-field", None,
                         id="label-not-string"),
            pytest.param(agent_body("a", labels={"bad key": "v"}), 400, "invalid-field", None,
                         id="label-key"),
            pytest.param(agent_body("a", labels={f"k{i}": "v" for i in range(33)}), 400,
                         "invalid-field", None, id="too-many-labels"),
            pytest.param(agent_body("a", tenant="globex"), 400, "unknown-field", None,
                         id="tenant-in-body"),
            pytest.param(agent_body("a", status="healthy"), 400, "unknown-field", None,
                         id="status-in-body"),
            pytest.param([agent_body("a")], 400, "malformed-body", None, id="array-body"),
            pytest.param("a", 400, "malformed-body", None, id="string-body"),
        ],
    )  # fmt: skip
    async def test_bad_registration(
        self,
        registry: Client,
        body: Any,
        status: int,
        code: str,
        reasons: list[str] | None,
    ) -> None:
        """A registration body that breaks a rule is refused with its own problem type."""
        response = await registry.post("/agents", json=body, headers=ACME)
        await assert_registry_problem(response, status, code, reasons=reasons)
        listing = await (await registry.get("/agents", headers=ACME)).json()
        assert listing["agents"] == []

    @pytest.mark.parametrize(
        ("data", "content_type", "status", "code"),
        [
            pytest.param(b"{", "application/json", 400, "malformed-body", id="truncated-json"),
            pytest.param(b"", "application/json", 400, "malformed-body", id="empty"),
            pytest.param(b"\xff\xfe", "application/json", 400, "malformed-body", id="not-utf8"),
            pytest.param(b'{"id":"a"}', "text/plain", 415, "unsupported-media-type",
                         id="text-plain"),
            pytest.param(b"{}", "application/x-www-form-urlencoded", 415,
                         "unsupported-media-type", id="form"),
            pytest.param(b'{"id":"a","pad":"' + b"x" * 70_000 + b'"}', "application/json", 413,
                         "payload-too-large", id="over-64k"),
        ],
    )  # fmt: skip
    async def test_bad_body_encoding(
        self, registry: Client, data: bytes, content_type: str, status: int, code: str
    ) -> None:
        """Bodies that are not a small JSON document are refused before validation."""
        response = await registry.post(
            "/agents", data=data, headers={**ACME, "Content-Type": content_type}
        )
        await assert_registry_problem(response, status, code)

    @pytest.mark.parametrize(
        ("body", "code"),
        [
            pytest.param({"id": "b"}, "invalid-field", id="change-id"),
            pytest.param({}, "malformed-body", id="nothing"),
            pytest.param({"name": ""}, "invalid-field", id="empty-name"),
            pytest.param({"endpoint_url": "http://u:p@h/"}, "invalid-endpoint-url", id="userinfo"),
            pytest.param({"capabilities": ["c"] * 33}, "too-many-capabilities", id="caps"),
            pytest.param({"tenant": "globex"}, "unknown-field", id="tenant"),
        ],
    )
    async def test_bad_patch(self, registry: Client, body: dict[str, Any], code: str) -> None:
        """A PATCH that breaks a rule is a 400 and leaves the agent unchanged."""
        await registry.post("/agents", json=agent_body("a"), headers=ACME)
        response = await registry.patch("/agents/a", json=body, headers=ACME)
        await assert_registry_problem(response, 400, code)
        assert (await (await registry.get("/agents/a", headers=ACME)).json())["name"] == "a"

    @pytest.mark.parametrize(
        ("query", "code"),
        [
            pytest.param("limit=0", "invalid-query", id="limit-zero"),
            pytest.param("limit=501", "invalid-query", id="limit-over-max"),
            pytest.param("limit=-1", "invalid-query", id="limit-negative"),
            pytest.param("limit=abc", "invalid-query", id="limit-text"),
            pytest.param("status=dead", "invalid-query", id="status-unknown"),
            pytest.param("capability=Bad%20Cap", "invalid-query", id="capability-shape"),
            pytest.param("tenant=globex", "invalid-query", id="tenant-param"),
            pytest.param("limit=1&limit=2", "invalid-query", id="repeated"),
            pytest.param("cursor=%%%", "invalid-cursor", id="cursor-garbage"),
            pytest.param("cursor=bm90LWpzb24", "invalid-cursor", id="cursor-not-json"),
            pytest.param("cursor=WyJhIiwiQkFEIl0", "invalid-cursor", id="cursor-bad-id"),
            pytest.param("cursor=WyJnbG9iZXgiLCJhIl0", "invalid-cursor", id="cursor-of-other"),
            pytest.param("cursor=" + "A" * 600, "invalid-query", id="cursor-too-long"),
        ],
    )
    async def test_bad_list_query(self, registry: Client, query: str, code: str) -> None:
        """List parameters are checked; a bad one is a 400 naming it."""
        response = await registry.get(f"/agents?{query}", headers=ACME)
        await assert_registry_problem(response, 400, code)

    @pytest.mark.parametrize(
        "path",
        [
            pytest.param("/agents/UPPER", id="upper"),
            pytest.param("/agents/a%20b", id="space"),
            pytest.param("/agents/" + "a" * 64, id="too-long"),
            pytest.param("/agents/by-capability", id="reserved"),
        ],
    )
    async def test_bad_agent_id_in_path(self, registry: Client, path: str) -> None:
        """An id in the path that no agent could have is a 400, not a lookup."""
        response = await registry.get(path, headers=ACME)
        await assert_registry_problem(response, 400, "invalid-agent-id")

    @pytest.mark.parametrize(
        ("headers", "status", "code", "reasons"),
        [
            pytest.param({}, 401, "tenant-required", ["no_tenant"], id="absent"),
            pytest.param({"X-Nops-Tenant": ""}, 401, "tenant-required", ["no_tenant"], id="empty"),
            pytest.param({"X-Nops-Tenant": "a b"}, 400, "invalid-tenant", None, id="space"),
            pytest.param({"X-Nops-Tenant": "t" * 65}, 400, "invalid-tenant", None, id="long"),
        ],
    )
    async def test_tenant_header(
        self,
        registry: Client,
        headers: dict[str, str],
        status: int,
        code: str,
        reasons: list[str] | None,
    ) -> None:
        """Without a well-formed X-Nops-Tenant nothing is read or written."""
        for method, path in (("GET", "/agents"), ("POST", "/agents"), ("GET", "/agents/a")):
            response = await registry.request(method, path, json=agent_body("a"), headers=headers)
            await assert_registry_problem(response, status, code, reasons=reasons)

    async def test_two_tenant_headers_are_refused(self, registry: Client) -> None:
        """Two X-Nops-Tenant fields are ambiguous and refused."""
        response = await registry.get(
            "/agents", headers=[("X-Nops-Tenant", "acme"), ("X-Nops-Tenant", "globex")]
        )
        await assert_registry_problem(
            response, 401, "tenant-required", reasons=["ambiguous_tenant"]
        )

    @pytest.mark.parametrize(
        ("method", "path", "status", "code"),
        [
            pytest.param("PUT", "/agents/a", 405, "method-not-allowed", id="put"),
            pytest.param("GET", "/nowhere", 404, "not-found", id="unknown-path"),
            pytest.param("GET", "/agents/a/heartbeat", 405, "method-not-allowed", id="get-beat"),
        ],
    )
    async def test_router_errors_are_problems(
        self, registry: Client, method: str, path: str, status: int, code: str
    ) -> None:
        """Router errors are problem+json too."""
        response = await registry.request(method, path, headers=ACME)
        await assert_registry_problem(response, status, code)


class TestTenantIsolation:
    """A tenant never sees or touches another tenant's agents."""

    @pytest.fixture
    async def shared(self, registry: Client) -> Client:
        for headers, weight in ((ACME, 1), (GLOBEX, 2)):
            response = await registry.post(
                "/agents", json=agent_body("a1", weight=weight), headers=headers
            )
            assert response.status == 201
        response = await registry.post("/agents", json=agent_body("acme-only"), headers=ACME)
        assert response.status == 201
        return registry

    @pytest.mark.parametrize(
        ("method", "path", "body"),
        [
            pytest.param("GET", "/agents/acme-only", None, id="read"),
            pytest.param("PATCH", "/agents/acme-only", {"weight": 9}, id="update"),
            pytest.param("POST", "/agents/acme-only/heartbeat", None, id="heartbeat"),
            pytest.param("DELETE", "/agents/acme-only", None, id="delete"),
        ],
    )
    async def test_other_tenant_gets_404(
        self, shared: Client, clock: PinnedClock, method: str, path: str, body: Any
    ) -> None:
        """globex cannot read or change acme's agent: it does not exist for globex."""
        clock.advance(1)
        response = await shared.request(method, path, json=body, headers=GLOBEX)
        await assert_registry_problem(response, 404, "agent-not-found")
        untouched = await (await shared.get("/agents/acme-only", headers=ACME)).json()
        assert untouched["weight"] == 100
        assert untouched["heartbeat_at"] == "2026-11-23T00:00:00.000Z"

    async def test_same_id_in_two_tenants_is_two_agents(self, shared: Client) -> None:
        """The id is unique per tenant; each tenant sees its own record."""
        acme = await (await shared.get("/agents/a1", headers=ACME)).json()
        globex = await (await shared.get("/agents/a1", headers=GLOBEX)).json()
        assert (acme["tenant"], acme["weight"]) == ("acme", 1)
        assert (globex["tenant"], globex["weight"]) == ("globex", 2)
        await shared.delete("/agents/a1", headers=GLOBEX)
        assert (await shared.get("/agents/a1", headers=ACME)).status == 200

    async def test_listing_shows_only_own_agents(self, shared: Client) -> None:
        """GET /agents lists the caller's tenant only, whatever the filters."""
        page = await (await shared.get("/agents", headers=GLOBEX)).json()
        assert [(a["tenant"], a["id"]) for a in page["agents"]] == [("globex", "a1")]

    async def test_cursor_from_another_tenant_is_refused(self, shared: Client) -> None:
        """A cursor issued to acme does not page globex's listing."""
        page = await (await shared.get("/agents?limit=1", headers=ACME)).json()
        response = await shared.get(
            "/agents", params={"cursor": page["next_cursor"]}, headers=GLOBEX
        )
        await assert_registry_problem(response, 400, "invalid-cursor")


class TestAdmin:
    async def test_admin_lists_every_tenant(self, make_registry: RegistryFactory) -> None:
        """With the admin key, /admin/agents lists across tenants, and can filter one."""
        registry = await make_registry(admin_key_sha256=admin_key_digest(ADMIN_KEY))
        for headers in (ACME, GLOBEX):
            await registry.post("/agents", json=agent_body("a1"), headers=headers)
        key = {"X-Nops-Admin-Key": ADMIN_KEY}
        page = await (await registry.get("/admin/agents", headers=key)).json()
        assert [(a["tenant"], a["id"]) for a in page["agents"]] == [
            ("acme", "a1"),
            ("globex", "a1"),
        ]
        first = await (await registry.get("/admin/agents?limit=1", headers=key)).json()
        second = await (
            await registry.get(
                "/admin/agents", params={"limit": "1", "cursor": first["next_cursor"]}, headers=key
            )
        ).json()
        assert [a["tenant"] for a in first["agents"] + second["agents"]] == ["acme", "globex"]
        only = await (await registry.get("/admin/agents?tenant=globex", headers=key)).json()
        assert [a["tenant"] for a in only["agents"]] == ["globex"]

    @pytest.mark.parametrize(
        ("configured", "headers", "reason"),
        [
            pytest.param(False, {"X-Nops-Admin-Key": ADMIN_KEY}, "admin_disabled", id="disabled"),
            pytest.param(True, {}, "admin_key_invalid", id="no-key"),
            pytest.param(True, {"X-Nops-Admin-Key": ADMIN_KEY + "x"}, "admin_key_invalid",
                         id="wrong-key"),
            pytest.param(True, {**ACME}, "admin_key_invalid", id="tenant-is-not-admin"),
        ],
    )  # fmt: skip
    async def test_admin_needs_the_key(
        self,
        make_registry: RegistryFactory,
        configured: bool,
        headers: dict[str, str],
        reason: str,
    ) -> None:
        """Without the configured admin key, the admin API is a 403."""
        digest = admin_key_digest(ADMIN_KEY) if configured else ""
        registry = await make_registry(admin_key_sha256=digest)
        response = await registry.get("/admin/agents", headers=headers)
        body = await assert_registry_problem(response, 403, "admin-required", reasons=[reason])
        assert ADMIN_KEY not in str(body)

    def test_short_admin_keys_are_refused(self) -> None:
        """An admin key under 32 bytes is a configuration error."""
        with pytest.raises(ValueError, match="at least 32"):
            admin_key_digest("short")
        assert admin_key_digest(ADMIN_KEY) == hashlib.sha256(ADMIN_KEY.encode()).hexdigest()


class TestService:
    async def test_health_and_readiness(self, registry: Client) -> None:
        """/health answers; /_readyz checks PostgreSQL and reports the outbox backlog."""
        assert (await registry.get("/health")).status == 200
        await registry.post("/agents", json=agent_body("a"), headers=ACME)
        ready = await registry.get("/_readyz")
        assert ready.status == 200
        assert await ready.json() == {
            "status": "ready",
            "checks": {"postgres": "ok"},
            "outbox_pending": 1,
        }

    async def test_no_version_banner(self, registry: Client) -> None:
        """The Server header does not name aiohttp or Python."""
        response = await registry.get("/health")
        assert response.headers["Server"] == "nops-registry"

    async def test_request_id_is_kept_from_the_gateway(self, registry: Client) -> None:
        """A well-formed X-Request-Id from the gateway is reused; a bad one replaced."""
        kept = await registry.get("/health", headers={"X-Request-Id": "abc123"})
        assert kept.headers["X-Request-Id"] == "abc123"
        replaced = await registry.get("/health", headers={"X-Request-Id": "bad id!"})
        assert replaced.headers["X-Request-Id"] != "bad id!"

    async def test_database_down_is_503_not_500(
        self, registry: Client, postgres_server: PostgresService
    ) -> None:
        """With PostgreSQL down, requests get 503 store-unavailable, and work again after."""
        await registry.post("/agents", json=agent_body("a"), headers=ACME)
        postgres_server.stop()
        try:
            for method, path in (("GET", "/agents/a"), ("POST", "/agents"), ("GET", "/_readyz")):
                response = await registry.request(method, path, json=agent_body("b"), headers=ACME)
                await assert_registry_problem(response, 503, "store-unavailable")
        finally:
            postgres_server.start()
        for _ in range(50):  # the pool replaces its broken connections
            response = await registry.get("/agents/a", headers=ACME)
            if response.status == 200:
                break
        assert response.status == 200

    async def test_schema_is_migrated_at_start(self, registry: Client, registry_dsn: str) -> None:
        """Starting the service applies every migration."""
        conn = await asyncpg.connect(registry_dsn)
        try:
            versions = await conn.fetch("SELECT version FROM registry.schema_migrations")
        finally:
            await conn.close()
        assert [r["version"] for r in versions] == [1, 2]

    def test_public_api(self) -> None:
        """The package exports exactly its documented names."""
        import registry

        assert registry.__all__ == ["RegistrySettings", "create_app"]
        assert registry.create_app is create_app
        assert registry.RegistrySettings is RegistrySettings
        assert "RegistryError" in error_names

    @pytest.mark.parametrize(
        ("overrides", "message"),
        [
            pytest.param({"dsn": "mysql://x"}, "dsn", id="dsn"),
            pytest.param({"topic": "Bad Topic"}, "topic", id="topic"),
            pytest.param({"bus_url": "ftp://bus"}, "bus_url", id="bus-url"),
            pytest.param({"admin_key_sha256": "zz"}, "admin_key_sha256", id="admin-digest"),
            pytest.param({"sweep_interval_s": 0}, "sweep_interval_s", id="sweep-interval"),
            pytest.param({"max_page": 0}, "max_page", id="max-page"),
        ],
    )
    def test_settings_are_checked(self, overrides: dict[str, Any], message: str) -> None:
        """A bad setting is refused when the settings are built, naming it."""
        values: dict[str, Any] = {"dsn": "postgresql://h/db"} | overrides
        with pytest.raises(ValueError, match=message):
            RegistrySettings(**values)
