"""Per-agent signing keys: the agent is known from the signature on, before identity."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import ConfigError, parse_config
from tests.conftest import TEST_TENANTS, GatewayFactory
from tests.jwtissuer import FakeIssuer
from tests.problems import assert_problem
from tests.test_identity import bearer, issuer_config

TIERS = {
    "free": {"tenant": "1000/minute"},
    "professional": {"tenant": "1000/minute", "agent": "2/minute"},
}


class TestAgentQuota:
    async def test_agent_key_takes_the_agent_quota(self, make_gateway: GatewayFactory) -> None:
        """Signed with agent a1's key: a1's quota applies; the tenant-wide key is not limited."""
        agent = await make_gateway(sign_as="acme-agent-a1", ratelimit={"tiers": TIERS})
        statuses = [(await agent.get("/echo/x")).status for _ in range(2)]
        assert statuses == [200, 200]
        response = await agent.get("/echo/x")
        body = await assert_problem(response, 429, "rate-limited", ["agent_limit"])
        assert body["retry_after"] > 0
        assert '"agent";q=2;w=60' in response.headers["RateLimit-Policy"]


class TestAgentBinding:
    @pytest.mark.parametrize(
        ("claims", "status", "reasons", "agent_seen"),
        [
            pytest.param({"agent_id": "a1"}, 200, None, "a1", id="same-agent"),
            pytest.param({}, 200, None, "a1", id="token-without-agent"),
            pytest.param({"agent_id": "a2"}, 403, ["agent_mismatch"], None, id="other-agent"),
        ],
    )
    async def test_credential_must_name_the_signing_agent(
        self,
        make_gateway: GatewayFactory,
        jwt_issuer: FakeIssuer,
        claims: dict[str, Any],
        status: int,
        reasons: list[str] | None,
        agent_seen: str | None,
    ) -> None:
        """A token for another agent than the signing key's is refused; the key's agent wins."""
        client = await make_gateway(
            sign_as="acme-agent-a1", identity={"issuers": [issuer_config(jwt_issuer)]}
        )
        token = jwt_issuer.token(scope="locked:read", **claims)
        response = await client.get("/locked/x", headers=bearer(token))
        if reasons is not None:
            await assert_problem(response, status, "tenant-mismatch", reasons)
            return
        assert response.status == status
        assert (await response.json())["headers"]["x-nops-agent"] == agent_seen


class TestConfig:
    def test_agent_id_is_validated(self) -> None:
        """A malformed agent_id on a key names its key."""
        tenants = [
            {**TEST_TENANTS[1], "keys": [{**TEST_TENANTS[1]["keys"][0], "agent_id": "bad id"}]}
        ]
        with pytest.raises(ConfigError) as caught:
            parse_config({"tenants": tenants})
        assert caught.value.key == "tenants[0].keys[0].agent_id"
