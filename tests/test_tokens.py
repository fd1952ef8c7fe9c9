"""Token validation on a pinned clock: leeway edges, key binding, claim shapes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest

from gateway.config import IdentityConfig, IssuerConfig
from gateway.tokens import MAX_TOKEN_CHARS, TokenRejected, TokenValidator, build_validator
from tests.jwtissuer import AUDIENCE, FakeIssuer, _private_key

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


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class TestVerifiedCache:
    @pytest.fixture
    def clock(self) -> _Clock:
        return _Clock(NOW)

    @pytest.fixture
    async def cached_validator(
        self, issuer: FakeIssuer, tmp_path: Path, clock: _Clock
    ) -> AsyncIterator[Callable[..., TokenValidator]]:
        """Validators on a clock the test moves, their JWKS file re-read on refresh."""
        made: list[TokenValidator] = []

        def factory(**options: Any) -> TokenValidator:
            path = tmp_path / "jwks.json"
            path.write_text(json.dumps(issuer.jwks()))
            config = IssuerConfig(
                issuer=issuer.issuer,
                audiences=(AUDIENCE,),
                jwks_file=str(path),
                jwks_min_refresh_s=1,
                jwks_max_age_s=60,
            )
            validator = build_validator(
                IdentityConfig(leeway_s=LEEWAY, issuers=(config,)), session=None, clock=clock
            )
            validator = TokenValidator(
                validator.issuers.values(), leeway_s=LEEWAY, clock=clock, **options
            )
            made.append(validator)
            return validator

        yield factory
        for validator in made:
            await validator.close()

    @staticmethod
    def token(issuer: FakeIssuer, **claims: Any) -> str:
        return issuer.token(**{"iat": NOW, "nbf": NOW, "exp": NOW + 3600, **claims})

    async def test_second_validation_is_served_from_the_cache(
        self, issuer: FakeIssuer, cached_validator: Callable[..., TokenValidator]
    ) -> None:
        """The same token twice: one entry, the same verified identity object."""
        validator = cached_validator()
        token = self.token(issuer)
        first = await validator.validate(token)
        assert await validator.validate(token) is first
        assert len(validator.cache) == 1

    @pytest.mark.parametrize(
        ("exp", "advance", "outcome"),
        [
            pytest.param(NOW + 3600, 299, "cached", id="inside-cap"),
            pytest.param(NOW + 3600, 300, "reverified", id="cap-reached"),
            pytest.param(NOW + 60, 60 + LEEWAY - 1, "cached", id="inside-exp-leeway"),
            pytest.param(NOW + 60, 60 + LEEWAY, "expired", id="exp-reached"),
        ],
    )
    async def test_entry_lives_until_min_of_exp_and_cap(
        self,
        issuer: FakeIssuer,
        cached_validator: Callable[..., TokenValidator],
        clock: _Clock,
        exp: int,
        advance: int,
        outcome: str,
    ) -> None:
        """An entry serves until exp + leeway or cache_ttl_s, whichever is first."""
        validator = cached_validator(cache_ttl_s=300)
        token = self.token(issuer, exp=exp)
        first = await validator.validate(token)
        clock.now += advance
        reason = await _reason(validator, token)
        if reason is not None:
            seen = reason
        else:
            seen = "cached" if await validator.validate(token) is first else "reverified"
        assert seen == outcome
        assert len(validator.cache) == (0 if outcome == "expired" else 1)

    async def test_bounded_least_recently_used_goes_first(
        self, issuer: FakeIssuer, cached_validator: Callable[..., TokenValidator]
    ) -> None:
        """Three tokens through a two-entry cache: the least recently used one is re-verified."""
        validator = cached_validator(cache_max_entries=2)
        a, b, c = (self.token(issuer, sub=name) for name in "abc")
        verified_a = await validator.validate(a)
        verified_b = await validator.validate(b)
        assert await validator.validate(a) is verified_a  # a is now the most recent
        await validator.validate(c)
        assert len(validator.cache) == 2
        assert await validator.validate(a) is verified_a
        assert await validator.validate(b) is not verified_b

    @pytest.mark.parametrize(
        ("claims", "reason"),
        [
            pytest.param({"exp": NOW - LEEWAY}, "expired", id="expired"),
            pytest.param({"nbf": NOW + LEEWAY + 1}, "not_yet_valid", id="not-yet-valid"),
            pytest.param({"aud": "someone-else"}, "wrong_audience", id="audience"),
            pytest.param({"tenant": None}, "claim_missing", id="no-tenant"),
        ],
    )
    async def test_failures_are_never_cached(
        self,
        issuer: FakeIssuer,
        cached_validator: Callable[..., TokenValidator],
        claims: dict[str, Any],
        reason: str,
    ) -> None:
        """A rejected token is rejected again for the same reason, and leaves no entry."""
        validator = cached_validator()
        token = self.token(issuer, **claims)
        assert [await _reason(validator, token) for _ in range(2)] == [reason, reason]
        assert len(validator.cache) == 0

    async def test_bad_signature_of_a_cached_token_is_not_a_hit(
        self, issuer: FakeIssuer, cached_validator: Callable[..., TokenValidator]
    ) -> None:
        """The key is the hash of the whole token: another signature on the same claims misses."""
        validator = cached_validator()
        token = self.token(issuer)
        await validator.validate(token)
        claims = jwt.decode(token, options={"verify_signature": False})
        other = _private_key("RS256", 1)
        forged = jwt.encode(claims, other, algorithm="RS256", headers={"kid": "rsa"})
        assert await _reason(validator, forged) == "bad_signature"
        assert len(validator.cache) == 1

    async def test_key_removed_from_the_jwks_invalidates(
        self,
        issuer: FakeIssuer,
        cached_validator: Callable[..., TokenValidator],
        clock: _Clock,
        tmp_path: Path,
    ) -> None:
        """Once a refresh drops the kid, its cached tokens fail with unknown_kid."""
        validator = cached_validator()
        token = self.token(issuer)
        await validator.validate(token)
        issuer.add_key("RS256", "rsa-next", index=1)
        issuer.remove_key("rsa")
        (tmp_path / "jwks.json").write_text(json.dumps(issuer.jwks()))
        clock.now += 61  # past jwks_max_age_s: the next lookup refreshes in the background
        reasons = []
        for _ in range(200):
            reasons.append(await _reason(validator, token))
            if reasons[-1] is not None:
                break
            await asyncio.sleep(0.01)
        assert reasons[-1] == "unknown_kid"
        assert set(reasons[:-1]) <= {None}
        assert len(validator.cache) == 0

    async def test_key_replaced_under_the_same_kid_reverifies(
        self,
        issuer: FakeIssuer,
        cached_validator: Callable[..., TokenValidator],
        clock: _Clock,
        tmp_path: Path,
    ) -> None:
        """A refresh that swaps the key behind a kid sends cached tokens through the full check."""
        validator = cached_validator()
        token = self.token(issuer)
        await validator.validate(token)
        issuer.add_key("RS256", "rsa", index=1)
        (tmp_path / "jwks.json").write_text(json.dumps(issuer.jwks()))
        clock.now += 61
        reasons = []
        for _ in range(200):
            reasons.append(await _reason(validator, token))
            if reasons[-1] is not None:
                break
            await asyncio.sleep(0.01)
        assert reasons[-1] == "bad_signature"
        assert set(reasons[:-1]) <= {None}
