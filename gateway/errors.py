"""The gateway's error hierarchy.

Every error carries a stable ``code`` (it becomes the problem ``type`` and
the metrics ``reason``), the HTTP ``status`` and a short ``title``. They are
turned into RFC 9457 problem+json only at the HTTP edge
(:mod:`gateway.problem`)::

    GatewayError
     ├── MalformedRequest          400 malformed-request
     ├── MalformedSignature        400 malformed-signature  (unparseable signature fields)
     ├── MissingSignature          401 missing-signature
     ├── BadSignature              401 bad-signature        (carries reasons)
     ├── StaleRequest              401 stale-request        (carries reasons)
     ├── MissingCredentials        401 missing-credentials  (carries reasons)
     ├── InvalidToken              401 invalid-token        (carries reasons)
     ├── NoRoute                   404 no-route
     ├── AgentNotFound             404 agent-not-found
     ├── MethodNotAllowed          405 method-not-allowed
     ├── ReplayedNonce             409 replayed-nonce
     ├── PayloadTooLarge           413 payload-too-large
     ├── AdminUnauthenticated      401 admin-unauthenticated
     ├── AdminForbidden            403 admin-forbidden
     ├── RateLimited               429 rate-limited         (carries reasons, retry_after)
     ├── InsufficientScope         403 insufficient-scope   (carries reasons)
     ├── TenantMismatch            403 tenant-mismatch
     ├── PolicyDenied              403 policy-denied        (carries reasons)
     ├── EgressDenied              403 egress-denied        (class gate or SSRF guard reasons)
     ├── PolicyUnavailable         503 policy-unavailable
     ├── DependencyUnavailable     503 dependency-unavailable
     ├── AgentUnavailable          503 agent-unavailable    (carries reasons)
     ├── AuditUnavailable          503 audit-unavailable    (no durable record: not forwarded)
     ├── CircuitOpen               503 circuit-open         (upstream failing: not tried)
     ├── UpstreamUnavailable       502 upstream-unavailable
     ├── UpstreamTimeout           504 upstream-timeout
     └── InternalError             500 internal-error

``detail`` must never contain a secret, a token or a stack trace: it is sent
to the client verbatim.
"""

from __future__ import annotations

import math

from problemjson import ProblemError

__all__ = [
    "AdminForbidden",
    "AdminUnauthenticated",
    "AgentNotFound",
    "AgentUnavailable",
    "AuditUnavailable",
    "BadSignature",
    "CircuitOpen",
    "DependencyUnavailable",
    "EgressDenied",
    "GatewayError",
    "InsufficientScope",
    "InternalError",
    "InvalidToken",
    "MalformedRequest",
    "MalformedSignature",
    "MethodNotAllowed",
    "MissingCredentials",
    "MissingSignature",
    "NoRoute",
    "PayloadTooLarge",
    "PolicyDenied",
    "PolicyUnavailable",
    "RateLimited",
    "ReplayedNonce",
    "StaleRequest",
    "TenantMismatch",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]


class GatewayError(ProblemError):
    """Base of every error that ends a request with a problem response."""


class MalformedRequest(GatewayError):
    code = "malformed-request"
    status = 400
    title = "Malformed request"


class MalformedSignature(GatewayError):
    code = "malformed-signature"
    status = 400
    title = "Malformed signature fields"


class MissingSignature(GatewayError):
    code = "missing-signature"
    status = 401
    title = "This route requires a signed request"


class BadSignature(GatewayError):
    code = "bad-signature"
    status = 401
    title = "The request signature does not verify"


class StaleRequest(GatewayError):
    code = "stale-request"
    status = 401
    title = "The request signature is not fresh"


class ReplayedNonce(GatewayError):
    code = "replayed-nonce"
    status = 409
    title = "This request was already seen"


class MissingCredentials(GatewayError):
    """The route needs a credential (bearer token or API key) the request lacks."""

    code = "missing-credentials"
    status = 401
    title = "Credentials required"


class InvalidToken(GatewayError):
    """A presented credential is malformed, unverifiable, expired or not for us."""

    code = "invalid-token"
    status = 401
    title = "Invalid credentials"


class InsufficientScope(GatewayError):
    code = "insufficient-scope"
    status = 403
    title = "Insufficient scope"


class TenantMismatch(GatewayError):
    """The credential's tenant is not the tenant that signed the request."""

    code = "tenant-mismatch"
    status = 403
    title = "Credential tenant does not match the signing tenant"


class NoRoute(GatewayError):
    code = "no-route"
    status = 404
    title = "No route matches this request"


class AgentNotFound(GatewayError):
    """The tenant has no agent with the id in the path (per the registry)."""

    code = "agent-not-found"
    status = 404
    title = "No such agent"


class MethodNotAllowed(GatewayError):
    code = "method-not-allowed"
    status = 405
    title = "Method not allowed"


class PayloadTooLarge(GatewayError):
    code = "payload-too-large"
    status = 413
    title = "Request body too large"


class AdminUnauthenticated(GatewayError):
    code = "admin-unauthenticated"
    status = 401
    title = "Admin API key missing or invalid"


class AdminForbidden(GatewayError):
    code = "admin-forbidden"
    status = 403
    title = "The admin role does not permit this action"


class RateLimited(GatewayError):
    """A quota is used up; reasons: tenant_limit, agent_limit, route_limit, anonymous_limit."""

    code = "rate-limited"
    status = 429
    title = "Too many requests"


class PolicyDenied(GatewayError):
    code = "policy-denied"
    status = 403
    title = "Denied by policy"


class EgressDenied(GatewayError):
    """Data may not leave for this destination: a policy reason (which ceiling was
    hit) or an SSRF-guard reason (``loopback``, ``private_address``, ``dns_failure`` ...)."""

    code = "egress-denied"
    status = 403
    title = "Egress denied"


class PolicyUnavailable(GatewayError):
    code = "policy-unavailable"
    status = 503
    title = "Policy engine unavailable"


class DependencyUnavailable(GatewayError):
    code = "dependency-unavailable"
    status = 503
    title = "A dependency is unavailable"


class AgentUnavailable(GatewayError):
    """No agent can take the request: stale or zombie, none healthy, or circuits open."""

    code = "agent-unavailable"
    status = 503
    title = "No agent available"


class AuditUnavailable(GatewayError):
    code = "audit-unavailable"
    status = 503
    title = "Audit log unavailable"


class CircuitOpen(GatewayError):
    """The route's circuit breaker is open: the upstream was not tried (Retry-After)."""

    code = "circuit-open"
    status = 503
    title = "Upstream circuit open"

    @classmethod
    def retry_in(cls, detail: str, seconds: float) -> CircuitOpen:
        """Reason ``circuit_open``; Retry-After: ``seconds`` rounded up, at least 1."""
        retry_after = str(max(math.ceil(seconds), 1))
        return cls(detail, reasons=("circuit_open",), headers={"Retry-After": retry_after})


class UpstreamUnavailable(GatewayError):
    code = "upstream-unavailable"
    status = 502
    title = "Upstream unavailable"


class UpstreamTimeout(GatewayError):
    code = "upstream-timeout"
    status = 504
    title = "Upstream timed out"


class InternalError(GatewayError):
    code = "internal-error"
    status = 500
    title = "Internal error"
