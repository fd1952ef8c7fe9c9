"""``[admin]``: the admin plane and its keys."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

from gateway.config.checks import _require, _require_http_url

_ADMIN_KEY_ID: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ADMIN_KEY_HASH: Final = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class AdminKeyConfig:
    """One admin API key: ``Authorization: Bearer <id>.<secret>``.

    Only the SHA-256 of the secret is configured (``hash = "sha256:<hex>"``);
    ``python -m gateway.admin.keys --role ROLE`` makes a new id, secret and hash.
    """

    id: str
    role: Literal["SUPER_ADMIN", "ADMIN", "OPERATOR", "VIEWER"]
    hash: str

    def validate(self, key: str) -> None:
        _require(
            _ADMIN_KEY_ID.fullmatch(self.id) is not None,
            f"{key}.id",
            "must be 1-64 letters, digits, '_' or '-' (no '.')",
        )
        _require(
            _ADMIN_KEY_HASH.fullmatch(self.hash) is not None,
            f"{key}.hash",
            'must be "sha256:" and 64 lower-case hex digits',
        )


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The admin plane under /_admin/ (gateway/admin), guarded by casbin RBAC."""

    enabled: bool = True
    keys: tuple[AdminKeyConfig, ...] = ()
    #: The agent registry's admin API (``GET /_admin/registry/agents``, role
    #: OPERATOR): its base URL and the environment variable holding its admin
    #: key (``X-Nops-Admin-Key``). Empty: registry admin is not offered.
    registry_url: str = ""
    registry_key_env: str = ""

    def validate(self, key: str) -> None:
        if self.registry_url:
            _require_http_url(self.registry_url, f"{key}.registry_url")
            _require(
                bool(self.registry_key_env),
                f"{key}.registry_key_env",
                "is required with registry_url (the variable holding the registry's admin key)",
            )
        ids: set[str] = set()
        for index, admin_key in enumerate(self.keys):
            admin_key.validate(f"{key}.keys[{index}]")
            _require(admin_key.id not in ids, f"{key}.keys[{index}].id", "duplicate key id")
            ids.add(admin_key.id)
