"""End to end: every pipeline outcome leaves exactly one record or an exact count."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.typedefs import Handler

from audit.verify import verify_file, verify_postgres
from gateway.auditing import audit_settings
from gateway.config import ConfigError, parse_config
from gateway.echo import create_echo_app
from tests.audit_support import read_records, trusted_keys
from tests.conftest import GatewayFactory, free_port
from tests.jwtissuer import AUDIENCE, FakeIssuer
from tests.problems import assert_problem
from tests.services import PostgresService

Client = TestClient[Any, Any]
HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class Upstream:
    """An echo upstream that notes each request and whether its record was on disk."""

    server: TestServer
    audit_path: Path
    seen: list[tuple[str, bool]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    def routes(self) -> list[dict[str, Any]]:
        """echo and readonly anonymous; locked needs a signature and a JWT."""
        anonymous = {"auth": "none", "require_signature": False, "timeout_s": 2.0}
        return [
            *(
                {"name": name, "prefix": f"/{name}/", "upstream": self.url, **anonymous}
                for name in ("echo", "readonly")
            ),
            {"name": "locked", "prefix": "/locked/", "upstream": self.url},
        ]


@pytest.fixture
async def upstream_seen(tmp_path: Path) -> AsyncIterator[Upstream]:
    app = create_echo_app()
    audit_path = tmp_path / "audit.jsonl"
    upstream: Upstream

    @web.middleware
    async def note(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = request.headers.get("X-Request-Id", "")
        recorded = audit_path.exists() and request_id.encode() in audit_path.read_bytes()
        upstream.seen.append((request.path, recorded))
        return await handler(request)

    app.middlewares.append(note)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    upstream = Upstream(server, audit_path)
    yield upstream
    await server.close()


async def _gateway(make_gateway: GatewayFactory, upstream: Upstream, **sections: Any) -> Client:
    audit = {
        "path": str(upstream.audit_path),
        "spool_path": str(upstream.audit_path.with_name("spool.jsonl")),
        "chain_id": "e2e",
        **sections.pop("audit", {}),
    }
    return await make_gateway(audit=audit, routes=upstream.routes(), **sections)


async def _jwt_gateway(
    make_gateway: GatewayFactory, upstream: Upstream, issuer: FakeIssuer
) -> Client:
    """Requests signed as tenant acme; locked takes the fake issuer's JWTs."""
    trusted = {"issuer": issuer.issuer, "audiences": [AUDIENCE], "jwks_url": issuer.jwks_url}
    return await _gateway(
        make_gateway, upstream, sign_as="acme-k1", identity={"issuers": [trusted]}
    )


async def _records_after_close(client: Client, upstream: Upstream) -> list[dict[str, Any]]:
    await client.close()  # shutdown writes the summaries and a final checkpoint
    report = verify_file(upstream.audit_path, keys=trusted_keys(upstream.audit_path.parent))
    assert report.intact, report.damage
    return read_records(upstream.audit_path)


class TestAllowed:
    async def test_allow_is_durable_before_the_upstream_sees_the_request(
        self, make_gateway: GatewayFactory, upstream_seen: Upstream
    ) -> None:
        """One allow record, already on disk when the request reaches the upstream."""
        client = await _gateway(make_gateway, upstream_seen)
        response = await client.get("/echo/x?q=1")
        assert response.status == 200
        request_id = response.headers["X-Request-Id"]
        (record,) = await _records_after_close(client, upstream_seen)
        assert upstream_seen.seen == [("/echo/x", True)]
        assert record["outcome"] == "allow"
        assert record["stage"] == "audit"
        assert record["request_id"] == request_id
        assert len(record["decision_id"]) == 36
        assert HEX64.fullmatch(record["input_digest"])
        assert (record["status"], record["code"]) == (None, None)

    async def test_signed_and_authenticated_request_names_tenant_and_subject(
        self, make_gateway: GatewayFactory, upstream_seen: Upstream, jwt_issuer: FakeIssuer
    ) -> None:
        """A signed request with a JWT: the record names the tenant and the sub, no token."""
        client = await _jwt_gateway(make_gateway, upstream_seen, jwt_issuer)
        token = jwt_issuer.token(scope="locked:read")
        response = await client.get("/locked/x", headers={"Authorization": f"Bearer {token}"})
        assert response.status == 200
        await client.close()
        raw = upstream_seen.audit_path.read_bytes()
        (record,) = read_records(upstream_seen.audit_path)
        assert (record["outcome"], record["tenant"], record["subject"]) == (
            "allow",
            "acme",
            "svc-42",
        )
        # SECURITY: neither the token nor the request signature is in the log.
        assert token.split(".")[2].encode() not in raw
        assert b"sig1=" not in raw

    async def test_an_upstream_error_answer_is_not_a_second_record(
        self, make_gateway: GatewayFactory, upstream_seen: Upstream
    ) -> None:
        """An upstream's own 404 is its answer: the request has its allow record only."""
        client = await _gateway(make_gateway, upstream_seen)
        assert (await client.get("/echo/status/404")).status == 404
        records = await _records_after_close(client, upstream_seen)
        assert [r["outcome"] for r in records] == ["allow"]


class TestDenied:
    @pytest.mark.parametrize(
        ("method", "path", "scope", "reasons"),
        [
            pytest.param("GET", "/locked/x", "other", ["missing_scope"], id="authenticated"),
            pytest.param("DELETE", "/readonly/x", None, ["method_not_allowed"], id="anonymous"),
        ],
    )
    async def test_policy_denial_is_one_record(
        self,
        make_gateway: GatewayFactory,
        upstream_seen: Upstream,
        jwt_issuer: FakeIssuer,
        method: str,
        path: str,
        scope: str | None,
        reasons: list[str],
    ) -> None:
        """A policy denial: one deny record with the decision id and the reasons."""
        client = await _jwt_gateway(make_gateway, upstream_seen, jwt_issuer)
        headers = {"Authorization": f"Bearer {jwt_issuer.token(scope=scope)}"} if scope else {}
        response = await client.request(method, path, headers=headers)
        body = await assert_problem(response, 403, "policy-denied", reasons)
        (record,) = await _records_after_close(client, upstream_seen)
        assert record["outcome"] == "deny"
        assert (record["stage"], record["status"], record["code"]) == (
            "decision",
            403,
            "policy-denied",
        )
        assert record["reasons"] == reasons
        assert record["decision_id"] == body["decision_id"]
        assert record["request_id"] == body["request_id"]
        assert HEX64.fullmatch(record["input_digest"])
        assert upstream_seen.seen == []

    async def test_policy_unavailable_is_one_error_record(
        self, make_gateway: GatewayFactory, upstream_seen: Upstream
    ) -> None:
        """OPA unreachable: 503, one error record naming the decision attempt."""
        client = await _gateway(
            make_gateway, upstream_seen, policy={"url": f"http://127.0.0.1:{free_port()}"}
        )
        body = await assert_problem(await client.get("/echo/x"), 503, "policy-unavailable")
        (record,) = await _records_after_close(client, upstream_seen)
        assert (record["outcome"], record["code"], record["stage"]) == (
            "error",
            "policy-unavailable",
            "decision",
        )
        assert record["decision_id"] == body["decision_id"]

    async def test_upstream_failure_follows_its_allow(
        self, make_gateway: GatewayFactory, upstream_seen: Upstream
    ) -> None:
        """Forwarded then failed upstream: the allow record, then an error record."""
        client = await _gateway(make_gateway, upstream_seen)
        await assert_problem(await client.get("/echo/slow/5"), 504, "upstream-timeout")
        records = await _records_after_close(client, upstream_seen)
        assert [(r["outcome"], r["stage"], r["code"]) for r in records] == [
            ("allow", "audit", None),
            ("error", "route", "upstream-timeout"),
        ]
        assert records[0]["request_id"] == records[1]["request_id"]

    @pytest.mark.parametrize(
        ("method", "path", "status", "code"),
        [
            pytest.param("GET", "/nowhere", 404, "no-route", id="no-route"),
            pytest.param("GET", "/echo/a%2Fb", 400, "malformed-request", id="malformed"),
            pytest.param("PROPFIND", "/echo/x", 405, "method-not-allowed", id="method"),
            pytest.param("GET", "/locked/x", 401, "missing-signature", id="unsigned"),
        ],
    )
    async def test_anonymous_rejections_are_counted_not_recorded(
        self,
        make_gateway: GatewayFactory,
        upstream_seen: Upstream,
        method: str,
        path: str,
        status: int,
        code: str,
    ) -> None:
        """Rejections anyone can cause become a count in the window's summary record."""
        client = await _gateway(make_gateway, upstream_seen)
        await assert_problem(await client.request(method, path), status, code)
        (record,) = await _records_after_close(client, upstream_seen)
        assert record["outcome"] == "summary"
        assert record["counts"] == {f"ip:127.0.0.1|{code}": 1}


class TestFlood:
    async def test_500_bad_requests_are_one_summary_with_count_500(
        self, make_gateway: GatewayFactory, upstream_seen: Upstream
    ) -> None:
        """A flood becomes one record with an exact count; real decisions stay individual."""
        client = await _gateway(make_gateway, upstream_seen)
        responses = await asyncio.gather(*(client.get(f"/nowhere/{n}") for n in range(500)))
        assert {r.status for r in responses} == {404}
        assert (await client.get("/echo/x")).status == 200
        records = await _records_after_close(client, upstream_seen)
        summaries = [r for r in records if r["outcome"] == "summary"]
        assert len(summaries) == 1
        assert summaries[0]["counts"] == {"ip:127.0.0.1|no-route": 500}
        assert [r["outcome"] for r in records if r["outcome"] != "summary"] == ["allow"]

    async def test_every_request_is_accounted_for(
        self, make_gateway: GatewayFactory, upstream_seen: Upstream
    ) -> None:
        """A mixed load: records plus summary counts equal the requests sent."""
        client = await _gateway(make_gateway, upstream_seen)
        paths = ["/echo/a", "/readonly/b", "/locked/c", "/nowhere", "/echo/a%2Fb"] * 20
        await asyncio.gather(*(client.get(path) for path in paths))
        records = await _records_after_close(client, upstream_seen)
        individual = [r for r in records if r["outcome"] != "summary"]
        counted = sum(n for r in records if r["outcome"] == "summary" for n in r["counts"].values())
        assert len(individual) + counted == len(paths)
        assert len({r["request_id"] for r in individual}) == len(individual)


class TestUnrecordable:
    async def test_no_store_and_no_spool_means_503_and_nothing_forwarded(
        self,
        make_gateway: GatewayFactory,
        upstream_seen: Upstream,
        postgres_server: PostgresService,
        tmp_path: Path,
    ) -> None:
        """PostgreSQL down and the spool unwritable: 503 audit-unavailable, upstream untouched."""
        blocker = tmp_path / "not-a-directory"
        blocker.write_text("the spool cannot be created below a regular file")
        chain = f"e2e-{uuid.uuid4().hex[:8]}"
        client = await _gateway(
            make_gateway,
            upstream_seen,
            audit={
                "store": "postgres",
                "dsn": postgres_server.dsn,
                "chain_id": chain,
                "spool_path": str(blocker / "spool.jsonl"),
            },
        )
        assert (await client.get("/echo/before")).status == 200
        await asyncio.to_thread(postgres_server.stop)
        try:
            await assert_problem(await client.get("/echo/x"), 503, "audit-unavailable")
            await assert_problem(await client.delete("/readonly/x"), 503, "audit-unavailable")
            ready = await (await client.get("/_readyz")).json(content_type=None)
            assert ready["checks"]["audit"] == "unhealthy"
            assert upstream_seen.seen == [("/echo/before", False)]
        finally:
            await asyncio.to_thread(postgres_server.start)
        assert (await client.get("/echo/after")).status == 200
        assert (await (await client.get("/_readyz")).json())["checks"]["audit"] == "ok"
        await client.close()
        assert [path for path, _ in upstream_seen.seen] == ["/echo/before", "/echo/after"]
        report = await verify_postgres(
            postgres_server.dsn, chain, keys=trusted_keys(upstream_seen.audit_path.parent)
        )
        assert report.intact, report.damage
        assert report.last_seq == 2

    async def test_readiness_recovers_without_traffic(
        self,
        make_gateway: GatewayFactory,
        upstream_seen: Upstream,
        postgres_server: PostgresService,
        tmp_path: Path,
    ) -> None:
        """Unavailable after a failed batch; once the store answers, ready with no request sent.

        A node out of the load balancer gets no traffic: readiness must not wait
        for a batch to succeed to report that one could.
        """
        blocker = tmp_path / "not-a-directory"
        blocker.write_text("no spool below a regular file")
        client = await _gateway(
            make_gateway,
            upstream_seen,
            audit={
                "store": "postgres",
                "dsn": postgres_server.dsn,
                "chain_id": f"e2e-{uuid.uuid4().hex[:8]}",
                "spool_path": str(blocker / "spool.jsonl"),
            },
            dependencies={"probe_timeout_s": 2.0},
        )
        await asyncio.to_thread(postgres_server.stop)
        try:
            await assert_problem(await client.get("/echo/x"), 503, "audit-unavailable")
            down = await client.get("/_readyz")
            body = await assert_problem(down, 503, "dependency-unavailable")
            assert (body["readiness"], body["unavailable"]) == ("unavailable", ["audit"])
        finally:
            await asyncio.to_thread(postgres_server.start)
        ready = await client.get("/_readyz")
        assert ready.status == 200
        assert (await ready.json())["checks"]["audit"] == "ok"
        assert upstream_seen.seen == []


class TestConfig:
    @pytest.mark.parametrize(
        ("audit", "dependencies", "key", "message"),
        [
            pytest.param({"chain_id": "bad id!"}, {}, "audit.chain_id", "letters", id="chain-id"),
            pytest.param({"batch_max": 0}, {}, "audit.batch_max", "between", id="batch-max"),
            pytest.param({"store": "s3"}, {}, "audit.store", "one of", id="store"),
            pytest.param(
                {"store": "postgres"}, {}, "audit.dsn", "needs audit.dsn", id="postgres-no-dsn"
            ),
            pytest.param({"dsn": "mysql://x/y"}, {}, "audit.dsn", "postgresql://", id="dsn-scheme"),
            pytest.param(
                {"checkpoint_every": -1}, {}, "audit.checkpoint_every", "> 0", id="checkpoints"
            ),
            pytest.param({"summary_window_s": 0}, {}, "audit.summary_window_s", "> 0", id="window"),
        ],
    )
    def test_bad_audit_config_names_the_key(
        self, audit: dict[str, Any], dependencies: dict[str, Any], key: str, message: str
    ) -> None:
        """check-config names the bad audit key."""
        with pytest.raises(ConfigError) as caught:
            parse_config({"version": 1, "audit": audit, "dependencies": dependencies})
        assert caught.value.key == key
        assert message in caught.value.message

    def test_postgres_store_takes_the_shared_dsn(self) -> None:
        """store = "postgres" without audit.dsn uses dependencies.postgres_dsn."""
        config = parse_config(
            {
                "version": 1,
                "audit": {"store": "postgres"},
                "dependencies": {"postgres_dsn": "postgresql://u@db/x"},
            }
        )
        assert audit_settings(config).dsn == "postgresql://u@db/x"

    async def test_disabled_audit_records_nothing(
        self, make_gateway: GatewayFactory, upstream_seen: Upstream
    ) -> None:
        """audit.enabled = false: requests flow and no log is created."""
        client = await _gateway(make_gateway, upstream_seen, audit={"enabled": False})
        assert (await client.get("/echo/x")).status == 200
        await client.close()
        assert not upstream_seen.audit_path.exists()

    async def test_log_line_carries_the_audit_seq(
        self,
        make_gateway: GatewayFactory,
        upstream_seen: Upstream,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """The canonical request log line names the record's seq (audit_seq)."""
        client = await _gateway(make_gateway, upstream_seen)
        with caplog.at_level(logging.INFO, logger="gateway.request"):
            await client.get("/echo/x")
            await client.delete("/readonly/x")
        seqs = [
            getattr(r, "audit_seq", None) for r in caplog.records if r.name == "gateway.request"
        ]
        assert seqs == [1, 2]
