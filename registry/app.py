"""The registry's HTTP API (aiohttp).

=======  =============================  ==============================================
method   path                           what
=======  =============================  ==============================================
POST     /agents                        register (201, relative ``Location``); 409 if taken
GET      /agents                        list: ``capability``, ``status``, ``limit``, ``cursor``
GET      /agents/{id}                   one agent; 404 if unknown
PATCH    /agents/{id}                   change name, version, capabilities, endpoint_url,
                                        labels, weight
DELETE   /agents/{id}                   deregister (204)
POST     /agents/{id}/heartbeat         the agent is alive (200, the agent, now healthy)
GET      /admin/agents                  admin key only: every tenant's agents (``tenant`` filter)
GET      /health                        liveness
GET      /_readyz                       PostgreSQL reachable; outbox backlog
GET      /openapi.json                  this API's OpenAPI 3.1 document
=======  =============================  ==============================================

The tenant is the ``X-Nops-Tenant`` header that the gateway sets from the
caller's verified identity (and strips from what callers send); without it,
401. Every query is scoped to that tenant: another tenant's agent is simply
not found. Every error is RFC 9457 problem+json with the type
``urn:nops:registry:problem:<code>`` (:mod:`registry.errors`); invalid input
is a 4xx, never a 500; PostgreSQL trouble is a 503.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any, Final

import aiohttp
import asyncpg
import orjson
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from problemjson import PROBLEM_CONTENT_TYPE, problem_response
from registry.db import STORE_ERRORS, create_pool
from registry.errors import (
    AdminRequired,
    AgentNotFound,
    InternalError,
    InvalidCapability,
    InvalidQuery,
    MalformedBody,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RegistryError,
    StoreUnavailable,
    TenantRequired,
    UnsupportedMediaType,
)
from registry.migrate import migrate_up
from registry.model import (
    STATUSES,
    Agent,
    Status,
    parse_patch,
    parse_registration,
    validate_agent_id,
    validate_capability,
    validate_tenant,
)
from registry.outbox import EventPublisher, HttpBusPublisher, LogPublisher, OutboxRelay
from registry.settings import ADMIN_KEY_HEADER, TENANT_HEADER, RegistrySettings
from registry.status import Sweeper
from registry.store import AgentPage, AgentStore

__all__ = [
    "PROBLEM_CONTENT_TYPE",
    "PROBLEM_TYPE_BASE",
    "RELAY",
    "SETTINGS",
    "STORE",
    "SWEEPER",
    "create_app",
]

_log = logging.getLogger("registry.request")

PROBLEM_TYPE_BASE: Final = "urn:nops:registry:problem:"

SETTINGS: Final = web.AppKey("settings", RegistrySettings)
STORE: Final = web.AppKey("store", AgentStore)
SWEEPER: Final = web.AppKey("sweeper", Sweeper)
RELAY: Final = web.AppKey("relay", OutboxRelay)
_POOL: Final[web.AppKey[asyncpg.Pool[asyncpg.Record]]] = web.AppKey("pool")
_REQUEST_ID: Final = web.RequestKey("request_id", str)
_TENANT_SEEN: Final = web.RequestKey("tenant", str)

_JSON_TYPES: Final = frozenset({"application/json", "application/merge-patch+json"})
_REQUEST_ID_SHAPE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_LIST_PARAMS: Final = frozenset({"capability", "status", "limit", "cursor"})
_ADMIN_LIST_PARAMS: Final = _LIST_PARAMS | {"tenant"}
_MAX_CURSOR: Final = 512
#: The API contract, served at /openapi.json (and by the gateway at /_openapi/registry.json).
OPENAPI_DOCUMENT: Final = resources.files("registry").joinpath("openapi/registry.json").read_bytes()
_HTTP_ERRORS: Final[dict[int, type[RegistryError]]] = {
    400: MalformedBody,
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
}


def create_app(
    settings: RegistrySettings,
    *,
    clock: Callable[[], float] = time.time,
    publisher: EventPublisher | None = None,
    background: bool = True,
) -> web.Application:
    """The registry application. ``background=False`` leaves the sweeper and the
    outbox relay to the caller (tests drive them on a pinned clock)."""
    app = web.Application(middlewares=[_edge], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app.on_response_prepare.append(_server_header)

    async def database(app: web.Application) -> AsyncIterator[None]:
        pool = await create_pool(settings.dsn, max_size=settings.pool_max_size)
        try:
            if settings.migrate:
                async with pool.acquire() as conn:
                    applied = await migrate_up(conn)
                if applied:
                    logging.getLogger("registry.migrate").info(
                        "migrations applied", extra={"versions": applied}
                    )
            app[_POOL] = pool
            yield
        finally:
            await pool.close()

    async def workers(app: web.Application) -> AsyncIterator[None]:
        pool = app[_POOL]
        session: aiohttp.ClientSession | None = None
        chosen = publisher
        if chosen is None and settings.bus_url:
            session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
            chosen = HttpBusPublisher(session, settings.bus_url, timeout_s=settings.bus_timeout_s)
        relay = OutboxRelay(
            pool,
            chosen or LogPublisher(),
            clock=clock,
            batch_size=settings.outbox_batch,
            idle_s=settings.outbox_idle_s,
            backoff_base_s=settings.outbox_backoff_base_s,
            backoff_max_s=settings.outbox_backoff_max_s,
        )
        sweeper = Sweeper(
            pool,
            settings.status,
            clock=clock,
            interval_s=settings.sweep_interval_s,
            batch_size=settings.sweep_batch,
        )
        app[RELAY] = relay
        app[SWEEPER] = sweeper
        app[STORE] = AgentStore(
            pool, policy=settings.status, clock=clock, topic=settings.topic, on_event=relay.wake
        )
        if background:
            relay.start()
            sweeper.start()
        try:
            yield
        finally:
            await sweeper.close()
            await relay.close()
            if session is not None:
                await session.close()

    app.cleanup_ctx.append(database)
    app.cleanup_ctx.append(workers)
    app.router.add_post("/agents", _register)
    app.router.add_get("/agents", _list, allow_head=False)
    app.router.add_get("/agents/{id}", _get, allow_head=False)
    app.router.add_patch("/agents/{id}", _patch)
    app.router.add_delete("/agents/{id}", _delete)
    app.router.add_post("/agents/{id}/heartbeat", _heartbeat)
    app.router.add_get("/admin/agents", _admin_list, allow_head=False)
    app.router.add_get("/health", _health, allow_head=False)
    app.router.add_get("/_readyz", _readyz, allow_head=False)
    app.router.add_get("/openapi.json", _openapi, allow_head=False)
    return app


# -- handlers --------------------------------------------------------------------------


async def _register(request: web.Request) -> web.Response:
    tenant = _tenant(request)
    spec = parse_registration(await _body(request), request.app[SETTINGS].limits)
    agent = await request.app[STORE].register(tenant, spec)
    # Relative, so it resolves right both here (/agents) and behind the
    # gateway's prefix (/registry/agents -> /registry/agents/{id}).
    return _json(agent.to_json(), status=201, headers={hdrs.LOCATION: f"agents/{agent.id}"})


async def _get(request: web.Request) -> web.Response:
    tenant = _tenant(request)
    agent_id = _agent_id(request)
    return _agent_json(await request.app[STORE].get(tenant, agent_id), agent_id)


async def _list(request: web.Request) -> web.Response:
    tenant = _tenant(request)
    query = _query(request, _LIST_PARAMS)
    page = await request.app[STORE].list_agents(tenant, **query)
    return _page_json(page)


async def _patch(request: web.Request) -> web.Response:
    tenant = _tenant(request)
    agent_id = _agent_id(request)
    changes = parse_patch(await _body(request), request.app[SETTINGS].limits)
    return _agent_json(await request.app[STORE].update(tenant, agent_id, changes), agent_id)


async def _delete(request: web.Request) -> web.Response:
    tenant = _tenant(request)
    agent_id = _agent_id(request)
    if await request.app[STORE].deregister(tenant, agent_id) is None:
        raise _not_found(agent_id)
    return web.Response(status=204)


async def _heartbeat(request: web.Request) -> web.Response:
    tenant = _tenant(request)
    agent_id = _agent_id(request)
    return _agent_json(await request.app[STORE].heartbeat(tenant, agent_id), agent_id)


async def _admin_list(request: web.Request) -> web.Response:
    _require_admin(request)
    query = _query(request, _ADMIN_LIST_PARAMS)
    tenant = query.pop("tenant", None)
    page = await request.app[STORE].list_all(tenant=tenant, **query)
    return _page_json(page)


async def _health(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def _openapi(request: web.Request) -> web.Response:
    """This service's OpenAPI document (``registry/openapi/registry.json``)."""
    return web.Response(body=OPENAPI_DOCUMENT, content_type="application/json")


async def _readyz(request: web.Request) -> web.Response:
    pending = await request.app[RELAY].pending()
    return _json({"status": "ready", "checks": {"postgres": "ok"}, "outbox_pending": pending})


# -- request parts ---------------------------------------------------------------------


def _tenant(request: web.Request) -> str:
    values = request.headers.getall(TENANT_HEADER, [])
    if not values or not values[0]:
        raise TenantRequired(
            f"no {TENANT_HEADER}: call the registry through the gateway", reasons=("no_tenant",)
        )
    if len(values) > 1:
        raise TenantRequired(f"more than one {TENANT_HEADER}", reasons=("ambiguous_tenant",))
    tenant = validate_tenant(values[0])
    request[_TENANT_SEEN] = tenant
    return tenant


def _require_admin(request: web.Request) -> None:
    digest = request.app[SETTINGS].admin_key_sha256
    if not digest:
        raise AdminRequired("the admin API is not enabled", reasons=("admin_disabled",))
    presented = request.headers.get(ADMIN_KEY_HEADER, "")
    got = hashlib.sha256(presented.encode()).hexdigest()
    # SECURITY: constant-time; the key itself is never logged or echoed.
    if not presented or not hmac.compare_digest(got, digest):
        raise AdminRequired("a valid admin key is required", reasons=("admin_key_invalid",))


def _agent_id(request: web.Request) -> str:
    return validate_agent_id(request.match_info["id"])


def _not_found(agent_id: str) -> AgentNotFound:
    return AgentNotFound(f"no agent {agent_id!r} in this tenant", field="id")


def _agent_json(agent: Agent | None, agent_id: str) -> web.Response:
    """The agent as JSON; :class:`AgentNotFound` if there is none."""
    if agent is None:
        raise _not_found(agent_id)
    return _json(agent.to_json())


def _page_json(page: AgentPage) -> web.Response:
    return _json({"agents": [a.to_json() for a in page.agents], "next_cursor": page.next_cursor})


async def _body(request: web.Request) -> Any:
    if request.content_type not in _JSON_TYPES:
        raise UnsupportedMediaType("send application/json")
    raw = await request.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise MalformedBody("the body is not valid JSON") from None


def _query(request: web.Request, allowed: frozenset[str]) -> dict[str, Any]:
    query = request.rel_url.query
    out: dict[str, Any] = {}
    for name in query:
        if name not in allowed:
            raise InvalidQuery(f"unknown parameter {name[:64]!r}", field=name[:64])
        if len(query.getall(name)) > 1:
            raise InvalidQuery(f"{name} given more than once", field=name)
    if "capability" in query:
        try:
            out["capability"] = validate_capability(query["capability"])
        except InvalidCapability as exc:
            raise InvalidQuery(exc.detail, field="capability") from None
    if "status" in query:
        status = query["status"]
        if status not in STATUSES:
            raise InvalidQuery(f"status must be one of {', '.join(STATUSES)}", field="status")
        out["status"] = _status(status)
    if "limit" in query:
        maximum = request.app[SETTINGS].max_page
        raw = query["limit"]
        if not raw.isdigit() or not 1 <= int(raw) <= maximum:
            raise InvalidQuery(f"limit must be an integer from 1 to {maximum}", field="limit")
        out["limit"] = int(raw)
    if "cursor" in query:
        if len(query["cursor"]) > _MAX_CURSOR:
            raise InvalidQuery("cursor is too long", field="cursor")
        out["cursor"] = query["cursor"]
    if "tenant" in query:
        out["tenant"] = validate_tenant(query["tenant"])
    return out


def _status(value: str) -> Status:
    for status in STATUSES:
        if status == value:
            return status
    raise InvalidQuery("unknown status", field="status")


def _json(body: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


# -- the edge --------------------------------------------------------------------------


@web.middleware
async def _edge(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, problem+json for every error, one log line per request."""
    started = time.monotonic()
    offered = request.headers.get("X-Request-Id", "")
    request_id = offered if _REQUEST_ID_SHAPE.fullmatch(offered) else uuid.uuid4().hex
    request[_REQUEST_ID] = request_id
    error: RegistryError | None = None
    allow: str | None = None
    try:
        response = await handler(request)
    except RegistryError as exc:
        error = exc
    except web.HTTPException as exc:
        error = _from_http(exc)
        allow = exc.headers.get(hdrs.ALLOW)
    except (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError) as exc:
        # Validation runs first; reaching here means a rule is missing there.
        _log.warning(
            "input passed validation but not the schema",
            extra={"sqlstate": exc.sqlstate, "constraint": getattr(exc, "constraint_name", None)},
        )
        error = MalformedBody("the store refused a value in this request")
    except STORE_ERRORS as exc:
        _log.warning("store unavailable", extra={"error": type(exc).__name__})
        error = StoreUnavailable("the registry's database is unavailable; retry later")
    except Exception:  # noqa: BLE001 - the edge turns any failure into a 500 problem
        _log.exception("unhandled error")
        error = InternalError("the registry failed to handle this request")
    if error is not None:
        response = _problem(error, request_id)
        if allow is not None:
            response.headers[hdrs.ALLOW] = allow
    response.headers["X-Request-Id"] = request_id
    _log.info(
        "request",
        extra={
            "method": request.method,
            "path": request.path,
            "status": response.status,
            "tenant": request.get(_TENANT_SEEN),
            "error": error.code if error else None,
            "duration_ms": round((time.monotonic() - started) * 1000, 3),
            "request_id": request_id,
        },
    )
    return response


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    # No product or version disclosure (aiohttp would name itself and Python).
    response.headers[hdrs.SERVER] = "nops-registry"


def _from_http(exc: web.HTTPException) -> RegistryError:
    cls = _HTTP_ERRORS.get(exc.status)
    if cls is None:
        return InternalError(exc.reason)
    return cls()


def _problem(error: RegistryError, request_id: str) -> web.Response:
    return problem_response(error, request_id=request_id, type_base=PROBLEM_TYPE_BASE)
