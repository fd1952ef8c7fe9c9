"""The gateway's error hierarchy.

Every error carries a stable ``code`` (it becomes the problem ``type`` and
the metrics ``reason``), the HTTP ``status`` and a short ``title``. They are
turned into RFC 9457 problem+json only at the HTTP edge
(:mod:`gateway.problem`)::

    GatewayError
     ├── MalformedRequest          400 malformed-request
     ├── NoRoute                   404 no-route
     ├── MethodNotAllowed          405 method-not-allowed
     ├── PayloadTooLarge           413 payload-too-large
     ├── PolicyDenied              403 policy-denied        (carries reasons)
     ├── PolicyUnavailable         503 policy-unavailable
     ├── DependencyUnavailable     503 dependency-unavailable
     ├── AuditUnavailable          503 audit-unavailable    (no durable record: not forwarded)
     ├── UpstreamUnavailable       502 upstream-unavailable
     ├── UpstreamTimeout           504 upstream-timeout
     └── InternalError             500 internal-error

``detail`` must never contain a secret, a token or a stack trace: it is sent
to the client verbatim.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

__all__ = [
    "AuditUnavailable",
    "DependencyUnavailable",
    "GatewayError",
    "InternalError",
    "MalformedRequest",
    "MethodNotAllowed",
    "NoRoute",
    "PayloadTooLarge",
    "PolicyDenied",
    "PolicyUnavailable",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]


class GatewayError(Exception):
    """Base of every error that ends a request with a problem response."""

    code: ClassVar[str] = "internal-error"
    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        reasons: Sequence[str] = (),
        extra: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.reasons = tuple(reasons)
        self.extra = dict(extra or {})
        self.headers = dict(headers or {})


class MalformedRequest(GatewayError):
    code = "malformed-request"
    status = 400
    title = "Malformed request"


class NoRoute(GatewayError):
    code = "no-route"
    status = 404
    title = "No route matches this request"


class MethodNotAllowed(GatewayError):
    code = "method-not-allowed"
    status = 405
    title = "Method not allowed"


class PayloadTooLarge(GatewayError):
    code = "payload-too-large"
    status = 413
    title = "Request body too large"


class PolicyDenied(GatewayError):
    code = "policy-denied"
    status = 403
    title = "Denied by policy"


class PolicyUnavailable(GatewayError):
    code = "policy-unavailable"
    status = 503
    title = "Policy engine unavailable"


class DependencyUnavailable(GatewayError):
    code = "dependency-unavailable"
    status = 503
    title = "A dependency is unavailable"


class AuditUnavailable(GatewayError):
    code = "audit-unavailable"
    status = 503
    title = "Audit log unavailable"


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
