"""Egress end to end: a real gateway, the real OPA policy, and loopback destinations.

The only reachable servers are on loopback, so the destinations the gateway
may reach are ``internal = true`` and point at 127.0.0.1 test servers; the
SSRF tests use a scripted resolver whose answers are checked and refused
before any connection is made.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from gateway.apikeys import hash_secret
from gateway.app import METRICS, PIPELINE
from gateway.config import ConfigError, EgressConfig, RouteConfig
from gateway.context import RequestContext, Tenant
from gateway.egress_route import EgressSettings, parse_egress_target
from gateway.pipeline.route import Route
from gateway.policy.input import build_input
from gateway.policy.result import load_schema
from tests.audit_support import read_records
from tests.conftest import GatewayFactory, free_port
from tests.problems import assert_problem
from tests.secretscan import register_secret
from tests.test_egress_resolver import ScriptedResolver

SECRET = "s3cret-" + "e" * 40
register_secret(SECRET, "API key secret (egress)")
ACME = {"Authorization": f"ApiKey acme-egress.{SECRET}"}
GLOBEX = {"Authorization": f"ApiKey globex-egress.{SECRET}"}
NO_SCOPE = {"Authorization": f"ApiKey acme-plain.{SECRET}"}
API_KEYS = [
    {"id": "acme-egress", "tenant": "acme", "hash": hash_secret(SECRET), "scopes": ["egress:send"]},
    {
        "id": "globex-egress",
        "tenant": "globex",
        "hash": hash_secret(SECRET),
        "scopes": ["egress:send"],
    },
    {"id": "acme-plain", "tenant": "acme", "hash": hash_secret(SECRET)},
]
# The policy data's ceilings (policies/rego/nops/egress_destinations/data.json).
CEILINGS = {
    "public-search": "D0",
    "partner-wiki": "D1",
    "payments-api": "D2",
    "claims-processor": "D3",
}
CLASSES = ("D0", "D1", "D2", "D3", "D4")

EgressGateway = Callable[..., Awaitable[TestClient[Any, Any]]]


def _destinations(base_url: str, **overrides: dict[str, Any]) -> str:
    lines = ["version = 1"]
    for name, ceiling in CEILINGS.items():
        table: dict[str, Any] = {"base_url": base_url, "ceiling": ceiling, "internal": True}
        table.update(overrides.get(name, {}))
        lines.append(f'[destinations."{name}"]')
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in table.items())
    return "\n".join(lines) + "\n"


@pytest.fixture
async def make_egress(
    make_gateway: GatewayFactory, upstream: TestServer, tmp_path: Path
) -> EgressGateway:
    """Gateways with one egress route, /egress/, to the four policy destinations."""
    counter: list[int] = []

    async def factory(
        *,
        resolver: Any = None,
        destinations: dict[str, dict[str, Any]] | None = None,
        span_exporter: Any = None,
        metrics: dict[str, Any] | None = None,
        **egress: Any,
    ) -> TestClient[Any, Any]:
        base = str(upstream.make_url("")).rstrip("/")
        counter.append(1)
        path = tmp_path / f"egress-{len(counter)}.toml"
        path.write_text(_destinations(base, **(destinations or {})))
        route = {
            "name": "egress",
            "prefix": "/egress/",
            "kind": "egress",
            "auth": "api_key",
            "require_signature": False,
            "timeout_s": 2.0,
        }
        client = await make_gateway(
            routes=[route],
            api_keys=API_KEYS,
            ratelimit={"anonymous": "100000/minute"},
            egress={"destinations_file": str(path), "backoff_s": 0.0, **egress},
            audit={"path": str(tmp_path / "audit.jsonl"), "spool_path": str(tmp_path / "spool")},
            span_exporter=span_exporter,
            metrics=metrics or {},
        )
        if resolver is not None:
            stage = client.app[PIPELINE].stages[-1]
            assert isinstance(stage, Route)
            stage.egress["egress"].guard = type(stage.egress["egress"].guard)(resolver)
        return client

    return factory


def _expected(tenant_ceiling: str, label: str, destination: str) -> list[str]:
    if label == "D4":
        return ["d4_never_leaves"]
    reasons = []
    if label > CEILINGS[destination]:
        reasons.append("class_above_destination_ceiling")
    if label > tenant_ceiling:
        reasons.append("class_above_tenant_ceiling")
    return reasons


TABLE = [
    (tenant, label, destination)
    for tenant in ("acme", "globex")
    for label in CLASSES
    for destination in CEILINGS
]


class TestClassGate:
    @pytest.mark.parametrize(
        ("tenant", "label", "destination"), TABLE, ids=[f"{t}-{c}-{d}" for t, c, d in TABLE]
    )
    async def test_class_against_ceilings(
        self, make_egress: EgressGateway, tenant: str, label: str, destination: str
    ) -> None:
        """Each class against each destination ceiling (acme: D3, globex: D1 tenant ceiling)."""
        client = await make_egress()
        headers = {**(ACME if tenant == "acme" else GLOBEX), "X-Data-Class": label}
        response = await client.get(f"/egress/{destination}/v1/q?x=1", headers=headers)
        reasons = _expected("D3" if tenant == "acme" else "D1", label, destination)
        if reasons:
            await assert_problem(response, 403, "egress-denied", reasons=reasons)
        else:
            assert response.status == 200
            seen = await response.json()
            assert seen["path"] == "/v1/q"
            assert seen["query"] == {"x": ["1"]}

    async def test_denial_is_audited_with_its_reason(
        self, make_egress: EgressGateway, tmp_path: Path
    ) -> None:
        """A class-gate denial is one audit record with code egress-denied and the reason."""
        client = await make_egress()
        response = await client.get(
            "/egress/public-search/", headers={**ACME, "X-Data-Class": "D2"}
        )
        await assert_problem(response, 403, "egress-denied")
        [record] = [r for r in read_records(tmp_path / "audit.jsonl") if r.get("code")]
        assert record["outcome"] == "deny"
        assert record["code"] == "egress-denied"
        assert record["reasons"] == ["class_above_destination_ceiling"]

    @pytest.mark.parametrize(
        ("defaults", "destination", "status"),
        [
            ({}, "partner-wiki", 200),  # default_class D1 <= D1
            ({}, "public-search", 403),  # D1 > D0
            ({"default_class": "D0"}, "public-search", 200),
            ({"tenant_default_class": {"acme": "D3"}}, "payments-api", 403),
            ({"tenant_default_class": {"acme": "D4"}}, "partner-wiki", 403),
        ],
        ids=[
            "global-default-fits",
            "global-default-too-high",
            "global-d0",
            "tenant-d3",
            "tenant-d4",
        ],
    )
    async def test_absent_header_takes_the_default(
        self, make_egress: EgressGateway, defaults: dict[str, Any], destination: str, status: int
    ) -> None:
        """Without X-Data-Class the tenant's default class applies, else the global one."""
        client = await make_egress(**defaults)
        response = await client.get(f"/egress/{destination}/", headers=ACME)
        assert response.status == status

    @pytest.mark.parametrize("value", ["D5", "d1", "secret", ""])
    async def test_invalid_class_is_400(self, make_egress: EgressGateway, value: str) -> None:
        """An X-Data-Class that is not D0..D4 is a malformed request."""
        client = await make_egress()
        response = await client.get(
            "/egress/partner-wiki/", headers={**ACME, "X-Data-Class": value}
        )
        await assert_problem(response, 400, "malformed-request", reasons=["invalid_data_class"])

    async def test_unknown_destination(self, make_egress: EgressGateway) -> None:
        """A name the policy does not know is denied; no URL is ever taken from the caller."""
        client = await make_egress()
        response = await client.get("/egress/evil.example/", headers={**ACME, "X-Data-Class": "D0"})
        await assert_problem(response, 403, "egress-denied", reasons=["unknown_destination"])

    async def test_scope_is_required(self, make_egress: EgressGateway) -> None:
        """Without egress:send the route's policy denies before the class gate matters."""
        client = await make_egress()
        response = await client.get(
            "/egress/partner-wiki/", headers={**NO_SCOPE, "X-Data-Class": "D0"}
        )
        assert response.status == 403

    async def test_credentials_and_identity_do_not_leave(self, make_egress: EgressGateway) -> None:
        """The destination sees neither the caller's credential nor internal forwarding headers."""
        client = await make_egress()
        response = await client.get(
            "/egress/partner-wiki/",
            headers={**ACME, "X-Data-Class": "D1", "Cookie": "a=b", "X-Nops-Tenant": "x"},
        )
        assert response.status == 200
        seen = (await response.json())["headers"]
        for name in ("authorization", "cookie", "x-data-class", "x-forwarded-for", "x-request-id"):
            assert name not in seen
        assert not [name for name in seen if name.startswith("x-nops-")]


class TestReportMode:
    @pytest.mark.parametrize(
        "egress",
        [{"mode": "report"}, {"destinations": {"public-search": {"mode": "report"}}}],
        ids=["global", "per-destination"],
    )
    async def test_report_mode_allows_logs_and_audits(
        self,
        make_egress: EgressGateway,
        tmp_path: Path,
        egress: dict[str, Any],
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Report mode: a class-gate denial goes through, logged, counted and audited."""
        client = await make_egress(**egress)
        response = await client.get(
            "/egress/public-search/", headers={**ACME, "X-Data-Class": "D2"}
        )
        assert response.status == 200
        assert any(r.getMessage() == "enforce_would_deny" for r in caplog.records)
        metrics = client.app[METRICS]
        assert metrics.egress_would_deny["class_above_destination_ceiling"] == 1
        [record] = [r for r in read_records(tmp_path / "audit.jsonl") if r.get("code")]
        assert record["outcome"] == "allow"
        assert record["code"] == "enforce_would_deny"
        assert record["reasons"] == ["class_above_destination_ceiling"]

    async def test_d4_is_enforced_even_in_report_mode(self, make_egress: EgressGateway) -> None:
        """D4 never leaves, whatever the mode."""
        client = await make_egress(mode="report")
        response = await client.get(
            "/egress/claims-processor/", headers={**ACME, "X-Data-Class": "D4"}
        )
        await assert_problem(response, 403, "egress-denied", reasons=["d4_never_leaves"])

    async def test_ssrf_guard_is_enforced_in_report_mode(self, make_egress: EgressGateway) -> None:
        """Report mode is for the class gate only; a private address is still refused."""
        client = await make_egress(
            mode="report",
            destinations={
                "partner-wiki": {"base_url": "http://wiki.partner.example", "internal": False}
            },
            resolver=ScriptedResolver(["10.1.2.3"]),
        )
        response = await client.get("/egress/partner-wiki/", headers={**ACME, "X-Data-Class": "D1"})
        await assert_problem(response, 403, "egress-denied", reasons=["private_address"])


SSRF = [
    (["127.0.0.1"], ["loopback"]),
    (["203.0.113.7", "10.0.0.1"], ["private_address"]),
    (["169.254.169.254"], ["metadata_address", "link_local"]),
    (["100.64.1.1"], ["cgnat"]),
    (["::1"], ["loopback"]),
    (["::ffff:127.0.0.1"], ["ipv4_mapped", "loopback"]),
    (["64:ff9b::7f00:1"], ["nat64", "loopback"]),
    (["2002:a00:1::"], ["6to4", "private_address"]),
    (["2001:0:4136:e378:8000:63bf:80ff:fffe"], ["teredo", "loopback"]),
    (["fd00::1"], ["unique_local"]),
    (["224.0.0.1"], ["multicast"]),
    (["0.0.0.0"], ["unspecified"]),
    ([], ["dns_failure"]),
]


class TestSsrfGuard:
    @pytest.mark.parametrize(
        ("answers", "reasons"),
        SSRF,
        ids=[r[0] if r[0] else "none" for r in (a for _, a in SSRF)]
        if False
        else [",".join(a) or "no-answer" for a, _ in SSRF],
    )
    async def test_resolved_addresses_are_refused(
        self, make_egress: EgressGateway, answers: list[str], reasons: list[str], tmp_path: Path
    ) -> None:
        """A destination resolving to a forbidden address is refused before dialling; audited."""
        resolver = ScriptedResolver(answers)
        client = await make_egress(
            destinations={
                "partner-wiki": {"base_url": "https://wiki.partner.example", "internal": False}
            },
            resolver=resolver,
        )
        response = await client.get("/egress/partner-wiki/", headers={**ACME, "X-Data-Class": "D1"})
        await assert_problem(response, 403, "egress-denied", reasons=reasons)
        assert resolver.calls == ["wiki.partner.example"]
        [record] = [r for r in read_records(tmp_path / "audit.jsonl") if r.get("code")]
        assert (record["code"], record["reasons"]) == ("egress-denied", reasons)

    @pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "[::ffff:7f00:1]"])
    async def test_address_literal_base_urls_are_refused(
        self, make_egress: EgressGateway, upstream: TestServer, host: str
    ) -> None:
        """A non-internal destination written as a loopback address is refused at request time."""
        client = await make_egress(
            destinations={
                "partner-wiki": {"base_url": f"http://{host}:{upstream.port}", "internal": False}
            }
        )
        response = await client.get("/egress/partner-wiki/", headers={**ACME, "X-Data-Class": "D1"})
        body = await assert_problem(response, 403, "egress-denied")
        assert "loopback" in body["reasons"]

    @pytest.mark.parametrize("host", ["127.1", "0x7f.0.0.1", "2130706433", "0177.0.0.1"])
    async def test_non_canonical_addresses_are_refused_by_config(
        self, make_egress: EgressGateway, host: str
    ) -> None:
        """An address spelled non-canonically in base_url is a config error naming the key."""
        with pytest.raises(ConfigError, match="canonically") as caught:
            await make_egress(destinations={"partner-wiki": {"base_url": f"http://{host}:8080"}})
        assert caught.value.key == "egress.destinations.partner-wiki.base_url"


@pytest.fixture
async def trap() -> AsyncIterator[tuple[TestServer, list[str]]]:
    """A loopback server that records every request it gets (it must get none)."""
    hits: list[str] = []

    async def record(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(text="trapped")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server, hits
    await server.close()


class TestConnect:
    async def test_rebinding_answer_is_never_dialled(
        self, make_egress: EgressGateway, upstream: TestServer
    ) -> None:
        """Checked 127.0.0.1 (the upstream) is dialled; a later answer is never asked for."""
        resolver = ScriptedResolver(["127.0.0.1"], ["127.0.0.2"])
        client = await make_egress(
            destinations={"partner-wiki": {"base_url": f"http://rebind.test:{upstream.port}"}},
            resolver=resolver,
        )
        response = await client.get(
            "/egress/partner-wiki/a", headers={**ACME, "X-Data-Class": "D1"}
        )
        assert response.status == 200
        seen = await response.json()
        assert seen["headers"]["host"] == f"rebind.test:{upstream.port}"
        assert resolver.calls == ["rebind.test"]

    async def test_redirect_is_relayed_not_followed(
        self, make_egress: EgressGateway, trap: tuple[TestServer, list[str]], tmp_path: Path
    ) -> None:
        """A 3xx to a private address reaches the caller as it is; the gateway never follows it."""
        server, hits = trap
        location = f"http://127.0.0.1:{server.port}/internal"

        async def redirect(request: web.Request) -> web.Response:
            raise web.HTTPFound(location)

        app = web.Application()
        app.router.add_get("/{tail:.*}", redirect)
        redirector = TestServer(app, host="127.0.0.1")
        await redirector.start_server()
        try:
            client = await make_egress(
                destinations={
                    "partner-wiki": {"base_url": str(redirector.make_url("")).rstrip("/")}
                }
            )
            response = await client.get(
                "/egress/partner-wiki/go",
                headers={**ACME, "X-Data-Class": "D1"},
                allow_redirects=False,
            )
            assert response.status == 302
            assert response.headers["Location"] == location
            assert hits == []
        finally:
            await redirector.close()

    async def test_response_size_cap(self, make_egress: EgressGateway) -> None:
        """A response larger than max_response_bytes is 502 response_too_large."""
        client = await make_egress(max_response_bytes=64)
        response = await client.get("/egress/partner-wiki/", headers={**ACME, "X-Data-Class": "D1"})
        await assert_problem(response, 502, "upstream-unavailable", reasons=["response_too_large"])

    async def test_method_and_path_rules(self, make_egress: EgressGateway) -> None:
        """A destination's methods and path prefixes bound what may be sent to it."""
        client = await make_egress(
            destinations={"partner-wiki": {"methods": ["GET"], "path_prefixes": ["/v1/"]}}
        )
        ok = await client.get("/egress/partner-wiki/v1/x", headers={**ACME, "X-Data-Class": "D1"})
        assert ok.status == 200
        path = await client.get("/egress/partner-wiki/v2/x", headers={**ACME, "X-Data-Class": "D1"})
        await assert_problem(path, 403, "egress-denied", reasons=["path_not_allowed"])
        method = await client.post(
            "/egress/partner-wiki/v1/x", headers={**ACME, "X-Data-Class": "D1"}
        )
        await assert_problem(method, 403, "egress-denied", reasons=["method_not_allowed"])

    async def test_unreachable_destination_opens_its_circuit(
        self, make_egress: EgressGateway
    ) -> None:
        """Connect failures are 502 and count against the destination's circuit breaker."""
        client = await make_egress(
            destinations={"partner-wiki": {"base_url": f"http://127.0.0.1:{free_port()}"}},
            circuit_failures=2,
            retries=0,
        )
        headers = {**ACME, "X-Data-Class": "D1"}
        for _ in range(2):
            response = await client.get("/egress/partner-wiki/", headers=headers)
            await assert_problem(response, 502, "upstream-unavailable")
        response = await client.get("/egress/partner-wiki/", headers=headers)
        await assert_problem(response, 503, "circuit-open", reasons=["circuit_open"])
        assert int(response.headers["Retry-After"]) >= 1


class TestPolicyInput:
    @pytest.mark.parametrize(
        ("declared", "tenant", "expected"),
        [("D3", "acme", "D3"), (None, "acme", "D2"), (None, "globex", "D1"), (None, None, "D1")],
        ids=["declared", "tenant-default", "global-default", "no-tenant"],
    )
    def test_egress_input_matches_the_schema(
        self, declared: str | None, tenant: str | None, expected: str
    ) -> None:
        """The egress input names the destination and the class, and validates as v1."""
        headers = {"X-Data-Class": declared} if declared else {}
        request = make_mocked_request("GET", "/egress/payments-api/v1/x", headers=headers)
        route = RouteConfig(name="egress", prefix="/egress/", kind="egress")
        settings = EgressSettings(EgressConfig(tenant_default_class={"acme": "D2"}), {})
        ctx = RequestContext(request=request, request_id="r", client_ip="203.0.113.7")
        ctx.route = route
        ctx.tenant = Tenant(tenant) if tenant else None
        ctx.egress_target = parse_egress_target(route, request, settings)
        document = build_input(ctx)
        jsonschema.validate(document, load_schema("policy-input.v1.json"))
        assert document["target"] == {
            "kind": "egress",
            "destination": "payments-api",
            "classification": expected,
        }
        assert ctx.egress_target.path == "/v1/x"


class TestTraceContext:
    async def test_destination_gets_the_gateways_traceparent(
        self, make_egress: EgressGateway
    ) -> None:
        """With tracing on, the egress call is a span and the destination sees its context."""
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        spans = InMemorySpanExporter()
        client = await make_egress(span_exporter=spans)
        trace = "0af7651916cd43dd8448eb211c80319c"
        response = await client.get(
            "/egress/partner-wiki/",
            headers={
                **ACME,
                "X-Data-Class": "D1",
                "traceparent": f"00-{trace}-b7ad6b7169203331-01",
            },
        )
        assert response.status == 200
        sent = (await response.json())["headers"]["traceparent"]
        [upstream] = [s for s in spans.get_finished_spans() if s.name == "upstream egress"]
        assert sent == f"00-{trace}-{upstream.context.span_id:016x}-01"


class TestMetrics:
    async def test_circuits_and_upstream_time_by_route(self, make_egress: EgressGateway) -> None:
        """Egress circuits are counted by route and state; upstream time by route."""
        from tests.promscrape import scrape, value

        client = await make_egress(metrics={"enabled": True, "port": 0})
        for destination in ("partner-wiki", "public-search"):
            response = await client.get(
                f"/egress/{destination}/", headers={**ACME, "X-Data-Class": "D0"}
            )
            assert response.status == 200
        samples = await scrape(client)
        circuits = "nops_gateway_circuit_state"
        assert value(samples, circuits, route="egress", state="closed") == 2
        assert value(samples, circuits, route="egress", state="open") == 0
        upstream = "nops_gateway_upstream_duration_seconds_count"
        assert value(samples, upstream, route="egress") == 2
