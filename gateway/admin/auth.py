"""Admin API keys: ``Authorization: Bearer <id>.<secret>``, only SHA-256(secret) configured.

A key's secret is 32 random bytes, base64url (43 characters), so a SHA-256
of it is as good as a slow hash: there is nothing to brute-force. Make one
with ``python -m gateway.admin.keys --role OPERATOR``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from gateway.config import AdminKeyConfig
from gateway.errors import AdminUnauthenticated

__all__ = ["AdminAuthenticator", "AdminPrincipal", "hash_secret"]

_BEARER: Final = re.compile(r"^Bearer ([A-Za-z0-9_-]{1,64})\.([A-Za-z0-9_-]{16,256})$")
#: Compared against when the key id is unknown, so both paths take as long.
_NO_KEY: Final = "sha256:" + "0" * 64
CHALLENGE: Final = {"WWW-Authenticate": 'Bearer realm="nops-admin"'}


def hash_secret(secret: str) -> str:
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class AdminPrincipal:
    key_id: str
    role: str


class AdminAuthenticator:
    """Turns an Authorization header into the admin key's id and role."""

    def __init__(self, keys: Iterable[AdminKeyConfig]) -> None:
        self._keys = {key.id: key for key in keys}

    def authenticate(self, authorization: str | None) -> AdminPrincipal:
        if not authorization:
            raise AdminUnauthenticated("an admin API key is required", headers=CHALLENGE)
        match = _BEARER.fullmatch(authorization)
        if match is None:
            raise AdminUnauthenticated(
                "expected Authorization: Bearer <key id>.<secret>", headers=CHALLENGE
            )
        key_id, secret = match.groups()
        key = self._keys.get(key_id)
        # SECURITY: constant-time comparison, and the same work for an unknown id.
        presented = hash_secret(secret)
        if not hmac.compare_digest(presented, key.hash if key else _NO_KEY) or key is None:
            raise AdminUnauthenticated("the admin API key is not valid", headers=CHALLENGE)
        return AdminPrincipal(key_id=key.id, role=key.role)
