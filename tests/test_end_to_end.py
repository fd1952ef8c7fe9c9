"""End to end: a real gateway, a real OPA and a real aiohttp upstream."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.middleware import SECURITY_HEADERS
from gateway.problem import PROBLEM_CONTENT_TYPE, problem_type
from tests.conftest import GatewayFactory, OpaProcess, free_port
from tests.problems import assert_problem
from tests.rawhttp import raw_request

Client = TestClient[Any, Any]


def _open_echo_route(server: TestServer) -> dict[str, Any]:
    """An unauthenticated ``/echo/`` route to ``server`` (a test's own upstream)."""
    return {
        "name": "echo",
        "prefix": "/echo/",
        "upstream": str(server.make_url("")).rstrip("/"),
        "auth": "none",
        "require_signature": False,
    }


class TestAllowedRequests:
    async def test_get_is_proxied_with_forwarding_headers(self, gateway: Client) -> None:
        """An allowed GET reaches the upstream with path, query and X-Forwarded-* intact."""
        response = await gateway.get("/echo/hello/world?a=1&a=2&b=x%20y")
        assert response.status == 200
        echoed = await response.json()
        assert echoed["method"] == "GET"
        assert echoed["raw_path"] == "/echo/hello/world?a=1&a=2&b=x%20y"
        assert echoed["query"] == {"a": ["1", "2"], "b": ["x y"]}
        assert echoed["headers"]["x-forwarded-for"] == "127.0.0.1"
        assert echoed["headers"]["x-forwarded-proto"] == "http"
        assert echoed["headers"]["x-request-id"] == response.headers["X-Request-Id"]

    async def test_post_body_is_streamed_unchanged(self, gateway: Client) -> None:
        """A request body arrives upstream byte for byte."""
        body = bytes(range(256)) * 1000
        response = await gateway.post("/echo/upload", data=body)
        assert response.status == 200
        echoed = await response.json()
        assert echoed["body_bytes"] == len(body)
        import hashlib

        assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()

    async def test_streamed_response_is_relayed(self, gateway: Client) -> None:
        """A chunked upstream response arrives whole."""
        response = await gateway.get("/echo/stream/500")
        assert response.status == 200
        text = await response.text()
        assert text.splitlines() == [f"line {i}" for i in range(500)]

    @pytest.mark.parametrize("length", [None, 10], ids=["chunked", "content-length"])
    async def test_answer_streams_before_the_upstream_finishes(
        self, make_gateway: GatewayFactory, length: int | None
    ) -> None:
        """Status, headers and the first bytes reach the caller while the upstream
        still holds the rest: the gateway relays, it does not buffer the answer."""
        release = asyncio.Event()

        async def slow(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"X-Upstream": "yes"})
            if length is not None:
                response.content_length = length
            await response.prepare(request)
            await response.write(b"first")
            await release.wait()  # set by the test once "first" came through
            await response.write(b"-last")
            await response.write_eof()
            return response

        app = web.Application()
        app.router.add_get("/echo/slow", slow)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            gateway = await make_gateway(routes=[_open_echo_route(server)])
            response = await asyncio.wait_for(gateway.get("/echo/slow"), timeout=10)
            assert response.status == 200
            assert response.headers["X-Upstream"] == "yes"
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            first = await asyncio.wait_for(response.content.readexactly(5), timeout=10)
            assert first == b"first"
            assert not release.is_set()
            release.set()
            assert await response.read() == b"-last"
        finally:
            release.set()
            await server.close()

    async def test_upstream_status_is_passed_through(self, gateway: Client) -> None:
        """An upstream 404 is the upstream's answer, not a gateway problem."""
        response = await gateway.get("/echo/status/404")
        assert response.status == 404
        assert response.content_type == "application/json"

    async def test_hop_by_hop_headers_are_stripped(self, gateway: Client) -> None:
        """Connection-named and hop-by-hop headers never reach the upstream."""
        response = await gateway.get(
            "/echo/h",
            headers={
                "Connection": "keep-alive, X-Hop-Secret",
                "X-Hop-Secret": "1",
                "Keep-Alive": "timeout=5",
                "Proxy-Authorization": "Basic Zm9vOmJhcg==",
                "X-Forwarded-For": "10.9.9.9",
                "X-Kept": "yes",
            },
        )
        headers = (await response.json())["headers"]
        assert "x-hop-secret" not in headers
        assert "keep-alive" not in headers
        assert "proxy-authorization" not in headers
        assert headers["x-kept"] == "yes"
        # SECURITY: a client-supplied X-Forwarded-For from an untrusted peer is replaced.
        assert headers["x-forwarded-for"] == "127.0.0.1"

    async def test_upstream_redirect_is_relayed_not_followed(
        self, make_gateway: GatewayFactory
    ) -> None:
        """An upstream's 302 reaches the caller as it is; the gateway never follows it."""
        followed: list[str] = []

        async def redirect(request: web.Request) -> web.Response:
            raise web.HTTPFound(str(request.url.with_path("/internal")))

        async def target(request: web.Request) -> web.Response:
            followed.append(request.path)
            return web.Response(text="followed")

        app = web.Application()
        app.router.add_get("/echo/go", redirect)
        app.router.add_get("/internal", target)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            gateway = await make_gateway(routes=[_open_echo_route(server)])
            response = await gateway.get("/echo/go", allow_redirects=False)
            assert response.status == 302
            assert response.headers["Location"] == str(server.make_url("/internal"))
            assert followed == []
        finally:
            await server.close()

    async def test_upstream_cookies_are_not_shared_between_clients(
        self, make_gateway: GatewayFactory, upstream: TestServer
    ) -> None:
        """A Set-Cookie reaches its caller but is never replayed on anyone's next request."""
        # A host name, not an IP: cookie jars ignore cookies from IP addresses.
        by_name = f"http://localhost:{upstream.port}"
        gateway = await make_gateway(
            routes=[
                {
                    "name": "echo",
                    "prefix": "/echo/",
                    "upstream": by_name,
                    "auth": "none",
                    "require_signature": False,
                }
            ]
        )
        first = await gateway.get("/echo/set-cookie")
        assert "upstream-session=s1" in first.headers["Set-Cookie"]
        gateway.session.cookie_jar.clear()
        second = await gateway.get("/echo/x")
        assert "cookie" not in (await second.json())["headers"]


class TestDenials:
    @pytest.mark.parametrize(
        ("method", "path", "reasons"),
        [
            pytest.param("DELETE", "/readonly/x", ["method_not_allowed"], id="method-not-allowed"),
        ],
    )
    async def test_policy_denies_with_reasons(
        self, gateway: Client, method: str, path: str, reasons: list[str]
    ) -> None:
        """OPA's deny reaches the client as 403 policy-denied with its reasons."""
        response = await gateway.request(method, path)
        body = await assert_problem(response, 403, "policy-denied", reasons)
        assert len(body["decision_id"]) == 36

    async def test_unsigned_request_to_signed_route_is_401(self, gateway: Client) -> None:
        """A route that requires a signature refuses an unsigned request before the policy."""
        response = await gateway.get("/locked/x")
        body = await assert_problem(response, 401, "missing-signature", ["signature_missing"])
        assert "decision_id" not in body
        assert "Accept-Signature" in response.headers

    @pytest.mark.parametrize(
        ("decision_path", "reason"),
        [
            pytest.param("test/broken/missing", "decision_undefined", id="undefined"),
            pytest.param("test/broken/illtyped", "decision_ill_typed", id="ill-typed"),
            pytest.param("test/broken/noreason", "decision_ill_typed", id="allow-without-reason"),
        ],
    )
    async def test_unusable_decision_denies(
        self, make_gateway: GatewayFactory, decision_path: str, reason: str
    ) -> None:
        """An undefined or ill-typed policy answer is a deny, never an allow."""
        client = await make_gateway(policy={"decision_path": decision_path})
        response = await client.get("/echo/x")
        await assert_problem(response, 403, "policy-denied", [reason])

    @pytest.mark.parametrize(
        ("request_kwargs", "status", "code"),
        [
            pytest.param({"path": "/nowhere"}, 404, "no-route", id="no-route"),
            pytest.param({"path": "/echo/a%2Fb"}, 400, "malformed-request", id="encoded-slash"),
            pytest.param({"path": "/echo/a%5cb"}, 400, "malformed-request", id="encoded-backslash"),
            pytest.param({"path": "/echo/a%252e"}, 400, "malformed-request", id="double-encoded"),
            pytest.param({"path": "/echo//x"}, 400, "malformed-request", id="empty-segment"),
            pytest.param(
                {"path": "/echo/x", "headers": {f"X-H{i}": "v" for i in range(120)}},
                400,
                "malformed-request",
                id="too-many-headers",
            ),
            pytest.param(
                {"path": "/echo/x", "method": "PROPFIND"}, 405, "method-not-allowed", id="method"
            ),
            pytest.param(
                {"path": "/echo/x", "method": "POST", "data": b"x" * 2048},
                413,
                "payload-too-large",
                id="content-length-over-cap",
            ),
        ],
    )
    async def test_bad_requests_get_a_problem(
        self,
        make_gateway: GatewayFactory,
        request_kwargs: dict[str, Any],
        status: int,
        code: str,
    ) -> None:
        """Malformed, oversized or unroutable requests end at intake with a typed problem."""
        client = await make_gateway(server={"max_body_bytes": 1024})
        kwargs = dict(request_kwargs)
        method = kwargs.pop("method", "GET")
        path = kwargs.pop("path")
        response = await client.request(method, path, **kwargs)
        await assert_problem(response, status, code)

    @pytest.mark.parametrize(
        ("data", "status", "code"),
        [
            pytest.param(
                b"GET /echo/../locked/x HTTP/1.1\r\nHost: a\r\n\r\n",
                400,
                "malformed-request",
                id="dot-dot-segment",
            ),
            pytest.param(
                b"GET /echo/./x HTTP/1.1\r\nHost: a\r\n\r\n",
                400,
                "malformed-request",
                id="dot-segment",
            ),
            pytest.param(
                b"GET /echo/x HTTP/1.1\r\nHost: a\r\nContent-Length: 1x\r\n\r\n",
                400,
                "malformed-request",
                id="bad-content-length",
            ),
            pytest.param(
                b"GET /echo/x HTTP/1.1\r\nHost: a\r\nBad Header: token-s3cret\r\n\r\n",
                400,
                "malformed-request",
                id="bad-header-token",
            ),
            pytest.param(
                b"POST /echo/x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n",
                400,
                "malformed-request",
                id="smuggling-cl-te",
            ),
            pytest.param(b"FOO\r\n\r\n", 400, "malformed-request", id="not-http"),
        ],
    )
    async def test_unparseable_requests_get_a_problem(
        self, gateway: Client, data: bytes, status: int, code: str
    ) -> None:
        """Requests aiohttp cannot parse still get problem+json and the security headers."""
        got_status, headers, body = await raw_request(gateway, data)
        assert got_status == status
        assert headers["content-type"] == PROBLEM_CONTENT_TYPE
        for name, value in SECURITY_HEADERS.items():
            assert headers[name.lower()] == value
        problem = orjson.loads(body)
        assert problem["type"] == problem_type(code)
        assert problem["request_id"] == headers["x-request-id"]
        # SECURITY: the answer never quotes what the client sent.
        assert b"s3cret" not in body

    async def test_chunked_body_over_cap_is_413(self, make_gateway: GatewayFactory) -> None:
        """A chunked body with no Content-Length is still cut off at the cap."""
        client = await make_gateway(server={"max_body_bytes": 1024})

        async def chunks() -> Any:
            for _ in range(8):
                yield b"y" * 512

        response = await client.post("/echo/x", data=chunks())
        await assert_problem(response, 413, "payload-too-large")


class TestFailures:
    async def test_opa_unreachable_fails_closed(self, make_gateway: GatewayFactory) -> None:
        """No OPA answer: 503 policy-unavailable, nothing forwarded."""
        client = await make_gateway(policy={"url": f"http://127.0.0.1:{free_port()}"})
        response = await client.get("/echo/x")
        body = await assert_problem(response, 503, "policy-unavailable")
        assert len(body["decision_id"]) == 36

    async def test_opa_dying_mid_traffic_fails_closed(self, make_gateway: GatewayFactory) -> None:
        """Requests are allowed while OPA runs, refused with 503 once it stops."""
        from tests.conftest import POLICY_DIR

        own = OpaProcess(POLICY_DIR)
        own.start()
        try:
            client = await make_gateway(policy={"url": own.url})
            assert (await client.get("/echo/x")).status == 200
            own.stop()
            await assert_problem(await client.get("/echo/x"), 503, "policy-unavailable")
            own.start()
            assert (await client.get("/echo/x")).status == 200
        finally:
            own.stop()

    async def test_upstream_down_is_502(self, make_gateway: GatewayFactory) -> None:
        """An upstream refusing connections is 502 upstream-unavailable."""
        dead = f"http://127.0.0.1:{free_port()}"
        client = await make_gateway(
            routes=[
                {
                    "name": "echo",
                    "prefix": "/echo/",
                    "upstream": dead,
                    "auth": "none",
                    "require_signature": False,
                }
            ]
        )
        await assert_problem(await client.get("/echo/x"), 502, "upstream-unavailable")

    @pytest.mark.parametrize(
        ("dead", "path", "failure"),
        [
            pytest.param(False, "/echo/status/503", (503, None), id="upstream-answers-503"),
            pytest.param(True, "/echo/x", (502, "upstream-unavailable"), id="connection-refused"),
        ],
    )
    async def test_failing_upstream_opens_the_route_circuit(
        self,
        make_gateway: GatewayFactory,
        upstream: TestServer,
        dead: bool,
        path: str,
        failure: tuple[int, str | None],
    ) -> None:
        """circuit_failures failures in a row: 503 circuit-open, not sent, Retry-After."""
        anonymous = {"auth": "none", "require_signature": False}
        live = str(upstream.make_url("")).rstrip("/")
        routes = [
            {
                "name": "echo",
                "prefix": "/echo/",
                "upstream": f"http://127.0.0.1:{free_port()}" if dead else live,
                "circuit_failures": 2,
                "circuit_open_s": 30,
                **anonymous,
            },
            {"name": "readonly", "prefix": "/readonly/", "upstream": live, **anonymous},
        ]
        client = await make_gateway(routes=routes)
        status, code = failure
        for _ in range(2):
            response = await client.get(path)
            if code is None:
                assert response.status == status  # the upstream's own answer
            else:
                await assert_problem(response, status, code)
        refused = await client.get(path)
        body = await assert_problem(refused, 503, "circuit-open", ["circuit_open"])
        assert len(body["decision_id"]) == 36
        assert 1 <= int(refused.headers["Retry-After"]) <= 30
        # One route's circuit is its own: another route to the same upstream still serves.
        assert (await client.get("/readonly/x")).status == 200

    async def test_upstream_slow_is_504(self, gateway: Client) -> None:
        """An upstream slower than the route timeout (1 s here) is 504 upstream-timeout."""
        response = await gateway.get("/echo/slow/3")
        await assert_problem(response, 504, "upstream-timeout")


class TestEveryResponse:
    @pytest.mark.parametrize(
        "path",
        ["/health", "/_readyz", "/echo/x", "/readonly/x", "/locked/x", "/nowhere", "/echo/a%2f"],
    )
    async def test_security_headers_and_request_id(self, gateway: Client, path: str) -> None:
        """Every response, whatever produced it, carries the security headers and an id."""
        response = await gateway.get(path)
        for name, value in SECURITY_HEADERS.items():
            assert response.headers[name] == value
        assert len(response.headers["X-Request-Id"]) == 32

    async def test_request_ids_are_unique(self, gateway: Client) -> None:
        """Concurrent requests get distinct ids."""
        responses = await asyncio.gather(*(gateway.get("/echo/x") for _ in range(50)))
        assert len({r.headers["X-Request-Id"] for r in responses}) == 50

    async def test_security_headers_override_upstream(self, gateway: Client) -> None:
        """An upstream's weaker headers do not survive the perimeter."""
        response = await gateway.get("/echo/stream/1")
        assert response.headers["X-Frame-Options"] == "DENY"
