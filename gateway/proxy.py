"""The reverse proxy: stream an allowed request to its upstream and back.

Hop-by-hop headers (RFC 9110 §7.6.1, plus any named in ``Connection``) are
dropped both ways; ``X-Forwarded-For/-Proto/-Host`` and ``X-Request-Id`` are
set for the upstream. A credential the gateway verified (``Authorization``
on a route whose ``auth`` is not "none") is removed unless the route sets
``forward_authorization``; instead the upstream gets the verified identity as
``X-Nops-Tenant``, ``-Subject``, ``-Agent``, ``-Scopes`` and
``-Decision-Id``. Callers can never send ``X-Nops-*`` themselves. The
request signature (``Signature``, ``Signature-Input``) is the caller's proof
to the gateway and is not forwarded. With tracing on, ``traceparent`` and
``tracestate`` name the gateway's upstream span (same trace id as the caller's).
Bodies stream in both directions; the request body is cut off at the
configured cap. A body a stage already read whole (``ctx.body``, to verify
its digest) is sent as those bytes. Connection failures are 502, timeouts 504.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator
from typing import Final

import aiohttp
import yarl
from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import RouteConfig
from gateway.context import RequestContext
from gateway.errors import PayloadTooLarge, UpstreamTimeout, UpstreamUnavailable
from gateway.telemetry import inject_trace, operation

__all__ = ["HOP_BY_HOP", "ReverseProxy"]

_log = logging.getLogger("gateway.proxy")

HOP_BY_HOP: Final = frozenset(
    h.lower()
    for h in (
        hdrs.CONNECTION,
        "Keep-Alive",
        hdrs.PROXY_AUTHENTICATE,
        hdrs.PROXY_AUTHORIZATION,
        hdrs.TE,
        hdrs.TRAILER,
        hdrs.TRANSFER_ENCODING,
        hdrs.UPGRADE,
        "Proxy-Connection",
    )
)
# Set by the proxy itself, never copied from the client.
_REWRITTEN: Final = frozenset(
    h.lower()
    for h in (
        hdrs.HOST,
        hdrs.X_FORWARDED_FOR,
        hdrs.X_FORWARDED_HOST,
        hdrs.X_FORWARDED_PROTO,
        "Forwarded",
        "X-Request-Id",
        # The caller's proof to the gateway, verified and consumed here.
        "Signature",
        "Signature-Input",
    )
)
# Dropped from every request sent upstream; with the verified credential too.
_DROP_UPSTREAM: Final = HOP_BY_HOP | _REWRITTEN
_DROP_UPSTREAM_AUTH: Final = _DROP_UPSTREAM | {"authorization"}
_CHUNK: Final = 64 * 1024
_IDENTITY_PREFIX: Final = "x-nops-"


class _BodyTooLarge(Exception):
    pass


class _ProxiedResponse(web.StreamResponse):
    """A streamed response whose status line and headers leave with its first body bytes.

    ``StreamResponse.prepare`` normally sends the headers on their own; held
    until the first ``write`` (or ``write_eof``), a small answer goes out in one
    socket write instead of two or three. Only when they are sent changes:
    :meth:`ReverseProxy._relay` prepares the response once the first body bytes
    have arrived and writes them at once. (A private aiohttp switch, the one
    ``web.Response`` sets; if it went away, headers would simply go out first.)
    """

    _send_headers_immediately = False


class _CappedBody:
    """The request body as a stream, cut off past ``limit`` bytes."""

    def __init__(self, request: web.Request, limit: int) -> None:
        self._request = request
        self._limit = limit
        self.exceeded = False

    async def chunks(self) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in self._request.content.iter_chunked(_CHUNK):
            seen += len(chunk)
            if seen > self._limit:
                self.exceeded = True
                raise _BodyTooLarge()
            yield chunk


class ReverseProxy:
    """Forwards requests over one pooled client session."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        max_body_bytes: int,
        trusted_proxies: frozenset[str] = frozenset(),
    ) -> None:
        self._session = session
        self._max_body = max_body_bytes
        self._trusted = trusted_proxies

    async def forward(self, ctx: RequestContext, route: RouteConfig) -> web.StreamResponse:
        request = ctx.request
        url = _target_url(route, request)
        timeout = _timeout(route.timeout_s, route.connect_timeout_s)
        body: _CappedBody | None = None
        data: bytes | AsyncIterator[bytes] | None = None
        if ctx.body is not None:
            # The stream is consumed: send the bytes whose digest was verified.
            data = ctx.body or None
        elif request.body_exists:
            body = _CappedBody(request, self._max_body)
            data = body.chunks()
        try:
            upstream = await self._request(ctx, url, route.name, data, timeout)
        except (_BodyTooLarge, aiohttp.ClientError, TimeoutError) as exc:
            # The body cap surfaces as whatever aiohttp wraps it in; check it first.
            if body is not None and body.exceeded:
                raise PayloadTooLarge(f"request body exceeds {self._max_body} bytes") from None
            if isinstance(exc, TimeoutError):
                raise UpstreamTimeout(
                    f"upstream {route.name} did not answer within {route.timeout_s:g} s"
                ) from None
            _log.warning(
                "upstream unavailable", extra={"route": route.name, "error": type(exc).__name__}
            )
            raise UpstreamUnavailable(f"upstream {route.name} is unavailable") from None
        try:
            return await self._relay(ctx, upstream, route)
        finally:
            upstream.release()

    async def send(
        self,
        ctx: RequestContext,
        url: yarl.URL,
        *,
        body: bytes | None,
        limits: aiohttp.ClientTimeout,
    ) -> aiohttp.ClientResponse:
        """Send ``ctx.request`` with its already-read ``body`` to ``url`` within ``limits``.

        The upstream gets the same headers as through :meth:`forward`. For callers
        that choose the target themselves and may retry (:mod:`gateway.agents`);
        they :meth:`relay` the answer and release it.
        """
        route_name = ctx.route.name if ctx.route is not None else ""
        return await self._request(ctx, url, route_name, body, limits)

    async def _request(
        self,
        ctx: RequestContext,
        url: yarl.URL,
        route_name: str,
        data: bytes | AsyncIterator[bytes] | None,
        limits: aiohttp.ClientTimeout,
    ) -> aiohttp.ClientResponse:
        """The one upstream call: our headers, no redirects followed, the body as sent."""
        with operation("upstream", route_name):
            return await self._session.request(
                ctx.request.method,
                url,
                headers=_upstream_headers(ctx, url, self._trusted),
                data=data,
                timeout=limits,
                allow_redirects=False,
                auto_decompress=False,
            )

    async def relay(
        self, ctx: RequestContext, upstream: aiohttp.ClientResponse, route: RouteConfig
    ) -> web.StreamResponse:
        """Stream ``upstream``'s answer to the client. Until the first body bytes
        arrive nothing is sent, and a failure raises 502/504; after that a
        failure can only cut the body short."""
        return await self._relay(ctx, upstream, route)

    async def _relay(
        self, ctx: RequestContext, upstream: aiohttp.ClientResponse, route: RouteConfig
    ) -> web.StreamResponse:
        ctx.upstream_status = upstream.status
        response = _ProxiedResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=_response_headers(upstream.headers),
        )
        try:
            first = await upstream.content.readany()
        except TimeoutError:
            raise UpstreamTimeout(
                f"upstream {route.name} did not answer within {route.timeout_s:g} s"
            ) from None
        except aiohttp.ClientError:
            raise UpstreamUnavailable(f"upstream {route.name} broke the exchange") from None
        # From here on the status line is sent: a failure can only cut the body.
        await response.prepare(ctx.request)
        try:
            chunk = first
            while chunk:
                await response.write(chunk)
                chunk = await upstream.content.readany()
        except (aiohttp.ClientError, TimeoutError) as exc:
            _log.warning(
                "upstream body cut short", extra={"route": route.name, "error": type(exc).__name__}
            )
            if ctx.request.transport is not None:
                ctx.request.transport.close()
            return response
        await response.write_eof()
        return response


def _target_url(route: RouteConfig, request: web.Request) -> yarl.URL:
    raw_path, _, query = request.raw_path.partition("?")
    if route.strip_prefix:
        raw_path = "/" + raw_path[len(route.prefix) :]
    target = _upstream_base(route.upstream) + raw_path
    return yarl.URL(target + ("?" + query if query else ""), encoded=True)


@functools.lru_cache(maxsize=256)
def _upstream_base(upstream: str) -> str:
    """A route's upstream as origin + path without the trailing slash (parsed once)."""
    base = yarl.URL(upstream)
    return str(base.origin()) + base.raw_path.rstrip("/")


@functools.lru_cache(maxsize=256)
def _timeout(total: float, connect: float) -> aiohttp.ClientTimeout:
    """The (immutable) client timeout of a route, built once."""
    return aiohttp.ClientTimeout(total=total, connect=connect)


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    tokens: set[str] = set()
    for value in headers.getall(hdrs.CONNECTION, []):
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def _upstream_headers(
    ctx: RequestContext, url: yarl.URL, trusted: frozenset[str]
) -> CIMultiDict[str]:
    request = ctx.request
    route = ctx.route
    strip_auth = route is not None and route.auth != "none" and not route.forward_authorization
    drop = _DROP_UPSTREAM_AUTH if strip_auth else _DROP_UPSTREAM
    if hdrs.CONNECTION in request.headers:
        drop = drop | _connection_tokens(request.headers)
    headers: CIMultiDict[str] = CIMultiDict()
    for k, v in request.headers.items():
        name = k.lower()
        # SECURITY: X-Nops-* is the gateway's word to the upstream, never the caller's.
        if name not in drop and not name.startswith(_IDENTITY_PREFIX):
            headers.add(k, v)
    _add_identity(headers, ctx)
    forwarded_for = request.headers.get(hdrs.X_FORWARDED_FOR)
    if forwarded_for and request.remote in trusted:
        # SECURITY: only a trusted proxy's chain is kept; a client's is replaced.
        headers[hdrs.X_FORWARDED_FOR] = f"{forwarded_for}, {request.remote}"
    else:
        headers[hdrs.X_FORWARDED_FOR] = request.remote or ""
    headers[hdrs.X_FORWARDED_PROTO] = request.scheme
    headers[hdrs.X_FORWARDED_HOST] = request.host
    headers["X-Request-Id"] = ctx.request_id
    headers[hdrs.HOST] = url.raw_authority
    inject_trace(headers)  # the current (upstream) span's traceparent, when tracing is on
    return headers


def _add_identity(headers: CIMultiDict[str], ctx: RequestContext) -> None:
    if ctx.tenant is not None:
        headers["X-Nops-Tenant"] = ctx.tenant.id
    subject = ctx.subject
    if subject.sub is not None:
        headers["X-Nops-Subject"] = subject.sub
    if subject.agent_id is not None:
        headers["X-Nops-Agent"] = subject.agent_id
    if subject.scopes:
        headers["X-Nops-Scopes"] = " ".join(subject.scopes)
    if ctx.decision is not None:
        headers["X-Nops-Decision-Id"] = ctx.decision.decision_id


def _response_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    drop = HOP_BY_HOP | _connection_tokens(headers) if hdrs.CONNECTION in headers else HOP_BY_HOP
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)
