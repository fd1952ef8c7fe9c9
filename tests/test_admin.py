"""The admin plane: API keys, casbin RBAC, and working while OPA is down."""

from __future__ import annotations

import base64
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.admin import ROLES, AdminAuthenticator, Rbac, hash_secret
from gateway.admin.keys import main as new_key_main
from gateway.config import ConfigError, parse_config
from gateway.errors import AdminUnauthenticated
from gateway.middleware import SECURITY_HEADERS
from tests.bundles import KeyPair, bundle_fixture, keys_fixture  # noqa: F401 - fixtures
from tests.conftest import (
    OPA_BINARY,
    POLICY_DIR,
    TEST_POLICY_DIR,
    TEST_SECRETS,
    GatewayFactory,
    OpaProcess,
    free_port,
)
from tests.problems import assert_problem
from tests.secretscan import register_secret

Client = TestClient[Any, Any]

# One key per role: id "<role>", secret "secret-of-<role>-0123456789".
SECRETS = {role: f"secret-of-{role.lower()}-0123456789" for role in ROLES}
for _role, _secret in SECRETS.items():
    register_secret(_secret, f"admin key {_role}")
ADMIN_KEYS = [
    {"id": role.lower(), "role": role, "hash": hash_secret(secret)}
    for role, secret in SECRETS.items()
]


def bearer(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {role.lower()}.{SECRETS[role]}"}


async def admin_gateway(make_gateway: GatewayFactory, **sections: Any) -> Client:
    return await make_gateway(admin={"keys": ADMIN_KEYS}, **sections)


ENDPOINTS = [
    ("GET", "/_admin/whoami", "VIEWER"),
    ("GET", "/_admin/policy", "VIEWER"),
    ("GET", "/_admin/tenants", "VIEWER"),
    ("POST", "/_admin/policy/cache/flush", "OPERATOR"),
    ("GET", "/_admin/keys", "ADMIN"),
    ("GET", "/_admin/rbac", "SUPER_ADMIN"),
]


class TestAdminConfig:
    @pytest.mark.parametrize(
        ("key", "where", "message"),
        [
            pytest.param({"hash": "sha256:abc"}, "admin.keys[0].hash", "64", id="short-hash"),
            pytest.param({"hash": "md5:" + "0" * 64}, "admin.keys[0].hash", "sha256", id="alg"),
            pytest.param({"id": "a.b"}, "admin.keys[0].id", "no '.'", id="dot-in-id"),
            pytest.param({"role": "ROOT"}, "admin.keys[0].role", "one of", id="role"),
        ],
    )
    def test_bad_key_names_the_key(self, key: dict[str, str], where: str, message: str) -> None:
        """A malformed admin key is refused at start-up, naming the dotted key."""
        good = {"id": "ops", "role": "OPERATOR", "hash": "sha256:" + "0" * 64}
        with pytest.raises(ConfigError) as caught:
            parse_config({"admin": {"keys": [{**good, **key}]}})
        assert caught.value.key == where
        assert message in caught.value.message

    def test_duplicate_ids_are_refused(self) -> None:
        """Two keys with one id would make the role ambiguous."""
        key = {"id": "ops", "role": "OPERATOR", "hash": "sha256:" + "0" * 64}
        with pytest.raises(ConfigError, match="duplicate"):
            parse_config({"admin": {"keys": [key, {**key, "role": "VIEWER"}]}})

    def test_key_generator_output_is_config_that_authenticates(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """python -m gateway.admin.keys prints a working token and its [[admin.keys]] table."""
        assert new_key_main(["--role", "OPERATOR", "--id", "ops-1"]) == 0
        out, err = capsys.readouterr()
        config = parse_config(tomllib.loads(out))
        token = err.split("Authorization: ", 1)[1].strip()
        principal = AdminAuthenticator(config.admin.keys).authenticate(token)
        assert (principal.key_id, principal.role) == ("ops-1", "OPERATOR")
        assert token.split(".", 1)[1] not in out  # only the hash goes into config


class TestRbac:
    @pytest.mark.parametrize("role", ROLES)
    def test_roles_inherit_downwards(self, role: str) -> None:
        """Each role holds exactly its own permissions and those of every weaker role."""
        rbac = Rbac()
        rank = ROLES.index(role)
        for needs, permission in PERMISSION.items():
            assert rbac.allowed(role, *permission) is (rank <= ROLES.index(needs))

    def test_unknown_role_has_no_permission(self) -> None:
        """Deny by default: a role casbin does not know is refused everything."""
        rbac = Rbac()
        assert not rbac.allowed("ROOT", "policy", "read")
        assert rbac.permissions("ROOT") == []


# The permission each minimum role is checked with in TestRbac.
PERMISSION = {
    "VIEWER": ("policy", "read"),
    "OPERATOR": ("cache", "flush"),
    "ADMIN": ("keys", "read"),
    "SUPER_ADMIN": ("rbac", "read"),
}


class TestAuthenticator:
    @pytest.mark.parametrize(
        "header",
        [
            pytest.param(None, id="missing"),
            pytest.param("", id="empty"),
            pytest.param("Basic dmlld2VyOng=", id="basic"),
            pytest.param("Bearer viewer", id="no-secret"),
            pytest.param("Bearer viewer.wrong-secret-0123456789", id="wrong-secret"),
            pytest.param("Bearer nobody." + SECRETS["VIEWER"], id="unknown-id"),
            pytest.param("Bearer viewer." + SECRETS["ADMIN"], id="other-keys-secret"),
            pytest.param("bearer viewer." + SECRETS["VIEWER"], id="lower-case-scheme"),
        ],
    )
    def test_refused(self, header: str | None) -> None:
        """Anything but a configured id with its own secret is unauthenticated."""
        auth = AdminAuthenticator(parse_config({"admin": {"keys": ADMIN_KEYS}}).admin.keys)
        with pytest.raises(AdminUnauthenticated):
            auth.authenticate(header)


class TestAdminApi:
    @pytest.mark.parametrize(
        ("method", "path", "needs"), [pytest.param(*e, id=e[1]) for e in ENDPOINTS]
    )
    @pytest.mark.parametrize("role", ROLES)
    async def test_role_matrix(
        self, make_gateway: GatewayFactory, role: str, method: str, path: str, needs: str
    ) -> None:
        """Each endpoint answers its minimum role and every stronger one; 403 below it."""
        client = await admin_gateway(make_gateway)
        response = await client.request(method, path, headers=bearer(role))
        if ROLES.index(role) <= ROLES.index(needs):
            assert response.status == 200, await response.text()
            assert response.content_type == "application/json"
        else:
            await assert_problem(response, 403, "admin-forbidden")

    @pytest.mark.parametrize(
        "headers",
        [
            pytest.param({}, id="no-key"),
            pytest.param({"Authorization": "Bearer viewer.not-the-secret-000000"}, id="bad-key"),
        ],
    )
    async def test_unauthenticated_is_a_401_problem(
        self, make_gateway: GatewayFactory, headers: dict[str, str]
    ) -> None:
        """No or a bad key: 401 problem+json with a Bearer challenge, security headers, id."""
        client = await admin_gateway(make_gateway)
        response = await client.get("/_admin/policy", headers=headers)
        body = await assert_problem(response, 401, "admin-unauthenticated")
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="nops-admin"'
        assert body["request_id"] == response.headers["X-Request-Id"]
        for name, value in SECURITY_HEADERS.items():
            assert response.headers[name] == value

    async def test_whoami_lists_inherited_permissions(self, make_gateway: GatewayFactory) -> None:
        """An OPERATOR holds cache:flush and every VIEWER permission."""
        client = await admin_gateway(make_gateway)
        body = await (await client.get("/_admin/whoami", headers=bearer("OPERATOR"))).json()
        assert body == {
            "key_id": "operator",
            "role": "OPERATOR",
            "permissions": [
                "cache:flush",
                "policy:read",
                "registry:read",
                "self:read",
                "tenants:read",
            ],
        }

    async def test_keys_never_show_secrets_or_hashes(self, make_gateway: GatewayFactory) -> None:
        """Admin, tenant and API keys are listed by id and owner; no secret or hash appears."""
        api_key = {"id": "agent-1", "tenant": "acme", "hash": hash_secret("s" * 32)}
        client = await admin_gateway(make_gateway, api_keys=[api_key])
        response = await client.get("/_admin/keys", headers=bearer("ADMIN"))
        text = await response.text()
        body = await response.json()
        for secret in TEST_SECRETS.values():
            assert base64.b64encode(secret).decode() not in text
        for admin_secret in SECRETS.values():
            assert admin_secret not in text
        assert "sha256:" not in text  # no configured hash (alg "hmac-sha256" is fine)
        assert {"id": "viewer", "role": "VIEWER"} in body["admin_keys"]
        assert [(k["keyid"], k["agent_id"]) for k in body["tenant_keys"]] == [
            ("acme-k1", None),
            ("acme-k0", None),
            ("acme-agent-a1", "a1"),
            ("globex-k1", None),
        ]
        assert body["api_keys"] == [
            {"id": "agent-1", "tenant": "acme", "agent_id": None, "scopes": [], "roles": []}
        ]

    async def test_policy_status_and_tenants(self, make_gateway: GatewayFactory) -> None:
        """Policy status reports OPA, cache and shadow; tenants come from the policy data."""
        client = await admin_gateway(make_gateway)
        status = await (await client.get("/_admin/policy", headers=bearer("VIEWER"))).json()
        assert status["opa"]["reachable"] is True
        assert status["opa"]["revision"] == ""  # the test OPA loads plain files
        assert status["cache"]["enabled"] is True
        assert status["shadow"] == {
            "enabled": False,
            "decision_path": None,
            "evaluations": {},
            "disagreements": [],
        }
        tenants = await (await client.get("/_admin/tenants", headers=bearer("VIEWER"))).json()
        assert tenants["policy_data"] == "ok"
        assert tenants["tenants"][0] == {
            "id": "acme",
            "configured": True,
            "tier": "professional",
            "keyids": ["acme-k1", "acme-k0", "acme-agent-a1"],
            "egress_ceiling": "D3",
        }
        assert [t["id"] for t in tenants["tenants"]] == ["acme", "globex"]

    async def test_operator_flushes_the_cache(
        self, make_gateway: GatewayFactory, bundle: Path, keys: KeyPair
    ) -> None:
        """POST flush empties the decision cache; the next request asks OPA again."""
        client = await admin_gateway(
            make_gateway,
            policy={
                "url": "",
                "opa_binary": str(OPA_BINARY),
                "bundle_file": str(bundle),
                "verification_key_file": str(keys.public),
            },
        )
        assert (await client.get("/echo/x")).status == 200
        status = await (await client.get("/_admin/policy", headers=bearer("VIEWER"))).json()
        assert status["cache"]["entries"] == 1
        assert status["opa"]["revision"].startswith("nops=sha256-")
        flushed = await client.post("/_admin/policy/cache/flush", headers=bearer("OPERATOR"))
        assert await flushed.json() == {"flushed": 1, "cache": "enabled"}

    @pytest.mark.parametrize(
        ("method", "path"),
        [
            pytest.param("GET", "/_admin/", id="root"),
            pytest.param("GET", "/_admin/nothing", id="unknown"),
            pytest.param("DELETE", "/_admin/keys", id="other-method"),
            pytest.param("GET", "/_admin", id="bare"),
        ],
    )
    async def test_admin_namespace_is_never_proxied(
        self, make_gateway: GatewayFactory, method: str, path: str
    ) -> None:
        """Even with a catch-all route, /_admin/... is a 404 problem, never an upstream call."""
        client = await admin_gateway(
            make_gateway,
            routes=[{"name": "echo", "prefix": "/", "upstream": "http://127.0.0.1:9"}],
        )
        await assert_problem(
            await client.request(method, path, headers=bearer("SUPER_ADMIN")), 404, "no-route"
        )

    async def test_disabled_admin_plane_answers_404(self, make_gateway: GatewayFactory) -> None:
        """admin.enabled = false: no admin endpoint exists."""
        client = await make_gateway(admin={"enabled": False, "keys": ADMIN_KEYS})
        await assert_problem(
            await client.get("/_admin/whoami", headers=bearer("VIEWER")), 404, "no-route"
        )


@pytest.fixture
def own_opa() -> Iterator[OpaProcess]:
    """An OPA of this test's own, which it may stop."""
    server = OpaProcess(POLICY_DIR, TEST_POLICY_DIR)
    server.start()
    yield server
    server.stop()


class TestAdminWithoutOpa:
    async def test_admin_plane_works_while_opa_is_down(
        self, make_gateway: GatewayFactory, own_opa: OpaProcess
    ) -> None:
        """OPA stopped: requests fail closed (503); the admin API authenticates and answers."""
        client = await admin_gateway(make_gateway, policy={"url": own_opa.url})
        assert (await client.get("/echo/x")).status == 200
        own_opa.stop()
        await assert_problem(await client.get("/echo/x"), 503, "policy-unavailable")
        status = await client.get("/_admin/policy", headers=bearer("VIEWER"))
        assert status.status == 200
        assert (await status.json())["opa"] == {
            "url": own_opa.url,
            "reachable": False,
            "revision": None,
        }
        tenants = await (await client.get("/_admin/tenants", headers=bearer("VIEWER"))).json()
        assert tenants["policy_data"] == "unavailable"
        assert [(t["id"], t["egress_ceiling"]) for t in tenants["tenants"]] == [
            ("acme", None),
            ("globex", None),
        ]
        flush = await client.post("/_admin/policy/cache/flush", headers=bearer("OPERATOR"))
        assert flush.status == 200
        await assert_problem(
            await client.get("/_admin/rbac", headers=bearer("ADMIN")), 403, "admin-forbidden"
        )
        await assert_problem(await client.get("/_admin/rbac"), 401, "admin-unauthenticated")

    async def test_admin_plane_starts_without_any_opa(self, make_gateway: GatewayFactory) -> None:
        """A gateway whose OPA never answered still serves the admin API."""
        client = await admin_gateway(
            make_gateway, policy={"url": f"http://127.0.0.1:{free_port()}", "timeout_s": 0.2}
        )
        response = await client.get("/_admin/whoami", headers=bearer("SUPER_ADMIN"))
        assert response.status == 200
        assert (await response.json())["role"] == "SUPER_ADMIN"


REGISTRY_ADMIN_KEY = "registry-admin-key-0123456789-abcdefghij"
register_secret(REGISTRY_ADMIN_KEY, "registry admin key")
REGISTRY_KEY_ENV = "NOPS_TEST_REGISTRY_ADMIN_KEY"


class TestRegistryAdmin:
    """Registry admin goes through the gateway's casbin-guarded admin plane."""

    async def _gateway(self, make_gateway: GatewayFactory, registry_url: str) -> Client:
        return await make_gateway(
            admin={
                "keys": ADMIN_KEYS,
                "registry_url": registry_url,
                "registry_key_env": REGISTRY_KEY_ENV,
            }
        )

    async def test_operator_lists_every_tenants_agents(
        self,
        make_gateway: GatewayFactory,
        make_registry: Any,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """OPERATOR sees all tenants' agents, filtered by tenant on request; VIEWER may not."""
        from registry.settings import admin_key_digest
        from tests.registrykit import agent_body, tenant

        monkeypatch.setenv(REGISTRY_KEY_ENV, REGISTRY_ADMIN_KEY)
        registry = await make_registry(admin_key_sha256=admin_key_digest(REGISTRY_ADMIN_KEY))
        for owner, agent in (("acme", "a1"), ("globex", "g1")):
            created = await registry.post("/agents", json=agent_body(agent), headers=tenant(owner))
            assert created.status == 201
        client = await self._gateway(make_gateway, str(registry.make_url("")).rstrip("/"))

        everyone = await client.get("/_admin/registry/agents", headers=bearer("OPERATOR"))
        assert everyone.status == 200
        assert {(a["tenant"], a["id"]) for a in (await everyone.json())["agents"]} >= {
            ("acme", "a1"),
            ("globex", "g1"),
        }
        acme = await client.get("/_admin/registry/agents?tenant=acme", headers=bearer("OPERATOR"))
        assert {a["tenant"] for a in (await acme.json())["agents"]} == {"acme"}
        viewer = await client.get("/_admin/registry/agents", headers=bearer("VIEWER"))
        await assert_problem(viewer, 403, "admin-forbidden")
        text = await everyone.text()
        assert REGISTRY_ADMIN_KEY not in text

    async def test_registry_down_is_503(
        self, make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An unreachable registry is a 503 naming it, not a 500."""
        monkeypatch.setenv(REGISTRY_KEY_ENV, REGISTRY_ADMIN_KEY)
        client = await self._gateway(make_gateway, f"http://127.0.0.1:{free_port()}")
        response = await client.get("/_admin/registry/agents", headers=bearer("ADMIN"))
        await assert_problem(response, 503, "dependency-unavailable", ["registry_unavailable"])

    async def test_not_configured_is_404(self, make_gateway: GatewayFactory) -> None:
        """Without admin.registry_url the endpoint does not exist for anyone."""
        client = await admin_gateway(make_gateway)
        response = await client.get("/_admin/registry/agents", headers=bearer("SUPER_ADMIN"))
        await assert_problem(response, 404, "no-route")

    def test_registry_url_needs_the_key_variable(self) -> None:
        """registry_url without registry_key_env names the missing key."""
        with pytest.raises(ConfigError) as caught:
            parse_config({"admin": {"registry_url": "http://127.0.0.1:8083"}})
        assert caught.value.key == "admin.registry_key_env"
