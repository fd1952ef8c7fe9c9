"""``[policy]``: the policy engine (OPA, or embedded), its decision cache and shadow mode."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from gateway.config.checks import _require, _require_decision_path, _require_http_url


@dataclass(frozen=True, slots=True)
class PolicyCacheConfig:
    """The decision cache (gateway/policy/cache.py)."""

    enabled: bool = True
    #: Most decisions held in all, and per tenant (one tenant cannot evict the others).
    max_entries: int = 10_000
    max_entries_per_tenant: int = 1_000
    #: Seconds a cached decision lives, even when the revision does not change.
    ttl_s: float = 60.0
    #: Seconds between checks of OPA's bundle revisions; a change empties the
    #: cache. 0: check before every cached answer.
    revision_check_s: float = 1.0
    #: Dotted input paths left out of the cache key (for example
    #: "source.ip"). Only for fields no policy reads: a policy that reads an
    #: excluded field would be answered from another request's decision.
    key_exclude: tuple[str, ...] = ()

    def validate(self, key: str) -> None:
        _require(self.max_entries > 0, f"{key}.max_entries", "must be > 0")
        _require(
            0 < self.max_entries_per_tenant <= self.max_entries,
            f"{key}.max_entries_per_tenant",
            "must be > 0 and <= max_entries",
        )
        _require(self.ttl_s > 0, f"{key}.ttl_s", "must be > 0")
        _require(self.revision_check_s >= 0, f"{key}.revision_check_s", "must be >= 0")
        for index, path in enumerate(self.key_exclude):
            _require(
                re.fullmatch(r"[a-z_]+(\.[A-Za-z0-9_-]+)*", path) is not None,
                f"{key}.key_exclude[{index}]",
                "must be a dotted input path such as source.ip",
            )


@dataclass(frozen=True, slots=True)
class PolicyShadowConfig:
    """A candidate policy evaluated beside the enforcing one (gateway/policy/shadow.py)."""

    enabled: bool = False
    #: Data API path of the candidate decision document.
    decision_path: str = "nops/authz_candidate/decision"
    #: OPA server holding the candidate; empty: the enforcing OPA.
    url: str = ""
    #: Fraction of requests also sent to the candidate (0..1).
    sample_rate: float = 1.0
    #: Seconds the candidate may take; a slower answer counts as an error.
    timeout_s: float = 0.5

    def validate(self, key: str) -> None:
        if self.url:
            _require_http_url(self.url, f"{key}.url")
        _require_decision_path(self.decision_path, f"{key}.decision_path")
        _require(0 <= self.sample_rate <= 1, f"{key}.sample_rate", "must be between 0 and 1")
        _require(self.timeout_s > 0, f"{key}.timeout_s", "must be > 0")


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    #: "opa": an OPA server decides over loopback HTTP (``url``, or a supervised
    #: local one). "embedded": the same policy compiled to WebAssembly with
    #: ``opa_binary`` and evaluated in-process (ADR 0020).
    engine: Literal["opa", "embedded"] = "opa"
    #: Address of an OPA server. Empty: the gateway starts and supervises a
    #: local ``opa run --server`` loaded from ``bundle_file`` or ``bundle_dir``.
    url: str = ""
    #: The OPA binary used for a supervised local OPA.
    opa_binary: str = ".tools/bin/opa"
    #: Rego and data loaded by a supervised local OPA (watched for changes).
    bundle_dir: str = "policies/rego"
    #: A signed bundle (scripts/build-bundle) for the supervised local OPA,
    #: instead of ``bundle_dir``; watched, so a replaced file takes effect.
    bundle_file: str = ""
    #: Public key (PEM) that verifies ``bundle_file``'s signature; required with it.
    verification_key_file: str = ""
    #: Key id the bundle was signed under (scripts/build-bundle --keyid).
    verification_key_id: str = "nops-bundle"
    signing_alg: Literal["ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256"] = "ES256"
    #: Data API path of the decision document.
    decision_path: str = "nops/authz/decision"
    #: Seconds one decision may take before the request fails closed (503).
    timeout_s: float = 0.5
    #: The OPA at ``url`` is fed a bundle: an answer that names no activated
    #: bundle (OPA up, bundle not yet or no longer active) fails closed as 503
    #: ``policy-unavailable`` instead of being read as the policy's deny.
    #: Always on for the supervised local OPA, which always serves a bundle.
    require_bundle: bool = False
    cache: PolicyCacheConfig = field(default_factory=PolicyCacheConfig)
    shadow: PolicyShadowConfig = field(default_factory=PolicyShadowConfig)

    def validate(self, key: str) -> None:
        if self.url:
            _require_http_url(self.url, f"{key}.url")
        _require(self.timeout_s > 0, f"{key}.timeout_s", "must be > 0")
        _require_decision_path(self.decision_path, f"{key}.decision_path")
        if self.bundle_file:
            # SECURITY: a bundle is only ever loaded with its signature verified.
            _require(
                bool(self.verification_key_file),
                f"{key}.verification_key_file",
                "is required with bundle_file (bundles are loaded only when signed)",
            )
        if self.engine == "embedded":
            _require(
                not self.url,
                f"{key}.url",
                'must be empty with engine = "embedded" (it loads bundle_dir or bundle_file)',
            )
            _require(
                not self.shadow.enabled or bool(self.shadow.url),
                f"{key}.shadow.url",
                'is required with engine = "embedded": the candidate runs on an OPA server',
            )
        self.cache.validate(f"{key}.cache")
        self.shadow.validate(f"{key}.shadow")
