"""The freshness stage: the created/expires window on a pinned clock, and nonce scope."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.app import METRICS
from tests.conftest import GatewayFactory, PinnedClock, Signer
from tests.problems import assert_problem

Client = TestClient[Any, Any]

NOW = 1_800_000_000.0


class TestCreatedWindow:
    @pytest.mark.parametrize(
        ("offset", "reason"),
        [
            pytest.param(0, None, id="now"),
            pytest.param(300, None, id="skew-edge"),
            pytest.param(301, "created_in_future", id="past-skew"),
            pytest.param(-300, None, id="age-edge"),
            pytest.param(-301, "created_too_old", id="past-age"),
            pytest.param(-86_400, "created_too_old", id="a-day-old"),
        ],
    )
    async def test_default_window(
        self, make_gateway: GatewayFactory, offset: int, reason: str | None
    ) -> None:
        """By default created may be 300 s ahead (skew) or 300 s behind (age)."""
        clock = PinnedClock(NOW)
        client = await make_gateway(clock=clock)
        response = await Signer(client, clock=clock).request("GET", "/echo/x", created=NOW + offset)
        if reason is None:
            assert response.status == 200
        else:
            await assert_problem(response, 401, "stale-request", [reason])

    @pytest.mark.parametrize(
        ("offset", "reason"),
        [
            pytest.param(10, None, id="skew-edge"),
            pytest.param(11, "created_in_future", id="past-skew"),
            pytest.param(-60, None, id="age-edge"),
            pytest.param(-61, "created_too_old", id="past-age"),
        ],
    )
    async def test_configured_window(
        self, make_gateway: GatewayFactory, offset: int, reason: str | None
    ) -> None:
        """freshness.max_skew_s and max_age_s move the edges."""
        clock = PinnedClock(NOW)
        client = await make_gateway(clock=clock, freshness={"max_skew_s": 10, "max_age_s": 60})
        response = await Signer(client, clock=clock).request("GET", "/echo/x", created=NOW + offset)
        if reason is None:
            assert response.status == 200
        else:
            await assert_problem(response, 401, "stale-request", [reason])

    async def test_signature_ages_in_flight(self, make_gateway: GatewayFactory) -> None:
        """A request signed now and delivered past max_age_s is stale."""
        clock = PinnedClock(NOW)
        client = await make_gateway(clock=clock)
        signer = Signer(client, clock=clock)
        headers = signer.sign("GET", "/echo/x")
        clock.advance(301)
        response = await client.get("/echo/x", headers=headers)
        await assert_problem(response, 401, "stale-request", ["created_too_old"])

    @pytest.mark.parametrize(
        ("expires", "reason"),
        [
            pytest.param(NOW, None, id="expires-now"),
            pytest.param(NOW + 1, None, id="expires-ahead"),
            pytest.param(NOW - 1, "expired", id="expired"),
        ],
    )
    async def test_expires_is_honoured(
        self, make_gateway: GatewayFactory, expires: float, reason: str | None
    ) -> None:
        """A signature past its own expires is stale, whatever its created."""
        clock = PinnedClock(NOW)
        client = await make_gateway(clock=clock)
        response = await Signer(client, clock=clock).request("GET", "/echo/x", expires=expires)
        if reason is None:
            assert response.status == 200
        else:
            await assert_problem(response, 401, "stale-request", [reason])


class TestNonces:
    async def test_nonce_is_scoped_to_its_key(self, gateway: Client) -> None:
        """The same nonce under two keys is two different claims."""
        for keyid in ("acme-k1", "globex-k1"):
            response = await Signer(gateway, keyid).request("GET", "/echo/x", nonce="shared-nonce")
            assert response.status == 200

    async def test_same_nonce_new_signature_is_still_a_replay(self, gateway: Client) -> None:
        """Re-signing with a used nonce (new path, same key) is refused: nonces are single-use."""
        signer = Signer(gateway)
        first = await signer.request("GET", "/echo/a", nonce="n-1")
        assert first.status == 200
        second = await signer.request("GET", "/echo/b", nonce="n-1")
        await assert_problem(second, 409, "replayed-nonce", ["nonce_reused"])

    async def test_unsigned_requests_skip_freshness(self, gateway: Client) -> None:
        """Anonymous requests on open routes touch no replay state."""
        for _ in range(3):
            assert (await gateway.get("/echo/x")).status == 200
        metrics = gateway.app[METRICS]
        assert not [key for key in metrics.denials if key[0] == "freshness"]
