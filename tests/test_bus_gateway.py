"""The bus behind the real gateway: ``/bus/...`` through the whole pipeline and real OPA."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from gateway.apikeys import hash_secret
from tests.busfixtures import as_tenant, assert_bus_problem
from tests.conftest import GatewayFactory
from tests.problems import assert_problem
from tests.secretscan import register_secret

Client = TestClient[Any, Any]
SECRET = "s3cret-bus-key-0123456789abcdef"
register_secret(SECRET, "API key secret (bus gateway)")
ACME = {"Authorization": f"ApiKey acme-agent.{SECRET}"}
GLOBEX = {"Authorization": f"ApiKey globex-agent.{SECRET}"}
EVENT = {"type": "agent.registered", "payload": {"agent": "a1"}}


API_KEYS = [
    {"id": "acme-agent", "tenant": "acme", "hash": hash_secret(SECRET)},
    {"id": "globex-agent", "tenant": "globex", "hash": hash_secret(SECRET)},
]


def _bus_route(bus_http: Client, *, require_signature: bool) -> dict[str, Any]:
    """The ``bus`` route of config/gateway.toml, leading to the test bus."""
    return {
        "name": "bus",
        "prefix": "/bus/",
        "upstream": str(bus_http.make_url("")).rstrip("/"),
        "strip_prefix": True,
        "auth": "jwt_or_api_key",
        "require_signature": require_signature,
        "timeout_s": 10.0,
    }


@pytest.fixture
async def gateway_to_bus(make_gateway: GatewayFactory, bus_http: Client) -> Client:
    """A gateway configured like the demo: a credential, no signature required."""
    return await make_gateway(
        routes=[_bus_route(bus_http, require_signature=False)], api_keys=API_KEYS
    )


def _group() -> str:
    """A group name unique to this run: the tenants here are fixed names."""
    return "g" + str(time.monotonic_ns())


class TestThroughTheGateway:
    async def test_publish_consume_ack_end_to_end(self, gateway_to_bus: Client) -> None:
        """A credentialed agent publishes, consumes and acks through /bus/ as its tenant."""
        group = _group()
        response = await gateway_to_bus.post(
            "/bus/topics/agents/messages", json=EVENT, headers=ACME
        )
        assert response.status == 201
        published = await response.json()
        consumed = await gateway_to_bus.get(
            f"/bus/topics/agents/subscriptions/{group}/messages?consumer=c&max=50", headers=ACME
        )
        assert consumed.status == 200
        messages = (await consumed.json())["messages"]
        [mine] = [m for m in messages if m["id"] == published["id"]]
        assert mine["envelope"]["tenant"] == "acme"
        ack = await gateway_to_bus.post(
            f"/bus/topics/agents/subscriptions/{group}/ack",
            json={"ids": [m["id"] for m in messages]},
            headers=ACME,
        )
        assert await ack.json() == {"acked": len(messages)}

    async def test_caller_cannot_choose_its_tenant(
        self, gateway_to_bus: Client, bus_http: Client
    ) -> None:
        """A caller-sent X-Nops-Tenant is dropped: the message lands in the key's tenant."""
        response = await gateway_to_bus.post(
            "/bus/topics/spoof/messages",
            json=EVENT,
            headers={**ACME, "X-Nops-Tenant": "globex"},
        )
        published = await response.json()
        group = _group()
        as_globex = await gateway_to_bus.get(
            f"/bus/topics/spoof/subscriptions/{group}/messages?consumer=c&max=50", headers=GLOBEX
        )
        assert published["id"] not in [m["id"] for m in (await as_globex.json())["messages"]]
        as_acme = await bus_http.get(
            f"/topics/spoof/subscriptions/{group}/messages?consumer=c&max=50",
            headers=as_tenant("acme"),
        )
        assert published["id"] in [m["id"] for m in (await as_acme.json())["messages"]]

    async def test_anonymous_caller_is_stopped_at_the_gateway(self, gateway_to_bus: Client) -> None:
        """No credential, no tenant: 401 from the identity stage, the bus never sees it."""
        response = await gateway_to_bus.post("/bus/topics/agents/messages", json=EVENT)
        await assert_problem(response, 401, "missing-credentials", ["no_credentials"])

    async def test_other_methods_are_denied_by_policy(self, gateway_to_bus: Client) -> None:
        """The Rego route data allows GET and POST only."""
        response = await gateway_to_bus.delete("/bus/topics/agents/dlq", headers=ACME)
        await assert_problem(response, 403, "policy-denied", ["method_not_allowed"])

    async def test_bus_problems_reach_the_caller_unchanged(self, gateway_to_bus: Client) -> None:
        """An invalid envelope is the bus's 422 problem, with the gateway's request id."""
        response = await gateway_to_bus.post(
            "/bus/topics/agents/messages", json={"type": "Bad Type", "payload": 1}, headers=ACME
        )
        body = await assert_bus_problem(response, 422, "invalid-envelope")
        assert body["errors"] == [{"pointer": "/type", "message": body["errors"][0]["message"]}]

    async def test_long_poll_through_the_gateway(self, gateway_to_bus: Client) -> None:
        """A long-poll is held for its wait and comes back empty through the proxy."""
        started = time.monotonic()
        response = await gateway_to_bus.get(
            f"/bus/topics/quiet/subscriptions/{_group()}/messages?consumer=c&wait=1", headers=ACME
        )
        assert await response.json() == {"messages": []}
        assert 0.9 <= time.monotonic() - started < 3


class TestSignedBusRoute:
    """The production setting: the bus route keeps require_signature on."""

    async def test_signed_request_reaches_the_bus_as_the_signing_tenant(
        self, make_gateway: GatewayFactory, bus_http: Client
    ) -> None:
        """Signed by acme's key with acme's API key: published into acme's topic."""
        gateway = await make_gateway(
            routes=[_bus_route(bus_http, require_signature=True)],
            api_keys=API_KEYS,
            sign_as="acme-k1",
        )
        response = await gateway.post(
            "/bus/topics/signed/messages", data=orjson.dumps(EVENT), headers=ACME
        )
        assert response.status == 201, await response.text()
        published = await response.json()
        consumed = await bus_http.get(
            f"/topics/signed/subscriptions/{_group()}/messages?consumer=c&max=50",
            headers=as_tenant("acme"),
        )
        assert published["id"] in [m["id"] for m in (await consumed.json())["messages"]]

    async def test_unsigned_request_is_refused(
        self, make_gateway: GatewayFactory, bus_http: Client
    ) -> None:
        """Without a signature the gateway answers 401 before the bus sees anything."""
        gateway = await make_gateway(
            routes=[_bus_route(bus_http, require_signature=True)], api_keys=API_KEYS
        )
        response = await gateway.post("/bus/topics/signed/messages", json=EVENT, headers=ACME)
        await assert_problem(response, 401, "missing-signature")

    async def test_key_of_another_tenant_than_the_signer_is_refused(
        self, make_gateway: GatewayFactory, bus_http: Client
    ) -> None:
        """Signed by globex, credential of acme: 403 tenant-mismatch, nothing published."""
        gateway = await make_gateway(
            routes=[_bus_route(bus_http, require_signature=True)],
            api_keys=API_KEYS,
            sign_as="globex-k1",
        )
        response = await gateway.post(
            "/bus/topics/signed/messages", data=orjson.dumps(EVENT), headers=ACME
        )
        await assert_problem(response, 403, "tenant-mismatch")
