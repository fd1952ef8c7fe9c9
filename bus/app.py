"""The bus's HTTP API (aiohttp), meant to sit behind the gateway.

::

    POST /topics/{topic}/messages                              publish (Idempotency-Key)
    GET  /topics/{topic}/subscriptions/{group}/messages        consume (?consumer=&max=&wait=)
    POST /topics/{topic}/subscriptions/{group}/ack             {"ids": [...]}
    GET  /topics/{topic}/subscriptions/{group}/pending         (?max=&consumer=)
    GET  /topics/{topic}/dlq                                   (?max=&after=)
    POST /topics/{topic}/dlq/redrive                           {"ids": [...]} or {"max": n}
    GET  /health                                               liveness
    GET  /_readyz                                              Redis reachable
    GET  /openapi.json                                         this API's OpenAPI 3.1 document

Every topic request acts for the tenant in ``X-Nops-Tenant``, which the
gateway sets from the verified credential after dropping any the caller
sent; without it the bus answers 401. No request names a stream: the
tenant comes only from that header, so one tenant cannot reach another's
streams. Errors are problem+json (:mod:`bus.problem`).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any, Final

import orjson
from aiohttp import web

from bus.config import BusConfig
from bus.envelope import parse_draft
from bus.errors import (
    BusError,
    InternalError,
    MalformedRequest,
    MethodNotAllowed,
    MissingTenant,
    NotFound,
    PayloadTooLarge,
)
from bus.problem import problem_response
from bus.streams import TENANT, BusClient, Delivery

__all__ = ["CLIENT", "TENANT_HEADER", "create_app"]

_log = logging.getLogger("bus.app")
_access = logging.getLogger("bus.access")

TENANT_HEADER: Final = "X-Nops-Tenant"
CLIENT: Final = web.AppKey("bus_client", BusClient)
_CONFIG: Final = web.AppKey("bus_config", BusConfig)
_TENANT: Final = web.RequestKey("tenant", str)
_REQUEST_ID: Final = web.RequestKey("request_id", str)

_REQUEST_ID_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,128}")
_IDEMPOTENCY_KEY_RE: Final = re.compile(r"[\x21-\x7e]{1,255}")
_TRACEPARENT_RE: Final = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
_TRACESTATE_RE: Final = re.compile(r"[\x20-\x7e]{0,512}")
#: Most ids one ack or redrive request may name.
MAX_IDS: Final = 1000
_DEFAULT_MAX: Final = 10
_MIN_BODY_CAP: Final = 64 * 1024
_JSON: Final = "application/json"
#: The API contract, served at ``/openapi.json`` (and by the gateway at ``/_openapi/bus.json``).
OPENAPI_DOCUMENT: Final = resources.files("bus").joinpath("openapi/bus.json").read_bytes()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(config: BusConfig, *, client: BusClient | None = None) -> web.Application:
    """The bus application; it connects to ``config.redis_url`` unless given ``client``."""
    config.validate()
    # Publish bodies are held to max_message_bytes in _publish; ack and redrive
    # bodies (up to MAX_IDS ids) may need more when that is set very low.
    body_cap = max(config.max_message_bytes, _MIN_BODY_CAP)
    app = web.Application(middlewares=[_edge], client_max_size=body_cap)
    app[_CONFIG] = config
    app.cleanup_ctx.append(_bus_client(client))
    app.router.add_get("/health", _health)
    app.router.add_get("/_readyz", _readyz)
    app.router.add_get("/openapi.json", _openapi, allow_head=False)
    app.router.add_post("/topics/{topic}/messages", _publish)
    app.router.add_get("/topics/{topic}/subscriptions/{group}/messages", _consume)
    app.router.add_post("/topics/{topic}/subscriptions/{group}/ack", _ack)
    app.router.add_get("/topics/{topic}/subscriptions/{group}/pending", _pending)
    app.router.add_get("/topics/{topic}/dlq", _dead_letters)
    app.router.add_post("/topics/{topic}/dlq/redrive", _redrive)
    return app


def _bus_client(
    given: BusClient | None,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        client = given or BusClient.connect(app[_CONFIG])
        app[CLIENT] = client
        try:
            yield
        finally:
            if given is None:
                await client.aclose()

    return context


@web.middleware
async def _edge(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, tenant, problem+json for every error, one access log line."""
    started = time.monotonic()
    offered = request.headers.get("X-Request-Id", "")
    request_id = offered if _REQUEST_ID_RE.fullmatch(offered) else uuid.uuid4().hex
    request[_REQUEST_ID] = request_id
    error: BusError | None = None
    try:
        if request.path.startswith("/topics/"):
            request[_TENANT] = _tenant(request)
        response = await handler(request)
    except BusError as exc:
        error = exc
    except web.HTTPException as exc:
        error = _from_http_exception(request, exc)
    except Exception:  # noqa: BLE001 - the edge turns any failure into a 500 problem
        _log.exception("unhandled error", extra={"request_id": request_id})
        error = InternalError()
    if error is not None:
        response = problem_response(error, request_id=request_id)
    response.headers["X-Request-Id"] = request_id
    if _access.isEnabledFor(logging.INFO):
        _access.info(
            "request",
            extra={
                "request_id": request_id,
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "tenant": request.get(_TENANT),
                "ms": round((time.monotonic() - started) * 1000, 2),
            },
        )
    return response


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> BusError:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge(
            f"the message exceeds {request.app[_CONFIG].max_message_bytes} bytes",
            reasons=("body_too_large",),
        )
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowed(headers={"Allow": ", ".join(sorted(exc.allowed_methods))})
    if isinstance(exc, web.HTTPNotFound):
        return NotFound()
    return InternalError()


def _tenant(request: web.Request) -> str:
    values = request.headers.getall(TENANT_HEADER, [])
    if not values:
        raise MissingTenant(
            "the bus is reached through the gateway, which names the tenant",
            reasons=("no_tenant",),
        )
    if len(values) > 1 or TENANT.fullmatch(values[0]) is None:
        raise MissingTenant("the tenant header is not valid", reasons=("invalid_tenant",))
    return values[0]


# -- handlers ----------------------------------------------------------------------


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, dumps=_dumps)


async def _openapi(request: web.Request) -> web.Response:
    """This service's OpenAPI document (``bus/openapi/bus.json``)."""
    return web.Response(body=OPENAPI_DOCUMENT, content_type=_JSON)


async def _readyz(request: web.Request) -> web.Response:
    await request.app[CLIENT].ping()
    return web.json_response({"status": "ready", "redis": "ok"}, dumps=_dumps)


async def _publish(request: web.Request) -> web.Response:
    limit = request.app[_CONFIG].max_message_bytes
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    body = await request.read()
    if len(body) > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(body))
    draft = parse_draft(body)
    result = await request.app[CLIENT].publish(
        request[_TENANT],
        request.match_info["topic"],
        draft,
        idempotency_key=_idempotency_key(request),
        traceparent=_trace_header(request, "traceparent", _TRACEPARENT_RE),
        tracestate=_trace_header(request, "tracestate", _TRACESTATE_RE),
    )
    answer = {"id": result.id, "event_id": result.event_id, "duplicate": result.duplicate}
    headers = {"Idempotent-Replayed": "true"} if result.duplicate else {}
    return _json(answer, status=200 if result.duplicate else 201, headers=headers)


async def _consume(request: web.Request) -> web.Response:
    config = request.app[_CONFIG]
    consumer = request.query.get("consumer")
    if not consumer:
        raise MalformedRequest("the consumer parameter is required", reasons=("no_consumer",))
    deliveries = await request.app[CLIENT].consume(
        request[_TENANT],
        request.match_info["topic"],
        request.match_info["group"],
        consumer,
        max_messages=_int_param(request, "max", min(_DEFAULT_MAX, config.max_batch)),
        wait_s=_float_param(request, "wait", 0.0),
    )
    return _json({"messages": [_delivery(d) for d in deliveries]})


async def _ack(request: web.Request) -> web.Response:
    ids = _ids(await _json_body(request), required=True)
    acked = await request.app[CLIENT].ack(
        request[_TENANT], request.match_info["topic"], request.match_info["group"], ids or []
    )
    return _json({"acked": acked})


async def _pending(request: web.Request) -> web.Response:
    consumer = request.query.get("consumer") or None
    pending = await request.app[CLIENT].pending(
        request[_TENANT],
        request.match_info["topic"],
        request.match_info["group"],
        max_entries=_int_param(request, "max", 100, upper=MAX_IDS),
        consumer=consumer,
    )
    return _json(
        {
            "count": pending.count,
            "consumers": pending.consumers,
            "messages": [
                {
                    "id": e.id,
                    "consumer": e.consumer,
                    "idle_ms": e.idle_ms,
                    "deliveries": e.deliveries,
                }
                for e in pending.entries
            ],
        }
    )


async def _dead_letters(request: web.Request) -> web.Response:
    letters = await request.app[CLIENT].dead_letters(
        request[_TENANT],
        request.match_info["topic"],
        max_entries=_int_param(request, "max", 100, upper=MAX_IDS),
        after=request.query.get("after") or None,
    )
    return _json(
        {
            "dead_letters": [
                {
                    "id": letter.id,
                    "source_id": letter.source_id,
                    "group": letter.group,
                    "deliveries": letter.deliveries,
                    "last_consumer": letter.last_consumer,
                    "reason": letter.reason,
                    "dead_at_ms": letter.dead_at_ms,
                    "envelope": orjson.Fragment(letter.envelope_json),
                }
                for letter in letters
            ],
            "next": letters[-1].id if letters else None,
        }
    )


async def _redrive(request: web.Request) -> web.Response:
    body = await _json_body(request, empty_ok=True)
    ids = _ids(body, required=False)
    max_entries = body.get("max", 100)
    # JSON has one number type: 5.0 is the integer 5; true is not a number.
    if isinstance(max_entries, float) and max_entries.is_integer():
        max_entries = int(max_entries)
    if (
        isinstance(max_entries, bool)
        or not isinstance(max_entries, int)
        or not 1 <= max_entries <= MAX_IDS
    ):
        raise MalformedRequest(f"max must be between 1 and {MAX_IDS}", reasons=("invalid_max",))
    moved = await request.app[CLIENT].redrive(
        request[_TENANT], request.match_info["topic"], ids, max_entries=max_entries
    )
    return _json(
        {
            "redriven": [
                {"dead_letter_id": r.dead_letter_id, "id": r.id} for r in moved if r.id is not None
            ],
            "missing": [r.dead_letter_id for r in moved if r.id is None],
        }
    )


# -- helpers -----------------------------------------------------------------------


def _delivery(delivery: Delivery) -> dict[str, Any]:
    return {
        "id": delivery.id,
        "deliveries": delivery.deliveries,
        # Stored validated JSON, spliced in without re-parsing.
        "envelope": orjson.Fragment(delivery.envelope_json),
    }


def _json(body: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type=_JSON, headers=headers)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


async def _json_body(request: web.Request, *, empty_ok: bool = False) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip() and empty_ok:
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise MalformedRequest("the body is not valid JSON", reasons=("invalid_json",)) from None
    if not isinstance(body, dict):
        raise MalformedRequest("the body must be a JSON object", reasons=("not_an_object",))
    return body


def _ids(body: dict[str, Any], *, required: bool) -> list[str] | None:
    if "ids" not in body and not required:
        return None
    ids = body.get("ids")
    if (
        not isinstance(ids, list)
        or not 1 <= len(ids) <= MAX_IDS
        or not all(isinstance(i, str) for i in ids)
    ):
        raise MalformedRequest(
            f"ids must be a list of 1 to {MAX_IDS} message ids", reasons=("invalid_ids",)
        )
    return ids


def _int_param(request: web.Request, name: str, default: int, *, upper: int | None = None) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise MalformedRequest(f"{name} must be an integer", reasons=(f"invalid_{name}",)) from None
    if value < 1 or (upper is not None and value > upper):
        bound = f" and {upper}" if upper is not None else ""
        raise MalformedRequest(f"{name} must be at least 1{bound}", reasons=(f"invalid_{name}",))
    return value


def _float_param(request: web.Request, name: str, default: float) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise MalformedRequest(f"{name} must be a number", reasons=(f"invalid_{name}",)) from None
    if value != value or value in (float("inf"), float("-inf")):  # NaN or infinite
        raise MalformedRequest(f"{name} must be a number", reasons=(f"invalid_{name}",))
    return value


def _idempotency_key(request: web.Request) -> str | None:
    values = request.headers.getall("Idempotency-Key", [])
    if not values:
        return None
    if len(values) > 1 or _IDEMPOTENCY_KEY_RE.fullmatch(values[0]) is None:
        raise MalformedRequest(
            "Idempotency-Key must be one value of 1-255 visible ASCII characters",
            reasons=("invalid_idempotency_key",),
        )
    return values[0]


def _trace_header(request: web.Request, name: str, pattern: re.Pattern[str]) -> str | None:
    """A W3C trace context header if well formed; a malformed one is ignored, as the spec says."""
    value = request.headers.get(name)
    if value is None or pattern.fullmatch(value) is None:
        return None
    return value
