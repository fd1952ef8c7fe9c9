"""Shadow mode: a candidate policy beside the enforcing one, never changing the response."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import METRICS
from gateway.metrics import MAX_SHADOW_REASONS, Metrics
from gateway.policy.engine import Decision
from gateway.policy.shadow import ALLOW_DIFFERS, ShadowEngine, disagreement_reasons
from gateway.policy.stack import POLICY_STACK
from tests.conftest import GatewayClient, GatewayFactory, free_port
from tests.problems import assert_problem

Client = GatewayClient


async def shadow_gateway(make_gateway: GatewayFactory, **shadow: Any) -> Client:
    return await make_gateway(
        policy={"shadow": {"enabled": True, "decision_path": "test/candidate/decision", **shadow}}
    )


async def drain(client: Client) -> Metrics:
    shadow = client.app[POLICY_STACK].shadow
    assert shadow is not None
    await shadow.drain()
    return client.app[METRICS]


@pytest.fixture
async def black_hole() -> AsyncIterator[str]:
    """An HTTP server that takes 5 s to answer anything."""

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", slow)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()


def d(allow: bool, *reasons: str) -> Decision:
    return Decision("id", allow, reasons, {}, "")


class TestDisagreementReasons:
    @pytest.mark.parametrize(
        ("enforced", "shadow", "want"),
        [
            pytest.param(d(True, "allowed"), d(True, "allowed"), (), id="both-allow"),
            pytest.param(d(False, "a", "b"), d(False, "b", "a"), (), id="same-denial"),
            pytest.param(d(True, "allowed"), d(False, "x", "y"), ("x", "y"), id="shadow-denies"),
            pytest.param(d(False, "x"), d(True, "allowed"), ("x",), id="shadow-allows"),
            pytest.param(d(False, "x", "y"), d(False, "y", "z"), ("x", "z"), id="other-reasons"),
            pytest.param(d(True, "x"), d(False, "x"), (ALLOW_DIFFERS,), id="only-allow-differs"),
        ],
    )
    def test_reasons_counted(self, enforced: Decision, shadow: Decision, want: tuple[str]) -> None:
        """The counted reasons are those on which the two answers differ."""
        assert disagreement_reasons(enforced, shadow) == want

    def test_reason_labels_are_bounded(self) -> None:
        """Past MAX_SHADOW_REASONS distinct reasons, new ones count as "other"."""
        metrics = Metrics()
        for index in range(MAX_SHADOW_REASONS + 10):
            metrics.record_shadow_disagreement(True, False, f"reason_{index}")
        labels = {reason for _, _, reason in metrics.shadow_disagreements}
        assert len(labels) == MAX_SHADOW_REASONS + 1
        assert metrics.shadow_disagreements[(True, False, "other")] == 10


class TestShadowGateway:
    async def test_disagreement_is_counted_and_logged_not_enforced(
        self, make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The candidate would deny readonly; the request still passes, the disagreement counts."""
        client = await shadow_gateway(make_gateway)
        with caplog.at_level(logging.WARNING, logger="gateway.policy.shadow"):
            response = await client.get("/readonly/x")
            metrics = await drain(client)
        assert response.status == 200
        assert metrics.shadow_evaluations == {"disagree": 1}
        assert metrics.shadow_disagreements == {(True, False, "readonly_retired"): 1}
        [line] = [r for r in caplog.records if r.getMessage() == "shadow policy disagrees"]
        assert line.__dict__["shadow_reasons"] == ["readonly_retired"]
        assert line.__dict__["enforced_allow"] is True

    async def test_agreement_is_counted(self, make_gateway: GatewayFactory) -> None:
        """Where the candidate decides as the enforcing policy, it agrees (allow and deny)."""
        client = await shadow_gateway(make_gateway)
        assert (await client.get("/echo/x")).status == 200
        await assert_problem(
            await client.options("/echo/x"), 403, "policy-denied", reasons=["method_not_allowed"]
        )
        metrics = await drain(client)
        assert metrics.shadow_evaluations == {"agree": 2}
        assert metrics.shadow_disagreements == {}

    async def test_candidate_allowing_a_denial_does_not_open_it(
        self, make_gateway: GatewayFactory
    ) -> None:
        """A permissive candidate is counted per enforced deny reason; the 403 stands."""
        client = await shadow_gateway(make_gateway, decision_path="test/candidate/permissive")
        await assert_problem(
            await client.post("/readonly/x"), 403, "policy-denied", reasons=["method_not_allowed"]
        )
        metrics = await drain(client)
        assert metrics.shadow_disagreements == {(False, True, "method_not_allowed"): 1}

    @pytest.mark.parametrize(
        "shadow",
        [
            pytest.param({"url": f"http://127.0.0.1:{free_port()}"}, id="unreachable"),
            pytest.param({"decision_path": "test/nothing/here"}, id="undefined"),
            pytest.param({"decision_path": "test/broken/illtyped"}, id="ill-typed"),
        ],
    )
    async def test_candidate_errors_never_affect_the_request(
        self, make_gateway: GatewayFactory, shadow: dict[str, Any]
    ) -> None:
        """A broken candidate is counted as an error; the request is served as enforced."""
        client = await shadow_gateway(make_gateway, **shadow)
        assert (await client.get("/echo/x")).status == 200
        metrics = await drain(client)
        assert metrics.shadow_evaluations == {"error": 1}
        assert metrics.shadow_disagreements == {}

    async def test_slow_candidate_adds_no_latency(
        self, make_gateway: GatewayFactory, black_hole: str
    ) -> None:
        """The response does not wait for the candidate; its timeout counts as an error."""
        client = await shadow_gateway(make_gateway, url=black_hole, timeout_s=0.3)
        started = time.monotonic()
        assert (await client.get("/echo/x")).status == 200
        assert time.monotonic() - started < 0.3
        metrics = await drain(client)
        assert metrics.shadow_evaluations == {"error": 1}

    async def test_sample_rate_zero_evaluates_nothing(self, make_gateway: GatewayFactory) -> None:
        """sample_rate = 0: the candidate is never asked."""
        client = await shadow_gateway(make_gateway, sample_rate=0.0)
        for _ in range(5):
            assert (await client.get("/readonly/x")).status == 200
        metrics = await drain(client)
        assert metrics.shadow_evaluations == {}


class TestShadowEngine:
    async def test_sampling_follows_the_rate(self) -> None:
        """Only requests whose sample falls under sample_rate reach the candidate."""

        class Counting:
            def __init__(self) -> None:
                self.calls = 0

            async def decide(self, document: Any, decision_id: str) -> Decision:
                self.calls += 1
                return Decision(decision_id, True, ("allowed",), {}, "")

            async def healthy(self) -> bool:
                return True

            async def close(self) -> None:
                return None

        primary, candidate = Counting(), Counting()
        samples = iter([0.05, 0.5, 0.09, 0.95])
        engine = ShadowEngine(
            primary, candidate, sample_rate=0.1, timeout_s=1, sampler=lambda: next(samples)
        )
        for index in range(4):
            await engine.decide({}, f"d-{index}")
        await engine.drain()
        assert (primary.calls, candidate.calls) == (4, 2)
        await engine.close()
