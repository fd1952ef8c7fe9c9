"""The bus's error hierarchy.

Every error carries a stable ``code`` (it becomes the problem ``type``
``urn:nops:bus:problem:<code>``), the HTTP ``status`` and a short ``title``.
They become RFC 9457 problem+json only at the HTTP edge
(:mod:`bus.problem`), in the same shape as the gateway's::

    BusError
     ├── MalformedRequest          400 malformed-request     (carries reasons)
     ├── MissingTenant             401 missing-tenant        (carries reasons)
     ├── TenantMismatch            403 tenant-mismatch
     ├── NotFound                  404 not-found
     ├── NoSubscription            404 no-subscription
     ├── MethodNotAllowed          405 method-not-allowed
     ├── IdempotencyKeyReused      409 idempotency-key-reused
     ├── PayloadTooLarge           413 payload-too-large
     ├── InvalidEnvelope           422 invalid-envelope      (carries errors)
     ├── Overloaded                503 overloaded            (Retry-After)
     ├── RedisUnavailable          503 redis-unavailable     (Retry-After)
     └── InternalError             500 internal-error

``detail`` is sent to the client verbatim: never a secret, a stack trace or
the message's payload.
"""

from __future__ import annotations

from problemjson import ProblemError

__all__ = [
    "BusError",
    "IdempotencyKeyReused",
    "InternalError",
    "InvalidEnvelope",
    "MalformedRequest",
    "MethodNotAllowed",
    "MissingTenant",
    "NoSubscription",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "RedisUnavailable",
    "TenantMismatch",
]


class BusError(ProblemError):
    """Base of every error that ends a bus request with a problem response."""


class MalformedRequest(BusError):
    code = "malformed-request"
    status = 400
    title = "Malformed request"


class MissingTenant(BusError):
    """No (valid) ``X-Nops-Tenant``: the request did not come through the gateway."""

    code = "missing-tenant"
    status = 401
    title = "Tenant required"


class TenantMismatch(BusError):
    """The envelope names another tenant than the caller's."""

    code = "tenant-mismatch"
    status = 403
    title = "Envelope tenant does not match the caller's tenant"


class NotFound(BusError):
    code = "not-found"
    status = 404
    title = "Not found"


class NoSubscription(BusError):
    """The consumer group does not exist (consume creates it)."""

    code = "no-subscription"
    status = 404
    title = "No such subscription"


class MethodNotAllowed(BusError):
    code = "method-not-allowed"
    status = 405
    title = "Method not allowed"


class IdempotencyKeyReused(BusError):
    """The ``Idempotency-Key`` was first used for a different message."""

    code = "idempotency-key-reused"
    status = 409
    title = "Idempotency key reused for a different message"


class PayloadTooLarge(BusError):
    code = "payload-too-large"
    status = 413
    title = "Message too large"


class InvalidEnvelope(BusError):
    """Valid JSON that does not match the envelope schema; ``extra`` lists where."""

    code = "invalid-envelope"
    status = 422
    title = "Invalid message envelope"


class Overloaded(BusError):
    code = "overloaded"
    status = 503
    title = "Too many consumers waiting"


class RedisUnavailable(BusError):
    code = "redis-unavailable"
    status = 503
    title = "The bus's Redis is unavailable"


class InternalError(BusError):
    code = "internal-error"
    status = 500
    title = "Internal error"
