"""The admin plane: the gateway's own API under ``/_admin/``.

Authenticated by admin API keys (``Authorization: Bearer <id>.<secret>``,
only the secret's SHA-256 configured), authorised by casbin RBAC in process
(roles SUPER_ADMIN > ADMIN > OPERATOR > VIEWER, model and policy in
``rbac_model.conf`` and ``rbac_policy.csv``). Neither step asks OPA, so an
operator can still inspect and repair the gateway while OPA is down. Admin
requests bypass the request pipeline's policy decision but get the same
edge: request ids, problem+json, security headers and the canonical log line.
"""

from gateway.admin.auth import AdminAuthenticator, AdminPrincipal, hash_secret
from gateway.admin.rbac import ROLES, Rbac
from gateway.admin.routes import register_admin_routes

__all__ = [
    "ROLES",
    "AdminAuthenticator",
    "AdminPrincipal",
    "Rbac",
    "hash_secret",
    "register_admin_routes",
]
