"""Tenants' HMAC keys: read once at start-up, looked up by ``keyid``.

A key's secret is base64 (RFC 4648, standard alphabet, padding optional,
surrounding whitespace ignored) wherever it comes from: an environment
variable (``secret_env``), a file (``secret_file``) or, for development only,
the config itself (``secret``). It must decode to at least 32 bytes, the
output size of SHA-256 (RFC 2104 §3). Every fault is a
:class:`~gateway.config.ConfigError` naming the key, so ``check-config``
reports a missing variable or unreadable file before the gateway starts.

Key rotation: a tenant may hold several keys at once; each verifies from its
``not_before`` to its ``not_after`` plus the grace period (the tenant's
``grace_s``, else ``signature.grace_s``), judged by the gateway's clock.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Final

from gateway.config import Config, ConfigError, KeyConfig, rfc3339_timestamp

__all__ = ["MIN_SECRET_BYTES", "KeyState", "Keyring", "SigningKey", "build_keyring"]

MIN_SECRET_BYTES: Final = 32


class KeyState(Enum):
    VALID = "valid"
    NOT_YET_VALID = "key_not_yet_valid"
    EXPIRED = "key_expired"


@dataclass(frozen=True, slots=True)
class SigningKey:
    keyid: str
    tenant_id: str
    tier: str
    alg: str
    # SECURITY: never in a repr, a log line or a response.
    secret: bytes = field(repr=False)
    not_before: float | None = None
    not_after: float | None = None
    grace_s: int = 0
    #: The agent the key belongs to, or None for a tenant-wide key.
    agent_id: str | None = None

    def state(self, now: float) -> KeyState:
        if self.not_before is not None and now < self.not_before:
            return KeyState.NOT_YET_VALID
        if self.not_after is not None and now > self.not_after + self.grace_s:
            return KeyState.EXPIRED
        return KeyState.VALID


class Keyring:
    """Every configured key by its globally unique ``keyid``."""

    def __init__(self, keys: Mapping[str, SigningKey]) -> None:
        self._keys = dict(keys)

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, keyid: str) -> SigningKey | None:
        return self._keys.get(keyid)


def build_keyring(config: Config, environ: Mapping[str, str] | None = None) -> Keyring:
    """Read every tenant key's secret; raise ConfigError naming the bad key."""
    env = os.environ if environ is None else environ
    keys: dict[str, SigningKey] = {}
    for t_index, tenant in enumerate(config.tenants):
        grace = tenant.grace_s if tenant.grace_s is not None else config.signature.grace_s
        for k_index, item in enumerate(tenant.keys):
            key = f"tenants[{t_index}].keys[{k_index}]"
            keys[item.keyid] = SigningKey(
                keyid=item.keyid,
                tenant_id=tenant.id,
                tier=tenant.tier,
                alg=item.alg,
                secret=_read_secret(item, key, env),
                not_before=rfc3339_timestamp(item.not_before),
                not_after=rfc3339_timestamp(item.not_after),
                grace_s=grace,
                agent_id=item.agent_id or None,
            )
    return Keyring(keys)


def _read_secret(item: KeyConfig, key: str, environ: Mapping[str, str]) -> bytes:
    if item.secret_env:
        key = f"{key}.secret_env"
        raw = environ.get(item.secret_env)
        if raw is None:
            raise ConfigError(key, f"environment variable {item.secret_env} is not set")
    elif item.secret_file:
        key = f"{key}.secret_file"
        try:
            raw = Path(item.secret_file).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                key, f"cannot read {item.secret_file}: {type(exc).__name__}"
            ) from None
    else:
        key = f"{key}.secret"
        raw = item.secret
    return _decode(raw, key)


def _decode(raw: str, key: str) -> bytes:
    text = "".join(raw.split())
    text += "=" * (-len(text) % 4)
    try:
        secret = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        # SECURITY: the message never quotes the value.
        raise ConfigError(key, "is not valid base64") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(key, f"decodes to {len(secret)} bytes; at least {MIN_SECRET_BYTES}")
    return secret
