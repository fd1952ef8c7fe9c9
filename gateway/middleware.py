"""The HTTP edge: request ids, problem+json, the canonical log line, security headers.

Everything here applies to every response the gateway sends, whether it
comes from the pipeline, the gateway's own endpoints or the router.
"""

from __future__ import annotations

import ipaddress
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Final

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from gateway.context import REQUEST_CONTEXT, RequestContext
from gateway.errors import (
    AuditUnavailable,
    GatewayError,
    InternalError,
    MalformedRequest,
    MethodNotAllowed,
    NoRoute,
    PayloadTooLarge,
)
from gateway.logs import REQUEST_ID
from gateway.metrics import Metrics
from gateway.problem import problem_response
from gateway.telemetry import Telemetry

__all__ = [
    "ON_OUTCOME",
    "SECURITY_HEADERS",
    "OutcomeHook",
    "client_ip",
    "edge_middleware",
    "set_security_headers",
]

_log = logging.getLogger("gateway.request")

#: Called with every request the pipeline ended with an error, before its
#: problem response is sent (the audit log's hook). It may raise a
#: GatewayError, which then replaces the error (audit-unavailable).
OutcomeHook = Callable[[RequestContext, GatewayError], Awaitable[None]]
ON_OUTCOME: Final[web.AppKey[OutcomeHook]] = web.AppKey("on_outcome")

# SECURITY: set on every response, overriding an upstream's values, so the
# perimeter's guarantees do not depend on each upstream's hygiene.
SECURITY_HEADERS: Final = {
    "Strict-Transport-Security": "max-age=63072000; includeSubDomains",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # No product or version disclosure (aiohttp would name itself and Python).
    "Server": "nops-gateway",
}

_HTTP_EXCEPTIONS: Final[dict[int, type[GatewayError]]] = {
    400: MalformedRequest,
    404: NoRoute,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
}


def client_ip(request: web.Request, trusted_proxies: frozenset[str]) -> str:
    """The caller's address: the peer, or the nearest untrusted X-Forwarded-For hop."""
    remote = request.remote or ""
    if remote not in trusted_proxies:
        return remote
    hops = [
        h.strip() for v in request.headers.getall(hdrs.X_FORWARDED_FOR, []) for h in v.split(",")
    ]
    for hop in reversed(hops):
        if hop and hop not in trusted_proxies:
            return hop if _is_ip(hop) else remote
    return remote


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def edge_middleware(
    *,
    metrics: Metrics,
    trusted_proxies: Iterable[str] = (),
    access_log: bool = True,
    telemetry: Telemetry | None = None,
) -> Middleware:
    """Give each request a context and an id; turn errors into problem+json.

    With ``telemetry`` each request also gets a server span (and its trace id
    on every log line) and is counted in the Prometheus metrics.
    """
    trusted = frozenset(trusted_proxies)

    @web.middleware
    async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)
        ctx = RequestContext(
            request=request, request_id=request_id, client_ip=client_ip(request, trusted)
        )
        request[REQUEST_CONTEXT] = ctx
        observation = telemetry.begin(ctx) if telemetry is not None else None
        status = 500
        error: GatewayError | None = None
        try:
            try:
                response = await handler(request)
            except GatewayError as exc:
                # Kept past the except block: without its traceback, which
                # holds this frame (and so the request) in a cycle (ADR 0021).
                error = exc.with_traceback(None)
                error.__context__ = None
            except web.HTTPException as exc:
                error = _from_http_exception(exc)
            except Exception:  # noqa: BLE001 - the edge turns any failure into a 500 problem
                _log.exception("unhandled error", extra={"stage": ctx.stage})
                error = InternalError("the gateway failed to handle this request")
            if error is not None:
                error = await _report_outcome(request, ctx, error)
                if ctx.decision is not None:
                    # A failure after the decision (upstream, circuit) names it too.
                    error.extra.setdefault("decision_id", ctx.decision.decision_id)
                response = problem_response(error, request_id=request_id)
            status = response.status
            return response
        finally:
            metrics.record(
                ctx.stage if error else "done",
                status,
                error.code if error else None,
                error.reasons if error else (),
            )
            if observation is not None:
                observation.finish(ctx, status, error)
            if access_log:
                _log_request(ctx, status, error)
            if observation is not None:
                observation.close()
            REQUEST_ID.reset(token)
            ctx.edge_done = True
            if ctx.response_prepared:
                release_context(request)

    return edge


async def _report_outcome(
    request: web.Request, ctx: RequestContext, error: GatewayError
) -> GatewayError:
    hook = request.app.get(ON_OUTCOME)
    if hook is None:
        return error
    try:
        await hook(ctx, error)
    except GatewayError as exc:
        return exc
    except Exception:  # noqa: BLE001 - SECURITY: an unrecorded denial still fails closed
        _log.exception("outcome hook failed", extra={"stage": ctx.stage})
        return AuditUnavailable("the outcome could not be recorded")
    return error


def _from_http_exception(exc: web.HTTPException) -> GatewayError:
    cls = _HTTP_EXCEPTIONS.get(exc.status)
    if cls is None:
        error = InternalError(exc.reason)
        return error
    headers = {"Allow": exc.headers[hdrs.ALLOW]} if hdrs.ALLOW in exc.headers else None
    return cls(headers=headers)


def _log_request(ctx: RequestContext, status: int, error: GatewayError | None) -> None:
    request = ctx.request
    decision = ctx.decision
    entry: dict[str, object] = {
        "method": request.method,
        "path": request.path,  # SECURITY: never the query string, it may carry tokens
        "route": ctx.route.name if ctx.route else None,
        "status": status,
        "stage": ctx.stage,
        "duration_ms": round((time.monotonic() - ctx.started) * 1000, 3),
        "client_ip": ctx.client_ip,
        "tenant": ctx.tenant.id if ctx.tenant else None,
    }
    if decision is not None:
        entry["decision_id"] = decision.decision_id
        entry["policy_revision"] = decision.revision
    if error is not None:
        entry["error"] = error.code
        entry["reasons"] = list(error.reasons)
        entry["reason"] = error.reasons[0] if error.reasons else error.code
        if "decision_id" in error.extra:
            entry["decision_id"] = error.extra["decision_id"]
    if ctx.upstream_status is not None:
        entry["upstream_status"] = ctx.upstream_status
    if ctx.audit_seq is not None:
        entry["audit_seq"] = ctx.audit_seq
    level = logging.ERROR if status >= 500 else logging.INFO
    _log.log(level, "request", extra=entry)


async def set_security_headers(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """``on_response_prepare`` hook: security headers, request id, the pipeline's headers."""
    response.headers.update(SECURITY_HEADERS)
    ctx = request.get(REQUEST_CONTEXT) if isinstance(request, web.Request) else None
    if ctx is not None:
        response.headers["X-Request-Id"] = ctx.request_id
        # Appended, not replacing: RateLimit and RateLimit-Policy are lists, and
        # an upstream's own policies must survive (ratelimit-headers §7.2).
        for name, value in ctx.response_headers.items():
            response.headers.add(name, value)
        ctx.response_prepared = True
        if ctx.edge_done:
            release_context(request)


def release_context(request: web.BaseRequest) -> None:
    """Unlink the finished request's context from the request.

    The context refers to the request and the request to the context: a
    cycle, which left every request (its parser message, headers, writer,
    decision...) to the cyclic garbage collector, whose full collections then
    paused the loop for tens of ms under load (ADR 0021). Called once neither
    the edge nor ``on_response_prepare`` will read it again, so reference
    counting frees the request as soon as aiohttp drops it.
    """
    request.pop(REQUEST_CONTEXT, None)
