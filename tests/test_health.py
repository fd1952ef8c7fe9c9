"""Liveness and readiness against real OPA, Redis and PostgreSQL."""

from __future__ import annotations

import pytest

from gateway.problem import PROBLEM_CONTENT_TYPE, problem_type
from tests.conftest import GatewayFactory, OpaProcess, free_port
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
        """All configured dependencies answer: 200 with each check ok."""
        client = await make_gateway(
            dependencies={"redis_url": redis_server.url, "postgres_dsn": postgres_server.dsn}
        )
        response = await client.get("/_readyz")
        assert response.status == 200
        assert await response.json() == {
            "status": "ready",
            "checks": {"opa": "ok", "redis": "ok", "postgres": "ok", "audit": "ok"},
        }

    @pytest.mark.parametrize("down", ["redis", "postgres", "opa"])
    async def test_unready_names_the_dependency(
        self,
        make_gateway: GatewayFactory,
        redis_server: RedisService,
        postgres_server: PostgresService,
        down: str,
    ) -> None:
        """One dependency down: 503 problem naming it, the others still ok; back up: 200."""
        from tests.conftest import POLICY_DIR

        own_opa = OpaProcess(POLICY_DIR)
        own_opa.start()
        services = {"redis": redis_server, "postgres": postgres_server, "opa": own_opa}
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
            assert response.status == 503
            body = await response.json(content_type=PROBLEM_CONTENT_TYPE)
            assert body["type"] == problem_type("dependency-unavailable")
            assert body["unavailable"] == [down]
            assert down in body["detail"]
            ok = {k for k, v in body["checks"].items() if v == "ok"}
            assert ok == (set(services) | {"audit"}) - {down}
            services[down].start()
            assert (await client.get("/_readyz")).status == 200
        finally:
            own_opa.stop()
            redis_server.start()
            postgres_server.start()
