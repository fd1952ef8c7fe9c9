"""The per-request context that pipeline stages read and enrich."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from gateway.agents import AgentTarget
    from gateway.config import RouteConfig
    from gateway.egress_route import EgressTarget
    from gateway.policy.engine import Decision
    from gateway.ratelimits import TakeResult

__all__ = ["REQUEST_CONTEXT", "RequestContext", "Subject", "Tenant"]


@dataclass(slots=True)
class Tenant:
    id: str
    tier: str | None = None


@dataclass(slots=True)
class Subject:
    sub: str | None = None
    scopes: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    agent_id: str | None = None


@dataclass(slots=True)
class RequestContext:
    """What the pipeline knows about one request; stages fill it in order."""

    request: web.Request
    request_id: str
    client_ip: str
    started: float = field(default_factory=time.monotonic)
    #: The stage running now, or the stage that ended the request.
    stage: str = "intake"
    route: RouteConfig | None = None
    tenant: Tenant | None = None
    subject: Subject = field(default_factory=Subject)
    #: The quotas taken in the freshness stage's one Redis call with the nonce
    #: claim; the ratelimit stage then applies this instead of taking again.
    quotas_taken: TakeResult | None = None
    #: Signature parameters once the signature stage verified them.
    signature: dict[str, Any] = field(default_factory=dict)
    #: The request body when a stage had to read it whole (to check its
    #: digest); the proxy then sends these bytes instead of streaming.
    body: bytes | None = None
    decision: Decision | None = None
    #: The policy input document the decision stage sent (for the audit digest).
    policy_input: dict[str, Any] | None = None
    #: Sequence number of this request's audit record, once durable.
    audit_seq: int | None = None
    upstream_status: int | None = None
    #: On an agent route: the agent or capability the path names (set by intake).
    agent_target: AgentTarget | None = None
    #: On an egress route: the destination, path and class (set by intake).
    egress_target: EgressTarget | None = None
    #: Report mode: the class-gate reasons that enforce mode would have denied.
    egress_would_deny: tuple[str, ...] = ()
    #: Header fields a stage wants on the response, whichever it is (proxied or
    #: problem); appended by the edge's ``on_response_prepare`` hook.
    response_headers: dict[str, str] = field(default_factory=dict)
    #: Set by the edge when its ``finally`` ran, and by ``on_response_prepare``
    #: when headers went out: whichever comes second unlinks the context from
    #: the request (see :func:`gateway.middleware.release_context`).
    edge_done: bool = False
    response_prepared: bool = False


#: Request-scoped key under which the middleware stores the context.
REQUEST_CONTEXT: web.RequestKey[RequestContext] = web.RequestKey("request_context", RequestContext)
