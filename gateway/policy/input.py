"""Build the versioned policy input document (schema: schemas/policy-input.v1.json)."""

from __future__ import annotations

from typing import Any, Final

from gateway.context import RequestContext

__all__ = ["INPUT_VERSION", "build_input"]

INPUT_VERSION: Final = 1


def build_input(ctx: RequestContext) -> dict[str, Any]:
    """The document the policy sees; nothing secret (no tokens, no signatures)."""
    request = ctx.request
    route = ctx.route
    tenant = ctx.tenant
    subject = ctx.subject
    egress = ctx.egress_target
    query: dict[str, list[str]] = {}
    for key, value in request.rel_url.query.items():
        query.setdefault(key, []).append(value)
    return {
        "version": INPUT_VERSION,
        "request": {
            "method": request.method,
            "path": request.path,
            "route": route.name if route else None,
            "query": query,
        },
        "tenant": {"id": tenant.id, "tier": tenant.tier} if tenant else {"id": None, "tier": None},
        "subject": {
            "sub": subject.sub,
            "scopes": list(subject.scopes),
            "roles": list(subject.roles),
            "agent_id": subject.agent_id,
        },
        "signature": {
            "keyid": ctx.signature.get("keyid"),
            "alg": ctx.signature.get("alg"),
            "created": ctx.signature.get("created"),
        },
        "target": {
            "kind": route.kind if route else "upstream",
            # An agent route names the agent id, or "capability:<name>".
            # An egress route names the destination; the classification is its class.
            "destination": (
                egress.destination
                if egress is not None
                else ctx.agent_target.destination
                if ctx.agent_target is not None
                else route.name
                if route
                else None
            ),
            "classification": (
                egress.classification(tenant.id if tenant else None) if egress else None
            ),
        },
        "source": {"ip": ctx.client_ip},
    }
