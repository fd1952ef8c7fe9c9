"""Egress routes: ``/egress/{destination}/{path}`` to a named destination, SSRF-guarded.

A route of ``kind = "egress"`` (prefix ``/egress/`` below) takes
``/egress/{destination}/{path}?{query}`` to ``{base_url}/{path}?{query}`` of
the destination named in the ``[egress]`` destinations file. The caller never
supplies a URL or host; only a name.

1. Intake parses the destination and the request's class (``X-Data-Class:
   D0..D4``; absent: the tenant's default, else ``egress.default_class``;
   anything else: 400 ``invalid_data_class``).
2. The decision stage asks OPA (``target.kind = "egress"``, ``destination``,
   ``classification``); ``nops.egress`` compares the class with the
   destination's and the tenant's ceilings. A denial is 403 ``egress-denied``
   with the policy's reasons; in report mode a class-gate denial is logged,
   counted and audited as ``enforce_would_deny``, and the request goes on
   (``d4_never_leaves`` is never reported-only).
3. The route stage (:class:`EgressRouter`) checks method and path against
   the destination, resolves its host and classifies every address
   (:class:`egress.resolver.AddressGuard`; 403 ``egress-denied`` with the
   address reasons, in every mode), and connects to the checked address only
   (:func:`egress.connector.pinned_session`). Redirects are never followed:
   a 3xx is relayed to the caller as it is, and can only be followed through
   the gateway again (to a named destination). The response body is read
   within ``egress.max_response_bytes`` (else 502 ``response_too_large``)
   and the destination's timeouts (504). Retries and the per-destination
   circuit breaker follow the agent routes' rules (:mod:`gateway.agents`).

What the destination gets: the caller's method, path, query, body and
end-to-end headers, without its credentials (``Authorization``, ``Cookie``),
the gateway's identity headers (``X-Nops-*``), forwarding headers that would
reveal the internal network (``X-Forwarded-*``, ``Forwarded``), the request
id, the signature and ``X-Data-Class``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import aiohttp
import yarl
from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy

from egress.addresses import parse_address
from egress.connector import pinned_session
from egress.destinations import CLASSES, Destination, Mode, load_destinations
from egress.resolver import AddressDenied, AddressGuard, Resolver
from gateway.agents import IDEMPOTENT_METHODS
from gateway.circuit import CircuitBreakers
from gateway.config import Config, EgressConfig, RouteConfig
from gateway.context import RequestContext
from gateway.errors import (
    CircuitOpen,
    EgressDenied,
    GatewayError,
    MalformedRequest,
    NoRoute,
    PayloadTooLarge,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.proxy import HOP_BY_HOP
from gateway.telemetry import inject_trace, operation

__all__ = [
    "DATA_CLASS_HEADER",
    "EGRESS_POLICY_REASONS",
    "REPORTABLE_REASONS",
    "EgressRouter",
    "EgressSettings",
    "EgressTarget",
    "build_egress_routers",
    "egress_settings",
    "parse_egress_target",
]

_log = logging.getLogger("gateway.egress")

DATA_CLASS_HEADER: Final = "X-Data-Class"
#: Policy reasons that report mode lets through (logged and audited instead).
#: ``d4_never_leaves`` and ``unknown_classification`` are not among them.
REPORTABLE_REASONS: Final = frozenset(
    {
        "class_above_destination_ceiling",
        "class_above_tenant_ceiling",
        "unknown_destination",
        "unknown_tenant",
    }
)
#: Every reason of nops.egress: a denial with one of them is 403 egress-denied.
EGRESS_POLICY_REASONS: Final = REPORTABLE_REASONS | {
    "d4_never_leaves",
    "unknown_classification",
    "malformed_obligations",
}
_NAME: Final = re.compile(r"[a-z][a-z0-9._-]{0,62}")
_RETRY_STATUSES: Final = frozenset({502, 503, 504})
# SECURITY: what never leaves the perimeter with a request.
_NOT_SENT: Final = HOP_BY_HOP | frozenset(
    h.lower()
    for h in (
        hdrs.HOST,
        hdrs.AUTHORIZATION,
        hdrs.COOKIE,
        hdrs.CONTENT_LENGTH,
        hdrs.X_FORWARDED_FOR,
        hdrs.X_FORWARDED_HOST,
        hdrs.X_FORWARDED_PROTO,
        "Forwarded",
        "X-Real-IP",
        "X-Request-Id",
        "Signature",
        "Signature-Input",
        DATA_CLASS_HEADER,
    )
)
_CHUNK: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class EgressSettings:
    """``[egress]`` with its destinations file loaded."""

    config: EgressConfig
    destinations: Mapping[str, Destination]

    def mode(self, destination: str) -> Mode:
        found = self.destinations.get(destination)
        if found is not None and found.mode is not None:
            return found.mode
        return self.config.mode


def egress_settings(config: Config) -> EgressSettings:
    egress = config.egress
    destinations = load_destinations(egress.destinations_file) if egress.destinations_file else {}
    return EgressSettings(egress, destinations)


@dataclass(frozen=True, slots=True)
class EgressTarget:
    """What an egress route's path and headers ask for."""

    destination: str
    #: The raw path sent to the destination (after the name), starting with "/".
    path: str
    #: The caller's ``X-Data-Class``, or None.
    declared: str | None
    mode: Mode
    tenant_defaults: Mapping[str, str]
    default_class: str

    def classification(self, tenant: str | None) -> str:
        """The request's class: declared, else the tenant's default, else the global one."""
        if self.declared is not None:
            return self.declared
        if tenant is not None and tenant in self.tenant_defaults:
            return self.tenant_defaults[tenant]
        return self.default_class


def parse_egress_target(
    route: RouteConfig, request: web.Request, settings: EgressSettings
) -> EgressTarget:
    """Split an egress route's path and read the class; 404/400 if they name nothing."""
    rest = request.raw_path.partition("?")[0][len(route.prefix) :]
    name, _, tail = rest.partition("/")
    if not name:
        raise NoRoute(f"name a destination: {route.prefix}{{destination}}/...")
    if _NAME.fullmatch(name) is None:
        raise MalformedRequest("not a destination name", reasons=("invalid_destination",))
    declared = request.headers.getall(DATA_CLASS_HEADER, [])
    if len(declared) > 1 or (declared and declared[0].strip() not in CLASSES):
        raise MalformedRequest(
            f"{DATA_CLASS_HEADER} must be one of {', '.join(CLASSES)}",
            reasons=("invalid_data_class",),
        )
    return EgressTarget(
        destination=name,
        path="/" + tail,
        declared=declared[0].strip() if declared else None,
        mode=settings.mode(name),
        tenant_defaults=settings.config.tenant_default_class,
        default_class=settings.config.default_class,
    )


class EgressRouter:
    """Sends one egress route's requests to named destinations, checked and pinned."""

    def __init__(
        self,
        route: RouteConfig,
        settings: EgressSettings,
        *,
        resolver: Resolver | None = None,
        max_body_bytes: int = 1_048_576,
    ) -> None:
        config = settings.config
        self._route = route
        self._settings = settings
        self._max_body = max_body_bytes
        own = frozenset(
            address
            for address in (parse_address(text) for text in config.self_addresses)
            if address is not None
        )
        self.guard = AddressGuard(resolver, own=own)
        self.breakers = CircuitBreakers(
            failure_threshold=config.circuit_failures,
            open_s=config.circuit_open_s,
            half_open_max=config.circuit_half_open_max,
        )
        self._tls: dict[str, ssl.SSLContext] = {}

    async def forward(self, ctx: RequestContext) -> web.StreamResponse:
        target = ctx.egress_target
        if target is None:  # intake sets it on every egress route
            raise NoRoute("not an egress request")
        destination = self._settings.destinations.get(target.destination)
        if destination is None:
            # OPA knew the name (or report mode let it through); the gateway does not.
            raise EgressDenied("no such destination", reasons=("unknown_destination",))
        request = ctx.request
        if request.method not in destination.methods:
            raise EgressDenied(
                f"{request.method} is not allowed to {destination.name}",
                reasons=("method_not_allowed",),
            )
        if not destination.allows_path(target.path):
            raise EgressDenied(
                f"that path is not allowed to {destination.name}", reasons=("path_not_allowed",)
            )
        body = ctx.body
        if body is None and request.body_exists:
            body = await _read_capped(request, self._max_body)
        url = _join(destination.base_url, target.path, request.raw_path.partition("?")[2])
        idempotent = request.method in IDEMPOTENT_METHODS
        attempts = self._settings.config.retries + 1
        failure: GatewayError | None = None
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(self._settings.config.backoff_s * attempt)
            result = await self._attempt(ctx, destination, url, body, idempotent)
            if isinstance(result, web.StreamResponse):
                return result
            failure, retryable = result
            if not retryable or attempt + 1 == attempts:
                break
            _log.info(
                "egress attempt failed",
                extra={"destination": destination.name, "attempt": attempt + 1},
            )
        assert failure is not None  # noqa: S101 - the loop ran and did not return
        raise failure

    async def _attempt(
        self,
        ctx: RequestContext,
        destination: Destination,
        url: yarl.URL,
        body: bytes | None,
        idempotent: bool,
    ) -> web.StreamResponse | tuple[GatewayError, bool]:
        breaker = self.breakers.get(destination.name, label=destination.name)
        ticket = breaker.allow()
        if ticket is None:
            return CircuitOpen.retry_in(
                f"the circuit of {destination.name} is open; the request was not sent",
                breaker.retry_in,
            ), False
        try:
            checked = await self.guard.check(
                destination.host, destination.port, internal=destination.internal
            )
        except AddressDenied as exc:
            breaker.release(ticket)
            _log.warning(
                "egress address denied",
                extra={"destination": destination.name, "reasons": list(exc.reasons)},
            )
            raise EgressDenied(
                f"{destination.name} resolves to an address that may not be dialled",
                reasons=exc.reasons,
            ) from None
        limits = aiohttp.ClientTimeout(
            total=destination.timeout_s, connect=destination.connect_timeout_s
        )
        slow = f"{destination.name} did not answer within {destination.timeout_s:g} s"
        async with pinned_session(checked, ssl_context=self._ssl(destination)) as session:
            try:
                with operation("upstream", self._route.name):
                    outbound = _outbound_headers(ctx.request.headers)
                    inject_trace(outbound)
                    async with session.request(
                        ctx.request.method,
                        url,
                        headers=outbound,
                        data=body,
                        timeout=limits,
                        allow_redirects=False,  # SECURITY: a redirect is relayed, never followed
                    ) as upstream:
                        content = await _read_response(upstream, self._settings.config)
                        status = upstream.status
                        reason = upstream.reason
                        headers = _response_headers(upstream.headers)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
                breaker.failure(ticket)
                return UpstreamUnavailable(f"{destination.name} is unreachable"), True
            except TimeoutError:
                breaker.failure(ticket)
                return UpstreamTimeout(slow), idempotent
            except aiohttp.ClientError:
                breaker.failure(ticket)
                return UpstreamUnavailable(f"{destination.name} broke the exchange"), idempotent
            except _ResponseTooLarge:
                breaker.release(ticket)
                return UpstreamUnavailable(
                    f"the response of {destination.name} exceeds the size cap",
                    reasons=("response_too_large",),
                ), False
        if status in _RETRY_STATUSES:
            breaker.failure(ticket)
            if idempotent:
                return UpstreamUnavailable(f"{destination.name} answered {status}"), True
        else:
            breaker.success(ticket)
        ctx.upstream_status = status
        response = web.Response(status=status, reason=reason, body=content)
        for name, value in headers.items():
            response.headers.add(name, value)
        return response

    def _ssl(self, destination: Destination) -> ssl.SSLContext | None:
        if not destination.client_cert_file:
            return None
        context = self._tls.get(destination.name)
        if context is None:
            context = ssl.create_default_context()
            context.load_cert_chain(destination.client_cert_file, destination.client_key_file)
            self._tls[destination.name] = context
        return context


class _ResponseTooLarge(Exception):
    pass


async def _read_response(upstream: aiohttp.ClientResponse, config: EgressConfig) -> bytes:
    cap = config.max_response_bytes
    if upstream.content_length is not None and upstream.content_length > cap:
        raise _ResponseTooLarge()
    parts: list[bytes] = []
    seen = 0
    async for chunk in upstream.content.iter_chunked(_CHUNK):
        seen += len(chunk)
        if seen > cap:
            raise _ResponseTooLarge()
        parts.append(chunk)
    return b"".join(parts)


async def _read_capped(request: web.Request, limit: int) -> bytes:
    parts: list[bytes] = []
    seen = 0
    async for chunk in request.content.iter_chunked(_CHUNK):
        seen += len(chunk)
        if seen > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    tokens: set[str] = set()
    for value in headers.getall(hdrs.CONNECTION, []):
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def _outbound_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    drop = _NOT_SENT | _connection_tokens(headers)
    return CIMultiDict(
        (k, v)
        for k, v in headers.items()
        if k.lower() not in drop and not k.lower().startswith("x-nops-")
    )


def _response_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    drop = HOP_BY_HOP | _connection_tokens(headers) | {"content-length"}
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


def _join(base: yarl.URL, path: str, query: str) -> yarl.URL:
    target = str(base.origin()) + base.raw_path.rstrip("/") + path
    return yarl.URL(target + ("?" + query if query else ""), encoded=True)


def build_egress_routers(
    config: Config, *, resolver: Resolver | None = None
) -> dict[str, EgressRouter]:
    """One router per egress route, by route name."""
    routes = [route for route in config.routes if route.kind == "egress"]
    if not routes:
        return {}
    settings = egress_settings(config)
    return {
        route.name: EgressRouter(
            route, settings, resolver=resolver, max_body_bytes=config.server.max_body_bytes
        )
        for route in routes
    }
