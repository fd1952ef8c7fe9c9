"""Liveness and readiness against real OPA, Redis and PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest

from gateway.health import CheckState, Probe, ReadinessChecker
from tests.conftest import GatewayFactory, OpaProcess, free_port
from tests.problems import assert_problem
from tests.services import PostgresService, RedisService


class TestHealth:
    async def test_liveness_needs_no_dependency(self, make_gateway: GatewayFactory) -> None:
        """/health answers 200 even when OPA is unreachable."""
        client = await make_gateway(policy={"url": f"http://127.0.0.1:{free_port()}"})
        response = await client.get("/health")
        assert response.status == 200
        assert await response.json() == {"status": "ok"}


class TestReadiness:
    async def test_ready_with_every_dependency(
        self,
        make_gateway: GatewayFactory,
        redis_server: RedisService,
        postgres_server: PostgresService,
    ) -> None:
        """All configured dependencies answer: 200 ready with each check ok."""
        client = await make_gateway(
            dependencies={"redis_url": redis_server.url, "postgres_dsn": postgres_server.dsn}
        )
        response = await client.get("/_readyz")
        assert response.status == 200
        assert await response.json() == {
            "status": "ready",
            "readiness": "ready",
            "checks": {
                "opa": "ok",
                "redis": "ok",
                "postgres": "ok",
                "audit": "ok",
                "ratelimit": "ok",
            },
            "degraded": [],
        }

    @pytest.mark.parametrize(
        ("down", "readiness"),
        [
            pytest.param("redis", "degraded", id="redis-degrades"),
            pytest.param("postgres", "degraded", id="postgres-degrades"),
            pytest.param("opa", "unavailable", id="opa-unavailable"),
        ],
    )
    async def test_a_dependency_down_degrades_or_makes_unavailable(
        self,
        make_gateway: GatewayFactory,
        redis_server: RedisService,
        postgres_server: PostgresService,
        down: str,
        readiness: str,
    ) -> None:
        """Redis or PostgreSQL down: 200 degraded naming it; OPA down: 503 problem; back: ready."""
        from tests.conftest import POLICY_DIR

        own_opa = OpaProcess(POLICY_DIR)
        own_opa.start()
        services: dict[str, RedisService | PostgresService | OpaProcess] = {
            "redis": redis_server,
            "postgres": postgres_server,
            "opa": own_opa,
        }
        try:
            client = await make_gateway(
                policy={"url": own_opa.url},
                dependencies={
                    "redis_url": redis_server.url,
                    "postgres_dsn": postgres_server.dsn,
                    "probe_timeout_s": 1.0,
                },
            )
            assert (await client.get("/_readyz")).status == 200
            services[down].stop()
            response = await client.get("/_readyz")
            if readiness == "unavailable":
                body = await assert_problem(response, 503, "dependency-unavailable")
                assert body["readiness"] == "unavailable"
                assert body["unavailable"] == [down]
                assert body["degraded"] == []
                assert down in body["detail"]
            else:
                assert response.status == 200
                body = await response.json()
                assert body["status"] == body["readiness"] == "degraded"
                assert body["degraded"] == [down]
            ok = {k for k, v in body["checks"].items() if v == "ok"}
            assert ok == (set(services) | {"audit", "ratelimit"}) - {down}
            assert body["checks"][down] in {"unhealthy", "unreachable"}
            services[down].start()
            recovered = await client.get("/_readyz")
            assert (recovered.status, (await recovered.json())["readiness"]) == (200, "ready")
        finally:
            own_opa.stop()
            redis_server.start()
            postgres_server.start()


def _probe(answer: bool | CheckState | type[Exception] | None) -> Probe:
    async def probe() -> bool | CheckState:
        if answer is None:
            await asyncio.sleep(10)
        if isinstance(answer, type):
            raise answer("down")
        assert answer is not None
        return answer

    return probe


class TestReadinessChecker:
    @pytest.mark.parametrize(
        ("answer", "critical", "state", "readiness"),
        [
            pytest.param(True, True, "ok", "ready", id="ok"),
            pytest.param(CheckState.DEGRADED, True, "degraded", "degraded", id="critical-fallback"),
            pytest.param(CheckState.DEGRADED, False, "degraded", "degraded", id="fallback"),
            pytest.param(False, True, "unhealthy", "unavailable", id="critical-unhealthy"),
            pytest.param(OSError, True, "unreachable", "unavailable", id="critical-raises"),
            pytest.param(None, True, "timeout", "unavailable", id="critical-timeout"),
            pytest.param(False, False, "unhealthy", "degraded", id="degradable-unhealthy"),
            pytest.param(OSError, False, "unreachable", "degraded", id="degradable-raises"),
            pytest.param(None, False, "timeout", "degraded", id="degradable-timeout"),
        ],
    )
    async def test_one_check_decides_the_readiness(
        self,
        answer: bool | CheckState | type[Exception] | None,
        critical: bool,
        state: str,
        readiness: str,
    ) -> None:
        """A check's answer and criticality give its state and the node's readiness."""
        checker = ReadinessChecker(timeout_s=0.05)
        checker.add("ok", _probe(True), critical=True)
        checker.add("dep", _probe(answer), critical=critical)
        report = await checker.check()
        assert report.checks == {"ok": "ok", "dep": state}
        assert report.readiness == readiness
        assert report.unavailable == (("dep",) if readiness == "unavailable" else ())
        assert report.degraded == (("dep",) if readiness == "degraded" else ())

    async def test_unavailable_wins_over_degraded_and_lists_both(self) -> None:
        """A critical check down and a fallback in use: unavailable, naming each."""
        checker = ReadinessChecker(timeout_s=1.0)
        checker.add("opa", _probe(False), critical=True)
        checker.add("redis", _probe(OSError), critical=False)
        checker.add("audit", _probe(CheckState.DEGRADED), critical=True)
        report = await checker.check()
        assert report.readiness == "unavailable"
        assert (report.unavailable, report.degraded) == (("opa",), ("audit", "redis"))
