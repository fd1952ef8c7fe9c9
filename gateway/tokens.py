"""Bearer JWT validation with RFC 8725 hardening.

A token is checked in this order, and the first failure is its reason:

1. shape: compact JWS (three base64url segments, no padding), a size cap,
   JSON object header and payload (``token_malformed``);
2. header: no ``jku``/``x5u``/``x5c``/``jwk`` (keys never come from the token,
   ``jku_x5u_forbidden``), no ``crit`` (no extension is understood,
   ``crit_unsupported``), an ``alg`` other than ``none`` (``alg_not_allowed``);
3. issuer: the unverified ``iss`` must be configured (``unknown_issuer``) and
   allow the header's ``alg`` (``alg_not_allowed``: this is where HS256 signed
   with an RSA public key as the secret dies);
4. key: HS* only with the issuer's configured secret; otherwise the ``kid``
   (untrusted, only an index) from the issuer's JWKS (``unknown_kid``), and
   that key must be bound to the header's ``alg`` (``alg_not_allowed``);
5. signature, ``iss``, ``aud`` and required claims, by PyJWT
   (``bad_signature``, ``wrong_audience``, ``claim_missing``);
6. time, against the injected clock with ``leeway_s``: ``exp`` (required,
   ``expired``), ``nbf`` (``not_yet_valid``), ``iat`` (``issued_in_future``);
7. the tenant claim (required), scopes, roles and agent id.

Reason codes are stable: they reach problem+json bodies and metrics labels.
Nothing here logs; :class:`TokenRejected` carries only the reason, the
configured issuer and the ``kid``, never the token.

Verified tokens are cached (:class:`VerifiedCache`), keyed by the SHA-256 of
the token, so an agent that sends the same bearer token with every request
pays for the signature check once. An entry holds until the token's ``exp``
(plus leeway) or ``cache_ttl_s`` after it was verified, whichever comes
first; the cache is bounded (least recently used entries go first). A hit
re-checks the times (step 6) against the clock, and looks the key up again
(step 4): a key no longer in the issuer's JWKS, or replaced by a refresh,
sends the token through the full check again. Only successes are cached.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import math
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import jwt
from jwt import PyJWK
from jwt.exceptions import (
    InvalidAlgorithmError,
    InvalidAudienceError,
    InvalidIssuerError,
    InvalidSignatureError,
    MissingRequiredClaimError,
    PyJWTError,
)
from jwt.types import Options
from jwt.utils import base64url_decode

from gateway.config import (
    ASYMMETRIC_ALGORITHMS,
    HMAC_ALGORITHMS,
    ConfigError,
    IdentityConfig,
    IssuerConfig,
)
from gateway.jwks import FileJwksFetcher, HttpJwksFetcher, JwksCache, JwksFetcher

__all__ = [
    "CACHE_MAX_ENTRIES",
    "CACHE_TTL_S",
    "MAX_TOKEN_CHARS",
    "TokenRejected",
    "TokenValidator",
    "TrustedIssuer",
    "VerifiedCache",
    "VerifiedToken",
    "build_validator",
]

#: Longer bearer tokens are refused before any parsing.
MAX_TOKEN_CHARS: Final = 8192
_COMPACT_JWS: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# SECURITY: header parameters that would make the verifier take a key (or a
# place to fetch one) from the token itself (RFC 8725 §3.10, CVE-2018-0114).
_KEY_IN_HEADER: Final = frozenset({"jku", "x5u", "x5c", "jwk"})
_MAX_KID_CHARS: Final = 256
_HMAC_MIN_BYTES: Final = {"HS256": 32, "HS384": 48, "HS512": 64}
#: A verified token is trusted from the cache for at most this long.
CACHE_TTL_S: Final = 300.0
#: Verified tokens kept at most (least recently used go first).
CACHE_MAX_ENTRIES: Final = 10_000
_ALLOWED_ALGORITHMS: Final = ASYMMETRIC_ALGORITHMS | HMAC_ALGORITHMS


class TokenRejected(Exception):
    """The token is not accepted; ``reason`` is a stable snake_case code."""

    def __init__(self, reason: str, *, issuer: str | None = None, kid: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.issuer = issuer
        self.kid = kid


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    issuer: str
    kid: str | None
    sub: str
    tenant: str
    scopes: tuple[str, ...]
    roles: tuple[str, ...]
    agent_id: str | None


class TrustedIssuer:
    """One configured issuer and where its verification keys come from."""

    def __init__(
        self, config: IssuerConfig, *, keys: JwksCache | None = None, secret: bytes | None = None
    ) -> None:
        if (keys is None) == (secret is None):
            raise ValueError("an issuer has either a JWKS or an HMAC secret")
        self.config = config
        self.keys = keys
        self.secret = secret

    async def key(self, alg: str, kid: str | None) -> PyJWK | bytes:
        if alg in HMAC_ALGORITHMS:
            if self.secret is None:  # unreachable: config never mixes key types
                raise TokenRejected("alg_not_allowed", issuer=self.config.issuer, kid=kid)
            return self.secret
        if self.keys is None:
            raise TokenRejected("alg_not_allowed", issuer=self.config.issuer, kid=kid)
        entry = await self.keys.entry(kid or "")
        if entry is None:
            raise TokenRejected("unknown_kid", issuer=self.config.issuer, kid=kid)
        key = entry.get(alg)
        if key is None:
            # The kid exists but its key is of another type or names another alg.
            raise TokenRejected("alg_not_allowed", issuer=self.config.issuer, kid=kid)
        return key


@dataclass(frozen=True, slots=True)
class _Cached:
    token: VerifiedToken
    alg: str
    #: The exact key object the signature verified with (rotation check).
    key: PyJWK | bytes
    #: exp / nbf / iat, re-checked against the clock on every hit.
    times: Mapping[str, Any]
    until: float


class VerifiedCache:
    """Verified tokens by the SHA-256 of the token, bounded, least recently used first out."""

    def __init__(self, *, max_entries: int, ttl_s: float) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._entries: OrderedDict[bytes, _Cached] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: bytes, now: float) -> _Cached | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if now >= entry.until:
            del self._entries[digest]
            return None
        self._entries.move_to_end(digest)
        return entry

    def put(self, digest: bytes, entry: _Cached) -> None:
        if self.max_entries <= 0:
            return
        self._entries[digest] = entry
        self._entries.move_to_end(digest)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def discard(self, digest: bytes) -> None:
        self._entries.pop(digest, None)


class TokenValidator:
    """Validates bearer JWTs against the configured issuers."""

    def __init__(
        self,
        issuers: Iterable[TrustedIssuer],
        *,
        leeway_s: float,
        clock: Callable[[], float],
        cache_ttl_s: float = CACHE_TTL_S,
        cache_max_entries: int = CACHE_MAX_ENTRIES,
    ) -> None:
        self._issuers = {issuer.config.issuer: issuer for issuer in issuers}
        self._leeway = leeway_s
        self._clock = clock
        self.cache = VerifiedCache(max_entries=cache_max_entries, ttl_s=cache_ttl_s)

    @property
    def issuers(self) -> Mapping[str, TrustedIssuer]:
        return self._issuers

    async def validate(self, token: str) -> VerifiedToken:
        """The verified identity in ``token``; raises :class:`TokenRejected`."""
        if len(token) > MAX_TOKEN_CHARS:
            raise TokenRejected("token_malformed")
        digest = hashlib.sha256(token.encode()).digest()
        cached = self.cache.get(digest, self._clock())
        if cached is not None:
            verified = cached.token
            issuer = self._issuers[verified.issuer]
            try:
                # SECURITY: the key is looked up again; a rotated-out kid fails
                # here, and a replaced key sends the token through the full check.
                key = await issuer.key(cached.alg, verified.kid)
                if key is cached.key:
                    self._check_times(cached.times, verified.issuer, verified.kid)
                    return verified
            except TokenRejected:
                self.cache.discard(digest)
                raise
            self.cache.discard(digest)
        verified, entry = await self._verify_token(token)
        self.cache.put(digest, entry)
        return verified

    async def _verify_token(self, token: str) -> tuple[VerifiedToken, _Cached]:
        if not _COMPACT_JWS.fullmatch(token):
            raise TokenRejected("token_malformed")
        header_segment, payload_segment, _ = token.split(".")
        header = _json_object(header_segment)
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or len(kid) > _MAX_KID_CHARS):
            raise TokenRejected("token_malformed")
        if _KEY_IN_HEADER & header.keys():
            raise TokenRejected("jku_x5u_forbidden", kid=kid)
        if "crit" in header:
            raise TokenRejected("crit_unsupported", kid=kid)
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise TokenRejected("token_malformed", kid=kid)
        if alg not in _ALLOWED_ALGORITHMS:  # "none" included
            raise TokenRejected("alg_not_allowed", kid=kid)
        unverified = _json_object(payload_segment)
        iss = unverified.get("iss")
        if iss is None:
            raise TokenRejected("claim_missing", kid=kid)
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise TokenRejected("unknown_issuer", kid=kid)
        config = issuer.config
        if alg not in config.algorithms:
            raise TokenRejected("alg_not_allowed", issuer=config.issuer, kid=kid)
        key = await issuer.key(alg, kid)
        claims = _verify(token, key, alg, config, kid)
        self._check_times(claims, config.issuer, kid)
        verified = _identity(claims, config, kid)
        times: dict[str, Any] = {n: claims[n] for n in ("exp", "nbf", "iat") if n in claims}
        # exp passed _check_times: a finite number.
        until = min(float(claims["exp"]) + self._leeway, self._clock() + self.cache.ttl_s)
        return verified, _Cached(verified, alg, key, times, until)

    async def close(self) -> None:
        for issuer in self._issuers.values():
            if issuer.keys is not None:
                await issuer.keys.close()

    def _check_times(self, claims: Mapping[str, Any], issuer: str, kid: str | None) -> None:
        now = self._clock()
        exp = _numeric_date(claims, "exp", issuer, kid)
        if exp is None:
            raise TokenRejected("claim_missing", issuer=issuer, kid=kid)
        if exp <= now - self._leeway:
            raise TokenRejected("expired", issuer=issuer, kid=kid)
        nbf = _numeric_date(claims, "nbf", issuer, kid)
        if nbf is not None and nbf > now + self._leeway:
            raise TokenRejected("not_yet_valid", issuer=issuer, kid=kid)
        iat = _numeric_date(claims, "iat", issuer, kid)
        if iat is not None and iat > now + self._leeway:
            raise TokenRejected("issued_in_future", issuer=issuer, kid=kid)


def _json_object(segment: str) -> dict[str, Any]:
    try:
        value = json.loads(base64url_decode(segment))
    except (ValueError, binascii.Error, RecursionError):
        raise TokenRejected("token_malformed") from None
    if not isinstance(value, dict):
        raise TokenRejected("token_malformed")
    return value


def _verify(
    token: str, key: PyJWK | bytes, alg: str, config: IssuerConfig, kid: str | None
) -> dict[str, Any]:
    # Times are checked by the caller against the injected clock.
    options: Options = {
        "verify_signature": True,
        "verify_exp": False,
        "verify_nbf": False,
        "verify_iat": False,
        "require": ["iss", "aud", "sub", "exp"],
        "enforce_minimum_key_length": True,
    }
    try:
        return jwt.decode(
            token,
            key,
            algorithms=[alg],
            audience=list(config.audiences),
            issuer=config.issuer,
            options=options,
        )
    except InvalidSignatureError:
        reason = "bad_signature"
    except InvalidAlgorithmError:
        reason = "alg_not_allowed"
    except MissingRequiredClaimError:
        reason = "claim_missing"
    except InvalidAudienceError:
        reason = "wrong_audience"
    except InvalidIssuerError:
        reason = "unknown_issuer"
    except PyJWTError:
        reason = "token_malformed"
    raise TokenRejected(reason, issuer=config.issuer, kid=kid)


def _numeric_date(
    claims: Mapping[str, Any], name: str, issuer: str, kid: str | None
) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TokenRejected("token_malformed", issuer=issuer, kid=kid)
    return float(value)


def _identity(claims: Mapping[str, Any], config: IssuerConfig, kid: str | None) -> VerifiedToken:
    def malformed() -> TokenRejected:
        return TokenRejected("token_malformed", issuer=config.issuer, kid=kid)

    sub = claims["sub"]
    tenant = claims.get(config.tenant_claim)
    if sub == "" or tenant is None or tenant == "":
        raise TokenRejected("claim_missing", issuer=config.issuer, kid=kid)
    if not isinstance(sub, str) or not isinstance(tenant, str):
        raise malformed()
    agent_id = claims.get(config.agent_claim)
    if agent_id is not None and not isinstance(agent_id, str):
        raise malformed()
    scopes = _strings(claims.get(config.scope_claim))
    roles = _strings(claims.get(config.roles_claim))
    if scopes is None or roles is None:
        raise malformed()
    return VerifiedToken(
        issuer=config.issuer,
        kid=kid,
        sub=sub,
        tenant=tenant,
        scopes=scopes,
        roles=roles,
        agent_id=agent_id or None,
    )


def _strings(value: Any) -> tuple[str, ...] | None:
    """A space-separated string or a list of strings as a tuple; None if neither."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(value.split())
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


def build_validator(
    config: IdentityConfig,
    *,
    session: aiohttp.ClientSession | None,
    clock: Callable[[], float],
    environ: Mapping[str, str] | None = None,
) -> TokenValidator:
    """Trusted issuers from config: a JWKS cache each, or the HS* secret read now."""
    env = os.environ if environ is None else environ
    issuers: list[TrustedIssuer] = []
    for index, issuer in enumerate(config.issuers):
        key = f"identity.issuers[{index}]"
        if issuer.uses_hmac:
            issuers.append(TrustedIssuer(issuer, secret=_hmac_secret(issuer, key, env)))
            continue
        fetch: JwksFetcher
        if issuer.jwks_url:
            if session is None:
                raise ConfigError(f"{key}.jwks_url", "no HTTP client to fetch it with")
            fetch = HttpJwksFetcher(
                session,
                issuer.jwks_url,
                timeout_s=issuer.jwks_timeout_s,
                max_bytes=issuer.jwks_max_bytes,
            )
        else:
            fetch = FileJwksFetcher(Path(issuer.jwks_file), max_bytes=issuer.jwks_max_bytes)
        cache = JwksCache(
            issuer.issuer,
            fetch,
            algorithms=issuer.algorithms,
            clock=clock,
            min_refresh_s=issuer.jwks_min_refresh_s,
            max_age_s=issuer.jwks_max_age_s,
        )
        issuers.append(TrustedIssuer(issuer, keys=cache))
    return TokenValidator(issuers, leeway_s=config.leeway_s, clock=clock)


def _hmac_secret(issuer: IssuerConfig, key: str, environ: Mapping[str, str]) -> bytes:
    if issuer.hs_secret_env:
        key = f"{key}.hs_secret_env"
        value = environ.get(issuer.hs_secret_env, "")
        if not value:
            raise ConfigError(key, f"environment variable {issuer.hs_secret_env} is not set")
        secret = value.encode()
    elif issuer.hs_secret_file:
        key = f"{key}.hs_secret_file"
        try:
            secret = Path(issuer.hs_secret_file).read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise ConfigError(key, f"cannot read the secret file ({type(exc).__name__})") from None
    else:
        key = f"{key}.hs_secret"
        secret = issuer.hs_secret.encode()
    needed = max(_HMAC_MIN_BYTES[alg] for alg in issuer.algorithms)
    if len(secret) < needed:
        # RFC 7518 §3.2: an HMAC key at least as long as the hash output.
        raise ConfigError(key, f"the HS* secret must be at least {needed} bytes")
    return secret
