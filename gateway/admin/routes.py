"""The admin API under ``/_admin/``: each route names the (object, action) it needs.

| route | permission | role from |
| --- | --- | --- |
| ``GET  /_admin/whoami`` | self read | VIEWER |
| ``GET  /_admin/policy`` | policy read | VIEWER |
| ``GET  /_admin/tenants`` | tenants read | VIEWER |
| ``POST /_admin/policy/cache/flush`` | cache flush | OPERATOR |
| ``GET  /_admin/registry/agents`` | registry read | OPERATOR |
| ``GET  /_admin/keys`` | keys read | ADMIN |
| ``GET  /_admin/rbac`` | rbac read | SUPER_ADMIN |

Every answer is JSON; every refusal is problem+json (401
``admin-unauthenticated``, 403 ``admin-forbidden``). None of them needs OPA:
what OPA would have said is reported as unavailable when it is down.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, Final

import aiohttp
import orjson
from aiohttp import hdrs, web

from gateway.admin.auth import AdminAuthenticator, AdminPrincipal
from gateway.admin.rbac import ROLES, Rbac
from gateway.config import Config
from gateway.context import REQUEST_CONTEXT
from gateway.errors import AdminForbidden, DependencyUnavailable, NoRoute
from gateway.metrics import Metrics
from gateway.policy.engine import PolicyEngineError
from gateway.policy.stack import POLICY_STACK, PolicyStack

__all__ = ["ADMIN_PREFIX", "register_admin_routes"]

_log = logging.getLogger("gateway.admin")

ADMIN_PREFIX: Final = "/_admin"
#: Query parameters passed through to the registry's admin listing.
_REGISTRY_QUERY: Final = frozenset({"tenant", "status", "capability", "limit", "cursor"})

Handler = Callable[[web.Request, AdminPrincipal], Awaitable[Any]]


def register_admin_routes(app: web.Application, config: Config, metrics: Metrics) -> None:
    """Add the admin routes; call before the catch-all proxy route.

    Whatever else is under ``/_admin/`` (an unknown path, another method, or
    everything when the admin plane is disabled) is a 404 problem: the admin
    namespace is never proxied upstream.
    """
    if config.admin.enabled:
        _add_routes(app, config, metrics)
    # SECURITY: nothing under /_admin/ ever reaches the pipeline or an upstream.
    app.router.add_route("*", ADMIN_PREFIX + "{tail:(/.*)?}", _no_admin_route)


async def _no_admin_route(request: web.Request) -> web.StreamResponse:
    request[REQUEST_CONTEXT].stage = "admin"
    raise NoRoute("no admin endpoint for this method and path")


def _add_routes(app: web.Application, config: Config, metrics: Metrics) -> None:
    admin = _Admin(config, metrics, AdminAuthenticator(config.admin.keys), Rbac())
    routes: list[tuple[str, str, str, str, Handler]] = [
        ("GET", "/whoami", "self", "read", admin.whoami),
        ("GET", "/policy", "policy", "read", admin.policy),
        ("GET", "/tenants", "tenants", "read", admin.tenants),
        ("POST", "/policy/cache/flush", "cache", "flush", admin.flush_cache),
        ("GET", "/registry/agents", "registry", "read", admin.registry_agents),
        ("GET", "/keys", "keys", "read", admin.keys),
        ("GET", "/rbac", "rbac", "read", admin.rbac_table),
    ]
    for method, path, obj, action, handler in routes:
        app.router.add_route(method, ADMIN_PREFIX + path, admin.guard(obj, action, handler))


class _Admin:
    def __init__(
        self, config: Config, metrics: Metrics, auth: AdminAuthenticator, rbac: Rbac
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._auth = auth
        self._rbac = rbac

    def guard(self, obj: str, action: str, handler: Handler) -> Callable[..., Any]:
        async def guarded(request: web.Request) -> web.StreamResponse:
            ctx = request[REQUEST_CONTEXT]
            ctx.stage = "admin"
            principal = self._auth.authenticate(request.headers.get(hdrs.AUTHORIZATION))
            allowed = self._rbac.allowed(principal.role, obj, action)
            _log.info(
                "admin request",
                extra={
                    "admin_key_id": principal.key_id,
                    "admin_role": principal.role,
                    "permission": f"{obj}:{action}",
                    "allowed": allowed,
                },
            )
            if not allowed:
                raise AdminForbidden(
                    f"role {principal.role} may not {action} {obj}",
                    extra={"required": f"{obj}:{action}"},
                )
            body = await handler(request, principal)
            return web.Response(body=orjson.dumps(body), content_type="application/json")

        return guarded

    async def registry_agents(self, request: web.Request, principal: AdminPrincipal) -> Any:
        """Every tenant's agents from the registry's admin API (``tenant`` and paging pass)."""
        settings = self._config.admin
        if not settings.registry_url:
            raise NoRoute("registry admin is not configured (admin.registry_url)")
        secret = os.environ.get(settings.registry_key_env, "")
        if not secret:
            raise DependencyUnavailable(
                "the registry admin key is not set", reasons=("registry_admin_key_missing",)
            )
        query = {k: v for k, v in request.query.items() if k in _REGISTRY_QUERY}
        url = settings.registry_url.rstrip("/") + "/admin/agents"
        try:
            async with (
                aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session,
                session.get(
                    url,
                    params=query,
                    # SECURITY: the registry's admin key, never logged or echoed.
                    headers={"X-Nops-Admin-Key": secret},
                    timeout=aiohttp.ClientTimeout(total=5),
                    allow_redirects=False,
                ) as response,
            ):
                if response.status != 200:
                    raise DependencyUnavailable(
                        f"the registry answered {response.status}",
                        reasons=("registry_refused",),
                    )
                return await response.json()
        except (aiohttp.ClientError, TimeoutError):
            raise DependencyUnavailable(
                "the registry is unreachable", reasons=("registry_unavailable",)
            ) from None

    async def whoami(self, request: web.Request, principal: AdminPrincipal) -> Any:
        return {
            "key_id": principal.key_id,
            "role": principal.role,
            "permissions": [f"{o}:{a}" for o, a in self._rbac.permissions(principal.role)],
        }

    async def policy(self, request: web.Request, principal: AdminPrincipal) -> Any:
        stack = request.app[POLICY_STACK]
        return {
            "engine": self._config.policy.engine,
            "decision_path": self._config.policy.decision_path,
            "opa": await _opa_status(stack),
            "cache": _cache_status(stack),
            "shadow": self._shadow_status(stack),
        }

    async def tenants(self, request: web.Request, principal: AdminPrincipal) -> Any:
        """Configured tenants (always); egress ceilings from the policy data, if OPA answers."""
        stack = request.app[POLICY_STACK]
        try:
            data = await stack.opa.data("nops/tenants")
            policy_data = "ok"
        except PolicyEngineError:
            data, policy_data = None, "unavailable"
        in_policy = data if isinstance(data, dict) else {}
        configured = {tenant.id: tenant for tenant in self._config.tenants}
        tenants = []
        for tenant_id in sorted(configured.keys() | in_policy.keys()):
            tenant = configured.get(tenant_id)
            tenants.append(
                {
                    "id": tenant_id,
                    "configured": tenant is not None,
                    "tier": tenant.tier if tenant else None,
                    "keyids": [k.keyid for k in tenant.keys] if tenant else [],
                    "egress_ceiling": _field(in_policy.get(tenant_id), "egress_ceiling"),
                }
            )
        return {"tenants": tenants, "policy_data": policy_data}

    async def flush_cache(self, request: web.Request, principal: AdminPrincipal) -> Any:
        cache = request.app[POLICY_STACK].cache
        if cache is None:
            return {"flushed": 0, "cache": "disabled"}
        dropped = cache.flush(why=f"admin {principal.key_id}")
        return {"flushed": dropped, "cache": "enabled"}

    async def keys(self, request: web.Request, principal: AdminPrincipal) -> Any:
        # SECURITY: ids, owners and validity only; never a secret, hash or where one lives.
        config = self._config
        return {
            "admin_keys": [{"id": k.id, "role": k.role} for k in config.admin.keys],
            "tenant_keys": [
                {
                    "tenant": tenant.id,
                    "keyid": key.keyid,
                    "alg": key.alg,
                    "not_before": key.not_before or None,
                    "not_after": key.not_after or None,
                    "agent_id": key.agent_id or None,
                }
                for tenant in config.tenants
                for key in tenant.keys
            ],
            "api_keys": [
                {
                    "id": key.id,
                    "tenant": key.tenant,
                    "agent_id": key.agent_id,
                    "scopes": list(key.scopes),
                    "roles": list(key.roles),
                }
                for key in config.api_keys
            ],
        }

    async def rbac_table(self, request: web.Request, principal: AdminPrincipal) -> Any:
        return {
            "roles": {role: [f"{o}:{a}" for o, a in self._rbac.permissions(role)] for role in ROLES}
        }

    def _shadow_status(self, stack: PolicyStack) -> dict[str, Any]:
        shadow = self._config.policy.shadow
        return {
            "enabled": stack.shadow is not None,
            "decision_path": shadow.decision_path if stack.shadow is not None else None,
            "evaluations": dict(self._metrics.shadow_evaluations),
            "disagreements": [
                {"enforced_allow": e, "shadow_allow": s, "reason": r, "count": n}
                for (e, s, r), n in sorted(self._metrics.shadow_disagreements.items())
            ],
        }


async def _opa_status(stack: PolicyStack) -> dict[str, Any]:
    try:
        revision = await stack.opa.revision()
    except PolicyEngineError:
        return {"url": stack.opa.url, "reachable": False, "revision": None}
    return {"url": stack.opa.url, "reachable": True, "revision": revision}


def _cache_status(stack: PolicyStack) -> dict[str, Any]:
    if stack.cache is None:
        return {"enabled": False}
    stats = stack.cache.stats()
    return {
        "enabled": True,
        "revision": stats.revision,
        "entries": stats.entries,
        "tenants": stats.tenants,
        "hits": stats.hits,
        "misses": stats.misses,
        "uncacheable": stats.uncacheable,
        "flushes": stats.flushes,
        "evictions": stats.evictions,
    }


def _field(entry: Any, name: str) -> Any:
    return entry.get(name) if isinstance(entry, dict) else None
