"""The ``identity`` stage: who is calling, bound to the tenant that signed the request.

The route's ``auth`` says which credential it takes, in the ``Authorization``
header: ``Bearer <jwt>`` (:mod:`gateway.tokens`), ``ApiKey <id>.<secret>``
(:mod:`gateway.apikeys`), either, or none. A verified credential sets
``ctx.subject``; its tenant must equal the signer's (``ctx.tenant``), or
becomes ``ctx.tenant`` on a route without a signature; then the route's
``scopes`` must all be granted.

Denials: 401 ``missing-credentials`` (none, or not one this route takes),
401 ``invalid-token`` (with the reason from the validator), 403
``tenant-mismatch``, 403 ``insufficient-scope``, 503 ``dependency-unavailable``
when an issuer's keys were never loadable. 401s carry an RFC 6750 challenge.
No credential, not even part of one, is logged: only the reason, the
configured issuer, the ``kid`` and the API key id.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

from aiohttp import hdrs, web

from gateway.apikeys import ApiKeyRejected, ApiKeyStore
from gateway.config import RouteConfig
from gateway.context import RequestContext, Subject, Tenant
from gateway.errors import (
    DependencyUnavailable,
    InsufficientScope,
    InvalidToken,
    MalformedRequest,
    MissingCredentials,
    TenantMismatch,
)
from gateway.jwks import JwksUnavailable
from gateway.tokens import TokenRejected, TokenValidator, build_validator

if TYPE_CHECKING:
    from gateway.pipeline import PipelineDeps

__all__ = ["Identity", "build"]

_log = logging.getLogger("gateway.identity")

_REALM: Final = 'realm="nops-gateway"'
_CHALLENGES: Final = {
    "jwt": f"Bearer {_REALM}",
    "api_key": f"ApiKey {_REALM}",
    "jwt_or_api_key": f"Bearer {_REALM}, ApiKey {_REALM}",
}
_TAKES_JWT: Final = frozenset({"jwt", "jwt_or_api_key"})
_TAKES_API_KEY: Final = frozenset({"api_key", "jwt_or_api_key"})


class Identity:
    name = "identity"

    def __init__(self, tokens: TokenValidator, api_keys: ApiKeyStore) -> None:
        self._tokens = tokens
        self._api_keys = api_keys

    async def run(self, ctx: RequestContext) -> web.StreamResponse | None:
        route = ctx.route
        if route is None or route.auth == "none":
            return None
        scheme, credential = _authorization(ctx.request, route)
        signed_agent = ctx.subject.agent_id
        if scheme == "bearer" and route.auth in _TAKES_JWT:
            tenant, ctx.subject = await self._bearer(credential)
        elif scheme == "apikey" and route.auth in _TAKES_API_KEY:
            tenant, ctx.subject = self._api_key(credential)
        else:
            reason = {"bearer": "bearer_not_accepted", "apikey": "api_key_not_accepted"}.get(
                scheme, "unsupported_scheme"
            )
            raise MissingCredentials(
                "this route does not accept that kind of credential",
                reasons=(reason,),
                headers={hdrs.WWW_AUTHENTICATE: _CHALLENGES[route.auth]},
            )
        if ctx.tenant is None:
            ctx.tenant = Tenant(id=tenant)
        elif ctx.tenant.id != tenant:
            raise TenantMismatch(
                "the credential belongs to another tenant than the request's signer",
                reasons=("tenant_mismatch",),
            )
        if signed_agent is not None:
            if ctx.subject.agent_id not in (None, signed_agent):
                raise TenantMismatch(
                    "the credential names another agent than the request's signing key",
                    reasons=("agent_mismatch",),
                )
            ctx.subject.agent_id = signed_agent
        missing = [scope for scope in route.scopes if scope not in ctx.subject.scopes]
        if missing:
            headers: dict[str, str] = {}
            if scheme == "bearer":
                headers[hdrs.WWW_AUTHENTICATE] = (
                    f'Bearer {_REALM}, error="insufficient_scope", scope="{" ".join(route.scopes)}"'
                )
            raise InsufficientScope(
                "the credential lacks a scope this route requires",
                reasons=("missing_scope",),
                extra={"required_scopes": list(route.scopes)},
                headers=headers,
            )
        return None

    async def close(self) -> None:
        await self._tokens.close()

    async def _bearer(self, token: str) -> tuple[str, Subject]:
        try:
            verified = await self._tokens.validate(token)
        except TokenRejected as exc:
            _log.info(
                "bearer token rejected",
                extra={"reason": exc.reason, "issuer": exc.issuer, "kid": exc.kid},
            )
            raise InvalidToken(
                "the bearer token is not valid",
                reasons=(exc.reason,),
                headers={hdrs.WWW_AUTHENTICATE: f'Bearer {_REALM}, error="invalid_token"'},
            ) from None
        except JwksUnavailable as exc:
            # SECURITY: fail closed; the caller is not at fault, so not a 401.
            raise DependencyUnavailable(
                "the token issuer's keys are unavailable", reasons=("jwks_unavailable",)
            ) from exc
        subject = Subject(
            sub=verified.sub,
            scopes=verified.scopes,
            roles=verified.roles,
            agent_id=verified.agent_id,
        )
        return verified.tenant, subject

    def _api_key(self, credential: str) -> tuple[str, Subject]:
        try:
            key = self._api_keys.verify(credential)
        except ApiKeyRejected as exc:
            _log.info("API key rejected", extra={"reason": exc.reason, "key_id": exc.key_id})
            raise InvalidToken(
                "the API key is not valid",
                reasons=(exc.reason,),
                headers={hdrs.WWW_AUTHENTICATE: f'ApiKey {_REALM}, error="invalid_token"'},
            ) from None
        subject = Subject(sub=key.id, scopes=key.scopes, roles=key.roles, agent_id=key.agent_id)
        return key.tenant, subject


def _authorization(request: web.Request, route: RouteConfig) -> tuple[str, str]:
    """The lower-cased scheme and the credential of the one ``Authorization`` field."""
    values = request.headers.getall(hdrs.AUTHORIZATION, [])
    if not values:
        raise MissingCredentials(
            "this route requires credentials",
            reasons=("no_credentials",),
            headers={hdrs.WWW_AUTHENTICATE: _CHALLENGES[route.auth]},
        )
    if len(values) > 1:
        raise MalformedRequest("more than one Authorization header", reasons=("ambiguous",))
    scheme, _, credential = values[0].strip().partition(" ")
    return scheme.lower(), credential.strip()


def build(deps: PipelineDeps) -> Identity:
    tokens = build_validator(deps.config.identity, session=deps.http, clock=deps.clock)
    return Identity(tokens, ApiKeyStore(deps.config.api_keys))
