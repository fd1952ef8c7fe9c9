"""Token validation on a pinned clock: leeway edges, key binding, claim shapes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.config import IdentityConfig, IssuerConfig
from gateway.tokens import MAX_TOKEN_CHARS, TokenRejected, TokenValidator, build_validator
from tests.jwtissuer import AUDIENCE, FakeIssuer

NOW = 1_800_000_000
LEEWAY = 30


@pytest.fixture
def issuer() -> FakeIssuer:
    issuer = FakeIssuer()
    issuer.add_key("RS256", "rsa")
    return issuer


@pytest.fixture
async def make_validator(
    issuer: FakeIssuer, tmp_path: Path
) -> AsyncIterator[Callable[..., TokenValidator]]:
    """Validators reading the issuer's keys from a file, on a clock pinned at NOW."""
    made: list[TokenValidator] = []

    def factory(**overrides: Any) -> TokenValidator:
        path = tmp_path / "jwks.json"
        path.write_text(json.dumps(issuer.jwks()))
        config = IssuerConfig(
            issuer=issuer.issuer, audiences=(AUDIENCE,), jwks_file=str(path), **overrides
        )
        validator = build_validator(
            IdentityConfig(leeway_s=LEEWAY, issuers=(config,)), session=None, clock=lambda: NOW
        )
        made.append(validator)
        return validator

    yield factory
    for validator in made:
        await validator.close()


async def _reason(validator: TokenValidator, token: str) -> str | None:
    try:
        await validator.validate(token)
    except TokenRejected as exc:
        return exc.reason
    return None


class TestTimeClaims:
    @pytest.mark.parametrize(
        ("claims", "reason"),
        [
            pytest.param({"exp": NOW - LEEWAY + 1}, None, id="exp-inside-leeway"),
            pytest.param({"exp": NOW - LEEWAY}, "expired", id="exp-at-leeway-edge"),
            pytest.param({"nbf": NOW + LEEWAY}, None, id="nbf-at-leeway-edge"),
            pytest.param({"nbf": NOW + LEEWAY + 1}, "not_yet_valid", id="nbf-past-leeway"),
            pytest.param({"iat": NOW + LEEWAY}, None, id="iat-at-leeway-edge"),
            pytest.param({"iat": NOW + LEEWAY + 1}, "issued_in_future", id="iat-past-leeway"),
            pytest.param({"iat": None, "nbf": None}, None, id="iat-nbf-optional"),
            pytest.param({"exp": float(NOW + 60)}, None, id="exp-float"),
            pytest.param({"exp": str(NOW + 60)}, "token_malformed", id="exp-string"),
            pytest.param({"exp": True}, "token_malformed", id="exp-bool"),
            pytest.param({"nbf": "soon"}, "token_malformed", id="nbf-string"),
        ],
    )
    async def test_times_against_the_injected_clock(
        self,
        issuer: FakeIssuer,
        make_validator: Callable[..., TokenValidator],
        claims: dict[str, Any],
        reason: str | None,
    ) -> None:
        """exp, nbf and iat are judged on the gateway's clock with leeway_s either side."""
        base = {"iat": NOW, "nbf": NOW, "exp": NOW + 300}
        token = issuer.token(**{**base, **claims})
        assert await _reason(make_validator(), token) == reason


class TestKeyBinding:
    async def test_key_alg_pins_the_algorithm(
        self, issuer: FakeIssuer, make_validator: Callable[..., TokenValidator]
    ) -> None:
        """A JWK with alg RS256 does not verify PS256, even when the issuer allows both."""
        rsa = issuer.keys["rsa"]
        token = issuer.token(rsa, headers={"alg": "PS256"}, exp=NOW + 60, iat=NOW, nbf=NOW)
        validator = make_validator(algorithms=("RS256", "PS256"))
        assert await _reason(validator, token) == "alg_not_allowed"

    async def test_key_without_alg_verifies_each_allowed_rsa_alg(
        self, issuer: FakeIssuer, tmp_path: Path
    ) -> None:
        """A JWK without alg serves every allowed algorithm of its type."""
        path = tmp_path / "jwks.json"
        jwk = {k: v for k, v in issuer.keys["rsa"].jwk.items() if k != "alg"}
        path.write_text(json.dumps({"keys": [jwk]}))
        config = IssuerConfig(
            issuer=issuer.issuer,
            audiences=(AUDIENCE,),
            jwks_file=str(path),
            algorithms=("RS256", "PS256"),
        )
        validator = build_validator(
            IdentityConfig(issuers=(config,)), session=None, clock=lambda: NOW
        )
        for alg in ("RS256", "PS256"):
            token = issuer.token(headers={"alg": alg}, exp=NOW + 60, iat=NOW, nbf=NOW)
            assert await _reason(validator, token) is None
        await validator.close()


class TestClaims:
    @pytest.mark.parametrize(
        ("claims", "expected"),
        [
            pytest.param({"scope": "a b  c"}, ("a", "b", "c"), id="space-separated"),
            pytest.param({"scope": ["a", "b"]}, ("a", "b"), id="list"),
            pytest.param({"scope": None}, (), id="absent"),
        ],
    )
    async def test_scope_shapes(
        self,
        issuer: FakeIssuer,
        make_validator: Callable[..., TokenValidator],
        claims: dict[str, Any],
        expected: tuple[str, ...],
    ) -> None:
        """Scopes come as a space-separated string or a list of strings."""
        token = issuer.token(exp=NOW + 60, iat=NOW, nbf=NOW, **claims)
        assert (await make_validator().validate(token)).scopes == expected

    async def test_claim_names_are_configurable(
        self, issuer: FakeIssuer, make_validator: Callable[..., TokenValidator]
    ) -> None:
        """tenant, scope, roles and agent claims can be renamed per issuer."""
        token = issuer.token(
            exp=NOW + 60,
            iat=NOW,
            nbf=NOW,
            tenant=None,
            org="globex",
            scp=["x"],
            groups=["ADMIN"],
            azp="agent-9",
        )
        validator = make_validator(
            tenant_claim="org", scope_claim="scp", roles_claim="groups", agent_claim="azp"
        )
        verified = await validator.validate(token)
        assert (verified.tenant, verified.scopes, verified.roles, verified.agent_id) == (
            "globex",
            ("x",),
            ("ADMIN",),
            "agent-9",
        )

    @pytest.mark.parametrize(
        ("claims", "reason"),
        [
            pytest.param({"roles": "ADMIN"}, None, id="roles-as-string"),
            pytest.param({"roles": [1]}, "token_malformed", id="roles-not-strings"),
            pytest.param({"agent_id": 5}, "token_malformed", id="agent-not-string"),
            pytest.param({"sub": 5}, "token_malformed", id="sub-not-string"),
            pytest.param({"sub": ""}, "claim_missing", id="sub-empty"),
            pytest.param({"tenant": ""}, "claim_missing", id="tenant-empty"),
        ],
    )
    async def test_claim_types(
        self,
        issuer: FakeIssuer,
        make_validator: Callable[..., TokenValidator],
        claims: dict[str, Any],
        reason: str | None,
    ) -> None:
        """Ill-typed identity claims are refused, never coerced."""
        token = issuer.token(exp=NOW + 60, iat=NOW, nbf=NOW, **claims)
        assert await _reason(make_validator(), token) == reason

    async def test_oversized_token_is_refused_before_parsing(
        self, issuer: FakeIssuer, make_validator: Callable[..., TokenValidator]
    ) -> None:
        """Past MAX_TOKEN_CHARS a token is malformed, whatever it holds."""
        token = issuer.token(exp=NOW + 60, iat=NOW, nbf=NOW, pad="x" * MAX_TOKEN_CHARS)
        assert await _reason(make_validator(), token) == "token_malformed"
