"""Who a caller is: ``[identity]`` (JWT issuers), ``[[api_keys]]``,
``[[tenants]]`` and their keys, ``[signature]`` and ``[freshness]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final, Literal

import yarl

from gateway.config.checks import (
    _SCOPE,
    ENV_PREFIX,
    ConfigError,
    _require,
    _require_http_url,
    _rfc3339,
)

# Tenant ids and keyids end up in replay-cache keys separated by ':' and in
# logs: a small alphabet keeps both unambiguous.
_IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TIER = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
# RFC 8941 sf-key: the shape of a signature label.
_SF_KEY = re.compile(r"^[a-z*][a-z0-9_.*-]{0,63}$")
# RFC 9421 derived components a gateway can be asked to require.
_DERIVED: Final = frozenset(
    {"@method", "@target-uri", "@authority", "@scheme", "@request-target", "@path", "@query"}
)
_FIELD_NAME = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")

#: Covered by default: content-digest only when the request has a body.
DEFAULT_REQUIRED_COMPONENTS: Final = ("@method", "@target-uri", "content-digest")
_API_KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_API_KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")

#: JWT algorithms verified with a public key from the issuer's JWKS.
ASYMMETRIC_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"}
)
#: JWT algorithms verified with a configured shared secret (never from a JWKS).
HMAC_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512"})
_LOOPBACK_HOSTS: Final = frozenset({"127.0.0.1", "::1", "localhost"})


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    """One trusted JWT issuer: its ``iss``, audiences, keys and claim names."""

    #: The exact ``iss`` claim value.
    issuer: str
    #: ``aud`` values accepted from this issuer; a token must name one of them.
    audiences: tuple[str, ...]
    #: Where the issuer publishes its JWK Set (https; http only on loopback).
    jwks_url: str = ""
    #: A local JWK Set file instead of ``jwks_url`` (air-gapped installs).
    jwks_file: str = ""
    #: The allow-list of ``alg`` values; never mixes HS* with asymmetric ones.
    algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
    #: The HS* shared secret: an environment variable, a file, or (dev only) inline.
    hs_secret_env: str = ""
    hs_secret_file: str = ""
    hs_secret: str = field(default="", repr=False)
    tenant_claim: str = "tenant"
    #: A space-separated string or a list of strings.
    scope_claim: str = "scope"
    roles_claim: str = "roles"
    agent_claim: str = "agent_id"
    #: An unknown ``kid`` refreshes the JWK Set at most once per this many seconds.
    jwks_min_refresh_s: float = 30.0
    #: Keys older than this are refreshed in the background (stale ones still serve).
    jwks_max_age_s: float = 600.0
    jwks_timeout_s: float = 5.0
    jwks_max_bytes: int = 65_536

    @property
    def uses_hmac(self) -> bool:
        return any(alg in HMAC_ALGORITHMS for alg in self.algorithms)

    def validate(self, key: str) -> None:
        _require(bool(self.issuer), f"{key}.issuer", "must not be empty")
        _require(bool(self.audiences), f"{key}.audiences", "must name at least one audience")
        for index, audience in enumerate(self.audiences):
            _require(bool(audience), f"{key}.audiences[{index}]", "must not be empty")
        _require(bool(self.algorithms), f"{key}.algorithms", "must name at least one algorithm")
        supported = ASYMMETRIC_ALGORITHMS | HMAC_ALGORITHMS
        for index, alg in enumerate(self.algorithms):
            _require(
                alg in supported,
                f"{key}.algorithms[{index}]",
                f"unsupported algorithm {alg!r}; use one of {', '.join(sorted(supported))}",
            )
        secrets = [n for n in ("hs_secret_env", "hs_secret_file", "hs_secret") if getattr(self, n)]
        sources = [n for n in ("jwks_url", "jwks_file") if getattr(self, n)]
        if self.uses_hmac:
            # SECURITY: one key type per issuer, so no token can make the
            # gateway read a public key as an HMAC secret (RS/HS confusion).
            _require(
                all(alg in HMAC_ALGORITHMS for alg in self.algorithms),
                f"{key}.algorithms",
                "must not mix HS* with asymmetric algorithms",
            )
            _require(
                len(secrets) == 1,
                f"{key}.hs_secret_env",
                "HS* needs exactly one of hs_secret_env, hs_secret_file, hs_secret",
            )
            if sources:
                raise ConfigError(f"{key}.{sources[0]}", "has no use with HS* algorithms")
        else:
            if secrets:
                raise ConfigError(f"{key}.{secrets[0]}", "is only for HS* algorithms")
            _require(
                len(sources) == 1, f"{key}.jwks_url", "needs exactly one of jwks_url, jwks_file"
            )
            if self.jwks_url:
                _require_http_url(self.jwks_url, f"{key}.jwks_url")
                url = yarl.URL(self.jwks_url)
                _require(
                    url.scheme == "https" or url.host in _LOOPBACK_HOSTS,
                    f"{key}.jwks_url",
                    "must be https:// (http:// only on a loopback address)",
                )
        for name in ("tenant_claim", "scope_claim", "roles_claim", "agent_claim"):
            _require(bool(getattr(self, name)), f"{key}.{name}", "must not be empty")
        _require(self.jwks_min_refresh_s > 0, f"{key}.jwks_min_refresh_s", "must be > 0")
        _require(
            self.jwks_max_age_s >= self.jwks_min_refresh_s,
            f"{key}.jwks_max_age_s",
            "must be >= jwks_min_refresh_s",
        )
        _require(self.jwks_timeout_s > 0, f"{key}.jwks_timeout_s", "must be > 0")
        _require(self.jwks_max_bytes > 0, f"{key}.jwks_max_bytes", "must be > 0")


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    #: Seconds of clock skew allowed on ``exp``, ``nbf`` and ``iat``.
    leeway_s: float = 30.0
    issuers: tuple[IssuerConfig, ...] = ()

    def validate(self, key: str) -> None:
        _require(0 <= self.leeway_s <= 300, f"{key}.leeway_s", "must be between 0 and 300")
        seen: set[str] = set()
        for index, issuer in enumerate(self.issuers):
            issuer.validate(f"{key}.issuers[{index}]")
            _require(
                issuer.issuer not in seen, f"{key}.issuers[{index}].issuer", "duplicate issuer"
            )
            seen.add(issuer.issuer)


@dataclass(frozen=True, slots=True)
class ApiKeyConfig:
    """A per-agent API key, presented as ``Authorization: ApiKey <id>.<secret>``."""

    id: str
    tenant: str
    #: ``sha256:<hex>`` of the secret part (``python -m gateway.apikeys hash``).
    hash: str
    agent_id: str | None = None
    scopes: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()

    def validate(self, key: str) -> None:
        _require(
            _API_KEY_ID.fullmatch(self.id) is not None,
            f"{key}.id",
            "must be 1-64 letters, digits, '_' or '-'",
        )
        _require(bool(self.tenant), f"{key}.tenant", "must not be empty")
        _require(
            _API_KEY_HASH.fullmatch(self.hash) is not None,
            f"{key}.hash",
            "must be sha256:<64 lower-case hex digits>",
        )
        for index, scope in enumerate(self.scopes):
            _require(_SCOPE.fullmatch(scope) is not None, f"{key}.scopes[{index}]", "not a scope")


@dataclass(frozen=True, slots=True)
class KeyConfig:
    """One HMAC key of a tenant; the secret is named here, read by the keyring.

    Exactly one of ``secret_env`` (an environment variable), ``secret_file``
    (a file path) or ``secret`` (inline, for development only) gives the key
    bytes, always base64 (RFC 4648, standard alphabet) of at least 32 bytes.
    """

    #: Globally unique; the ``keyid`` signature parameter names it.
    keyid: str
    #: The only algorithm this key verifies; the message never chooses it.
    alg: Literal["hmac-sha256"] = "hmac-sha256"
    secret: str = field(default="", repr=False)
    secret_env: str = ""
    secret_file: str = ""
    #: RFC 3339 date-times with an offset; empty: unbounded.
    not_before: str = ""
    not_after: str = ""
    #: The agent this key belongs to; empty: a tenant-wide key. A request
    #: signed with an agent's key is that agent's: its per-agent quota is
    #: taken before identity, and a credential naming another agent is refused.
    agent_id: str = ""

    def validate(self, key: str) -> None:
        _require(
            _IDENTIFIER.fullmatch(self.keyid) is not None,
            f"{key}.keyid",
            "must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
        if self.agent_id:
            _require(
                _IDENTIFIER.fullmatch(self.agent_id) is not None,
                f"{key}.agent_id",
                "must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
            )
        sources = [n for n in ("secret", "secret_env", "secret_file") if getattr(self, n)]
        _require(
            len(sources) == 1,
            key,
            "exactly one of secret_env, secret_file or secret must be set",
        )
        if self.secret_env:
            _require(
                not self.secret_env.startswith(ENV_PREFIX),
                f"{key}.secret_env",
                f"must not start with {ENV_PREFIX} (reserved for config overrides)",
            )
        begin = _rfc3339(self.not_before, f"{key}.not_before")
        end = _rfc3339(self.not_after, f"{key}.not_after")
        if begin is not None and end is not None:
            _require(begin < end, f"{key}.not_after", "must be later than not_before")


@dataclass(frozen=True, slots=True)
class TenantConfig:
    """A tenant: who signs, on which tier, with which keys."""

    id: str
    #: Names the rate-limit tier and reaches the policy as input.tenant.tier.
    tier: str = "free"
    #: Overrides signature.grace_s for this tenant's keys.
    grace_s: int | None = None
    keys: tuple[KeyConfig, ...] = ()

    def validate(self, key: str) -> None:
        _require(
            _IDENTIFIER.fullmatch(self.id) is not None,
            f"{key}.id",
            "must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
        _require(
            _TIER.fullmatch(self.tier) is not None,
            f"{key}.tier",
            "must be lower-case letters, digits, '_' or '-', starting with a letter",
        )
        if self.grace_s is not None:
            _require(self.grace_s >= 0, f"{key}.grace_s", "must be >= 0")
        for index, item in enumerate(self.keys):
            item.validate(f"{key}.keys[{index}]")


@dataclass(frozen=True, slots=True)
class SignatureConfig:
    """RFC 9421 verification: what a signature must cover, and key rotation."""

    #: Components every signature must cover. ``content-digest`` is required
    #: only when the request has a body; ``@target-uri`` is also satisfied by
    #: ``@authority`` + ``@path`` + ``@query`` together.
    required_components: tuple[str, ...] = DEFAULT_REQUIRED_COMPONENTS
    #: The signature label to verify. Empty: any label, but the request must
    #: carry exactly one signature.
    label: str = ""
    #: Seconds a key past its not_after still verifies (rotation grace).
    grace_s: int = 0

    def validate(self, key: str) -> None:
        for index, name in enumerate(self.required_components):
            item = f"{key}.required_components[{index}]"
            if name.startswith("@"):
                _require(name in _DERIVED, item, f"must be one of {', '.join(sorted(_DERIVED))}")
            else:
                _require(
                    _FIELD_NAME.fullmatch(name) is not None,
                    item,
                    "must be a lower-case header field name or a derived component",
                )
        _require(
            len(set(self.required_components)) == len(self.required_components),
            f"{key}.required_components",
            "lists a component twice",
        )
        if self.label:
            _require(
                _SF_KEY.fullmatch(self.label) is not None,
                f"{key}.label",
                "must be an RFC 8941 key (lower-case letters, digits, '_-.*')",
            )
        _require(self.grace_s >= 0, f"{key}.grace_s", "must be >= 0")


@dataclass(frozen=True, slots=True)
class FreshnessConfig:
    """``created`` / ``expires`` checks and the replay (nonce) store."""

    #: Seconds a signature's ``created`` may lie in the future (clock skew).
    max_skew_s: int = 300
    #: Seconds a signature stays valid after its ``created``.
    max_age_s: int = 300
    #: ``auto``: Redis when dependencies.redis_url is set, else memory.
    nonce_store: Literal["auto", "memory", "redis"] = "auto"
    #: Most nonces the memory store holds; when full, signed requests fail
    #: closed with 503 until entries expire.
    memory_max_nonces: int = 1_000_000

    @property
    def nonce_ttl_s(self) -> int:
        """How long a claimed nonce is remembered: the whole acceptance window."""
        return self.max_skew_s + self.max_age_s

    def validate(self, key: str) -> None:
        _require(self.max_skew_s >= 0, f"{key}.max_skew_s", "must be >= 0")
        _require(self.max_age_s > 0, f"{key}.max_age_s", "must be > 0")
        _require(self.memory_max_nonces > 0, f"{key}.memory_max_nonces", "must be > 0")
