"""The registry's error hierarchy.

Every error carries a stable ``code`` (it becomes the problem ``type``
``urn:nops:registry:problem:<code>``), the HTTP ``status`` and a short
``title``. They become RFC 9457 problem+json only at the HTTP edge
(:mod:`registry.app`)::

    RegistryError
     ├── MalformedBody            400 malformed-body          (not a JSON object)
     ├── UnknownField             400 unknown-field           (names the field)
     ├── InvalidField             400 invalid-field           (names the field)
     ├── InvalidAgentId           400 invalid-agent-id
     ├── InvalidEndpointUrl       400 invalid-endpoint-url    (carries reasons)
     ├── InvalidCapability        400 invalid-capability
     ├── TooManyCapabilities      400 too-many-capabilities
     ├── InvalidQuery             400 invalid-query           (names the parameter)
     ├── InvalidCursor            400 invalid-cursor
     ├── InvalidTenant            400 invalid-tenant
     ├── TenantRequired           401 tenant-required
     ├── AdminRequired            403 admin-required
     ├── AgentNotFound            404 agent-not-found
     ├── NotFound                 404 not-found
     ├── MethodNotAllowed         405 method-not-allowed
     ├── AgentExists              409 agent-exists
     ├── PayloadTooLarge          413 payload-too-large
     ├── UnsupportedMediaType     415 unsupported-media-type
     ├── StoreUnavailable         503 store-unavailable
     └── InternalError            500 internal-error

``detail`` is sent to the client verbatim: never a secret, a key or a stack trace.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from problemjson import ProblemError

__all__ = [
    "AdminRequired",
    "AgentExists",
    "AgentNotFound",
    "InternalError",
    "InvalidAgentId",
    "InvalidCapability",
    "InvalidCursor",
    "InvalidEndpointUrl",
    "InvalidField",
    "InvalidQuery",
    "InvalidTenant",
    "MalformedBody",
    "MethodNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "RegistryError",
    "StoreUnavailable",
    "TenantRequired",
    "TooManyCapabilities",
    "UnknownField",
    "UnsupportedMediaType",
]


class RegistryError(ProblemError):
    """Base of every error that ends a registry request with a problem response."""

    def __init__(
        self, detail: str | None = None, *, field: str | None = None, reasons: Sequence[str] = ()
    ) -> None:
        super().__init__(detail, reasons=reasons)
        #: The request field or query parameter at fault, if one is.
        self.field = field

    def problem_members(self) -> dict[str, Any]:
        """``field`` (if one is at fault) before the shared members."""
        members: dict[str, Any] = {} if self.field is None else {"field": self.field}
        members.update(super().problem_members())
        return members


class MalformedBody(RegistryError):
    code = "malformed-body"
    status = 400
    title = "The body is not a JSON object"


class UnknownField(RegistryError):
    code = "unknown-field"
    status = 400
    title = "Unknown field"


class InvalidField(RegistryError):
    code = "invalid-field"
    status = 400
    title = "Invalid field"


class InvalidAgentId(RegistryError):
    code = "invalid-agent-id"
    status = 400
    title = "Invalid agent id"


class InvalidEndpointUrl(RegistryError):
    code = "invalid-endpoint-url"
    status = 400
    title = "Invalid endpoint URL"


class InvalidCapability(RegistryError):
    code = "invalid-capability"
    status = 400
    title = "Invalid capability"


class TooManyCapabilities(RegistryError):
    code = "too-many-capabilities"
    status = 400
    title = "Too many capabilities"


class InvalidQuery(RegistryError):
    code = "invalid-query"
    status = 400
    title = "Invalid query parameter"


class InvalidCursor(RegistryError):
    code = "invalid-cursor"
    status = 400
    title = "Invalid pagination cursor"


class InvalidTenant(RegistryError):
    code = "invalid-tenant"
    status = 400
    title = "Invalid tenant"


class TenantRequired(RegistryError):
    """No ``X-Nops-Tenant``: the request did not come through the gateway."""

    code = "tenant-required"
    status = 401
    title = "Tenant required"


class AdminRequired(RegistryError):
    code = "admin-required"
    status = 403
    title = "Admin key required"


class AgentNotFound(RegistryError):
    code = "agent-not-found"
    status = 404
    title = "No such agent"


class NotFound(RegistryError):
    code = "not-found"
    status = 404
    title = "No such resource"


class MethodNotAllowed(RegistryError):
    code = "method-not-allowed"
    status = 405
    title = "Method not allowed"


class AgentExists(RegistryError):
    code = "agent-exists"
    status = 409
    title = "Agent already registered"


class PayloadTooLarge(RegistryError):
    code = "payload-too-large"
    status = 413
    title = "Request body too large"


class UnsupportedMediaType(RegistryError):
    code = "unsupported-media-type"
    status = 415
    title = "Unsupported media type"


class StoreUnavailable(RegistryError):
    code = "store-unavailable"
    status = 503
    title = "The registry store is unavailable"


class InternalError(RegistryError):
    code = "internal-error"
    status = 500
    title = "Internal error"
