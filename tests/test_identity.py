"""The identity stage end to end: real gateway, OPA, JWKS server and upstream."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import aiohttp
import jwt
import pytest
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from multidict import CIMultiDict

from gateway.apikeys import ApiKeyStore, hash_secret
from gateway.app import METRICS
from gateway.config import (
    ApiKeyConfig,
    ConfigError,
    IdentityConfig,
    IssuerConfig,
    RouteConfig,
    parse_config,
)
from gateway.context import RequestContext, Tenant
from gateway.errors import InsufficientScope, InvalidToken, MissingCredentials, TenantMismatch
from gateway.pipeline.identity import Identity
from gateway.tokens import build_validator
from tests.conftest import GatewayFactory
from tests.jwtissuer import AUDIENCE, TENANT, FakeIssuer, SigningKey, hs_token, unsigned_token
from tests.problems import assert_problem
from tests.secretscan import register_secret

Client = TestClient[Any, Any]
TokenMaker = Callable[[FakeIssuer], str]

INVALID_TOKEN_CHALLENGE = 'Bearer realm="nops-gateway", error="invalid_token"'
API_SECRET = "s3cr3t-0123456789-abcdefghijklmnop"
HS_SECRET = "an-hs-secret-long-enough-for-hs512-too-" + "0123456789abcdef" * 2
register_secret(API_SECRET, "API key secret (identity)")
register_secret(HS_SECRET, "HS JWT secret (identity)")


def issuer_config(issuer: FakeIssuer, **overrides: Any) -> dict[str, Any]:
    return {
        "issuer": issuer.issuer,
        "audiences": [AUDIENCE],
        "jwks_url": issuer.jwks_url,
        **overrides,
    }


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def make_gateway(make_gateway: GatewayFactory) -> GatewayFactory:
    """Gateways whose client signs every request as tenant acme, the tokens' tenant.

    Routes require an RFC 9421 signature by default (the signature stage runs
    before identity); cross-tenant requests are tested in test_signature.py.
    """

    async def signed(**sections: Any) -> Client:
        return await make_gateway(sign_as="acme-k1", **sections)

    return signed


@pytest.fixture
def upstream_url(upstream: TestServer) -> str:
    return str(upstream.make_url("")).rstrip("/")


@pytest.fixture
async def jwt_gateway(make_gateway: GatewayFactory, jwt_issuer: FakeIssuer) -> Client:
    """The test gateway trusting the fake issuer; ``locked`` takes a JWT."""
    return await make_gateway(identity={"issuers": [issuer_config(jwt_issuer)]})


def _now() -> int:
    return int(time.time())


def _tampered(issuer: FakeIssuer) -> str:
    header, _, signature = issuer.token().split(".")
    claims = unsigned_token({}, issuer.claims(scope="locked:read admin"), b"").split(".")[1]
    return f"{header}.{claims}.{signature}"


def _forged(issuer: FakeIssuer) -> str:
    """Signed by another RSA key that claims the published key's kid."""
    published = next(iter(issuer.keys.values()))
    impostor = SigningKey(published.kid, "RS256", FakeIssuer().add_key("RS256", index=1).private)
    return issuer.token(impostor)


def _first(issuer: FakeIssuer) -> SigningKey:
    return next(iter(issuer.keys.values()))


def _rs_header_on_es_key(issuer: FakeIssuer) -> str:
    es = issuer.add_key("ES256")
    token = issuer.token(es)
    _, claims, signature = token.split(".")
    header = unsigned_token({"alg": "RS256", "kid": es.kid}, {}, b"").split(".")[0]
    return f"{header}.{claims}.{signature}"


ATTACKS = [
    pytest.param(
        lambda i: unsigned_token({"alg": "none", "kid": _first(i).kid}, i.claims(), b""),
        "alg_not_allowed",
        id="alg-none",
    ),
    pytest.param(
        lambda i: unsigned_token({"alg": "nOnE", "kid": _first(i).kid}, i.claims(), b""),
        "alg_not_allowed",
        id="alg-none-mixed-case",
    ),
    pytest.param(
        lambda i: unsigned_token({"kid": _first(i).kid}, i.claims(), b"x"),
        "token_malformed",
        id="alg-missing",
    ),
    pytest.param(
        lambda i: hs_token(
            {"alg": "HS256", "kid": _first(i).kid}, i.claims(), _first(i).public_pem
        ),
        "alg_not_allowed",
        id="hs256-signed-with-rsa-public-key",
    ),
    pytest.param(_rs_header_on_es_key, "alg_not_allowed", id="rs256-header-on-ec-key"),
    pytest.param(lambda i: i.token(aud="other-service"), "wrong_audience", id="wrong-audience"),
    pytest.param(lambda i: i.token(aud=["a", "b"]), "wrong_audience", id="audience-list-not-ours"),
    pytest.param(lambda i: i.token(aud=None), "claim_missing", id="audience-missing"),
    pytest.param(lambda i: i.token(iss="https://evil.test/"), "unknown_issuer", id="wrong-issuer"),
    pytest.param(lambda i: i.token(iss=None), "claim_missing", id="issuer-missing"),
    pytest.param(lambda i: i.token(exp=_now() - 3600), "expired", id="expired"),
    pytest.param(lambda i: i.token(exp=_now() - 31), "expired", id="expired-past-leeway"),
    pytest.param(lambda i: i.token(exp=None), "claim_missing", id="exp-missing"),
    pytest.param(lambda i: i.token(nbf=_now() + 3600), "not_yet_valid", id="nbf-future"),
    pytest.param(lambda i: i.token(iat=_now() + 3600), "issued_in_future", id="iat-future"),
    pytest.param(lambda i: i.token(sub=None), "claim_missing", id="sub-missing"),
    pytest.param(lambda i: i.token(tenant=None), "claim_missing", id="tenant-missing"),
    pytest.param(lambda i: i.token(tenant=7), "token_malformed", id="tenant-not-string"),
    pytest.param(lambda i: i.token(scope=7), "token_malformed", id="scope-not-string-or-list"),
    pytest.param(lambda i: i.token(headers={"kid": "nope"}), "unknown_kid", id="unknown-kid"),
    pytest.param(lambda i: i.token(headers={"kid": None}), "unknown_kid", id="kid-missing"),
    pytest.param(
        lambda i: i.token(headers={"crit": ["urn:x:must"], "urn:x:must": True}),
        "crit_unsupported",
        id="crit-unknown-extension",
    ),
    pytest.param(
        lambda i: i.token(headers={"jku": "https://evil.test/jwks.json"}),
        "jku_x5u_forbidden",
        id="jku",
    ),
    pytest.param(
        lambda i: i.token(headers={"x5u": "https://evil.test/cert.pem"}),
        "jku_x5u_forbidden",
        id="x5u",
    ),
    pytest.param(
        lambda i: i.token(headers={"jwk": _first(i).jwk}), "jku_x5u_forbidden", id="embedded-jwk"
    ),
    pytest.param(lambda i: i.token(headers={"x5c": ["MIIB"]}), "jku_x5u_forbidden", id="x5c"),
    pytest.param(_forged, "bad_signature", id="forged-signature-known-kid"),
    pytest.param(_tampered, "bad_signature", id="tampered-claims"),
    pytest.param(lambda i: "not-a-jwt", "token_malformed", id="garbage"),
    pytest.param(lambda i: "a.b", "token_malformed", id="two-segments"),
    pytest.param(lambda i: "a.b.c.d.e", "token_malformed", id="jwe-five-segments"),
    pytest.param(lambda i: i.token() + "==", "token_malformed", id="base64-padding"),
    pytest.param(lambda i: "eyJ.eyJ.sig", "token_malformed", id="header-not-json"),
]


class TestBearerTokens:
    @pytest.mark.parametrize(
        ("alg", "claims"),
        [
            pytest.param("RS256", lambda: {}, id="rs256"),
            pytest.param("ES256", lambda: {}, id="es256"),
            pytest.param("EdDSA", lambda: {}, id="eddsa"),
            pytest.param("RS256", lambda: {"scope": ["locked:read"]}, id="scope-as-list"),
            # Times are taken when the test runs, not when it is collected.
            pytest.param("RS256", lambda: {"exp": _now() - 10}, id="exp-within-leeway"),
            pytest.param(
                "RS256", lambda: {"nbf": _now() + 10, "iat": _now() + 10}, id="future-in-leeway"
            ),
            pytest.param("RS256", lambda: {"aud": ["x", AUDIENCE]}, id="audience-in-list"),
        ],
    )
    async def test_valid_token_reaches_the_upstream(
        self,
        jwt_gateway: Client,
        jwt_issuer: FakeIssuer,
        alg: str,
        claims: Callable[[], dict[str, Any]],
    ) -> None:
        """A good RS256, ES256 or EdDSA token passes identity and OPA and is proxied."""
        key = jwt_issuer.add_key(alg)
        response = await jwt_gateway.get(
            "/locked/x", headers=bearer(jwt_issuer.token(key, **claims()))
        )
        assert response.status == 200
        assert (await response.json())["path"] == "/locked/x"

    @pytest.mark.parametrize(("make_token", "reason"), ATTACKS)
    async def test_attack_is_rejected_with_its_reason(
        self, jwt_gateway: Client, jwt_issuer: FakeIssuer, make_token: TokenMaker, reason: str
    ) -> None:
        """Each RFC 8725 attack ends in 401 invalid-token naming why, with a Bearer challenge."""
        response = await jwt_gateway.get("/locked/x", headers=bearer(make_token(jwt_issuer)))
        await assert_problem(response, 401, "invalid-token", [reason])
        assert response.headers["WWW-Authenticate"] == INVALID_TOKEN_CHALLENGE

    @pytest.mark.parametrize(
        ("headers", "reason"),
        [
            pytest.param({}, "no_credentials", id="none"),
            pytest.param({"Authorization": "Basic dTpw"}, "unsupported_scheme", id="basic"),
            pytest.param({"Authorization": "ApiKey k.s"}, "api_key_not_accepted", id="api-key"),
        ],
    )
    async def test_missing_credentials_get_a_challenge(
        self, jwt_gateway: Client, headers: dict[str, str], reason: str
    ) -> None:
        """No credential this route takes: 401 missing-credentials and a plain challenge."""
        response = await jwt_gateway.get("/locked/x", headers=headers)
        await assert_problem(response, 401, "missing-credentials", [reason])
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="nops-gateway"'

    async def test_two_authorization_headers_are_malformed(
        self, jwt_gateway: Client, jwt_issuer: FakeIssuer
    ) -> None:
        """Two Authorization fields are ambiguous: 400, whichever is valid."""
        token = jwt_issuer.token()
        headers = CIMultiDict([("Authorization", f"Bearer {token}"), ("Authorization", "x")])
        response = await jwt_gateway.get("/locked/x", headers=headers)
        await assert_problem(response, 400, "malformed-request", ["ambiguous"])

    async def test_anonymous_routes_ignore_credentials(self, jwt_gateway: Client) -> None:
        """auth = "none": the stage does not look at the Authorization header."""
        response = await jwt_gateway.get("/echo/x", headers=bearer("garbage"))
        assert response.status == 200

    async def test_denials_are_counted_by_reason(
        self, jwt_gateway: Client, jwt_issuer: FakeIssuer
    ) -> None:
        """Metrics count identity denials by stage, code and reason."""
        await jwt_gateway.get("/locked/x", headers=bearer(jwt_issuer.token(aud="x")))
        await jwt_gateway.get("/locked/x")
        metrics = jwt_gateway.app[METRICS]
        assert metrics.denials[("identity", "invalid-token")] == 1
        assert metrics.denial_reasons[("identity", "wrong_audience")] == 1
        assert metrics.denial_reasons[("identity", "no_credentials")] == 1

    async def test_no_credential_reaches_a_log_line(
        self, jwt_gateway: Client, jwt_issuer: FakeIssuer, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Rejected tokens are logged by reason, issuer and kid, never by value."""
        forged = _forged(jwt_issuer)
        signature = forged.rsplit(".", 1)[1]
        with caplog.at_level(logging.DEBUG):
            await jwt_gateway.get("/locked/x", headers=bearer(forged))
        rejected = next(r for r in caplog.records if r.getMessage() == "bearer token rejected")
        assert rejected.__dict__["reason"] == "bad_signature"
        assert rejected.__dict__["kid"] == _first(jwt_issuer).kid
        for record in caplog.records:
            assert signature not in repr(record.__dict__)


class TestRandomKids:
    async def test_random_kids_cause_no_fetch_storm(
        self, jwt_gateway: Client, jwt_issuer: FakeIssuer
    ) -> None:
        """200 tokens with random kids, 100 of them concurrent and cold: one JWKS fetch."""

        async def attempt() -> aiohttp.ClientResponse:
            token = jwt_issuer.token(headers={"kid": uuid.uuid4().hex})
            return await jwt_gateway.get("/locked/x", headers=bearer(token))

        for _ in range(2):
            responses = await asyncio.gather(*(attempt() for _ in range(100)))
            for response in responses:
                await assert_problem(response, 401, "invalid-token", ["unknown_kid"])
        assert jwt_issuer.fetches == 1


class TestKeyRotation:
    async def test_new_kid_is_used_after_the_min_refresh_interval(
        self, make_gateway: GatewayFactory, jwt_issuer: FakeIssuer
    ) -> None:
        """A key the issuer adds works once jwks_min_refresh_s has passed; a removed one stops."""
        config = issuer_config(jwt_issuer, jwks_min_refresh_s=0.5)
        client = await make_gateway(identity={"issuers": [config]})
        old = _first(jwt_issuer)
        assert (await client.get("/locked/x", headers=bearer(jwt_issuer.token(old)))).status == 200
        new = jwt_issuer.add_key("ES256")
        jwt_issuer.remove_key(old.kid)
        early = await client.get("/locked/x", headers=bearer(jwt_issuer.token(new)))
        await assert_problem(early, 401, "invalid-token", ["unknown_kid"])
        await asyncio.sleep(0.55)
        assert (await client.get("/locked/x", headers=bearer(jwt_issuer.token(new)))).status == 200
        retired = await client.get("/locked/x", headers=bearer(jwt_issuer.token(old)))
        await assert_problem(retired, 401, "invalid-token", ["unknown_kid"])
        assert jwt_issuer.fetches == 2

    async def test_issuer_down_serves_stale_keys(
        self, make_gateway: GatewayFactory, jwt_issuer: FakeIssuer
    ) -> None:
        """Keys past max age keep working while the issuer's JWKS endpoint fails."""
        config = issuer_config(jwt_issuer, jwks_min_refresh_s=0.1, jwks_max_age_s=0.1)
        client = await make_gateway(identity={"issuers": [config]})
        token = jwt_issuer.token()
        assert (await client.get("/locked/x", headers=bearer(token))).status == 200
        jwt_issuer.failing_status = 503
        for _ in range(3):
            await asyncio.sleep(0.15)
            assert (await client.get("/locked/x", headers=bearer(token))).status == 200
        await asyncio.sleep(0.05)
        assert jwt_issuer.fetches >= 3  # refreshes were tried, and failed

    async def test_issuer_never_reached_fails_closed(
        self, make_gateway: GatewayFactory, jwt_issuer: FakeIssuer
    ) -> None:
        """No keys ever loaded: 503 dependency-unavailable, not a pass and not a 401."""
        jwt_issuer.failing_status = 500
        client = await make_gateway(identity={"issuers": [issuer_config(jwt_issuer)]})
        response = await client.get("/locked/x", headers=bearer(jwt_issuer.token()))
        await assert_problem(response, 503, "dependency-unavailable", ["jwks_unavailable"])

    async def test_jwks_file_for_air_gapped_installs(
        self, make_gateway: GatewayFactory, jwt_issuer: FakeIssuer, tmp_path: Path
    ) -> None:
        """An issuer whose keys come from a local file verifies tokens the same way."""
        path = tmp_path / "jwks.json"
        path.write_text(json.dumps(jwt_issuer.jwks()))
        config = issuer_config(jwt_issuer, jwks_url="", jwks_file=str(path))
        client = await make_gateway(identity={"issuers": [config]})
        assert (await client.get("/locked/x", headers=bearer(jwt_issuer.token()))).status == 200
        assert jwt_issuer.fetches == 0


class TestHmacIssuer:
    @pytest.fixture
    async def hs_gateway(
        self, make_gateway: GatewayFactory, jwt_issuer: FakeIssuer, monkeypatch: pytest.MonkeyPatch
    ) -> Client:
        monkeypatch.setenv("TEST_HS_SECRET", HS_SECRET)
        hs_issuer = {
            "issuer": "https://internal.test/",
            "audiences": [AUDIENCE],
            "algorithms": ["HS256"],
            "hs_secret_env": "TEST_HS_SECRET",
        }
        return await make_gateway(identity={"issuers": [issuer_config(jwt_issuer), hs_issuer]})

    @pytest.mark.parametrize(
        ("secret", "alg", "status", "reason"),
        [
            pytest.param(HS_SECRET, "HS256", 200, None, id="configured-secret"),
            pytest.param("x" * 40, "HS256", 401, "bad_signature", id="other-secret"),
            pytest.param(HS_SECRET, "HS512", 401, "alg_not_allowed", id="hs512-not-listed"),
        ],
    )
    async def test_hs256_only_with_the_configured_secret(
        self,
        hs_gateway: Client,
        jwt_issuer: FakeIssuer,
        secret: str,
        alg: str,
        status: int,
        reason: str | None,
    ) -> None:
        """An HS256 issuer accepts its own secret and nothing else."""
        claims = jwt_issuer.claims(iss="https://internal.test/")
        token = jwt.encode(claims, secret, algorithm=alg)
        response = await hs_gateway.get("/locked/x", headers=bearer(token))
        if reason is None:
            assert response.status == status
        else:
            await assert_problem(response, status, "invalid-token", [reason])

    async def test_asymmetric_token_claiming_the_hs_issuer(
        self, hs_gateway: Client, jwt_issuer: FakeIssuer
    ) -> None:
        """An RS256 token naming the HS issuer is refused: that issuer takes HS256 only."""
        token = jwt_issuer.token(iss="https://internal.test/")
        response = await hs_gateway.get("/locked/x", headers=bearer(token))
        await assert_problem(response, 401, "invalid-token", ["alg_not_allowed"])


class TestLockedRoute:
    """``locked`` needs scope locked:read: checked by identity (route scopes) or by OPA."""

    def _routes(self, upstream_url: str, **locked: Any) -> list[dict[str, Any]]:
        return [
            {"name": "echo", "prefix": "/echo/", "upstream": upstream_url, "auth": "none"},
            {"name": "locked", "prefix": "/locked/", "upstream": upstream_url, **locked},
        ]

    @pytest.mark.parametrize(
        ("route_scopes", "scope", "status", "code", "reasons"),
        [
            pytest.param(["locked:read"], "locked:read", 200, None, None, id="identity-allows"),
            pytest.param(
                ["locked:read"],
                "other",
                403,
                "insufficient-scope",
                ["missing_scope"],
                id="identity-denies",
            ),
            pytest.param([], "locked:read", 200, None, None, id="policy-allows"),
            pytest.param([], "other", 403, "policy-denied", ["missing_scope"], id="policy-denies"),
        ],
    )
    async def test_scope_decides(
        self,
        make_gateway: GatewayFactory,
        jwt_issuer: FakeIssuer,
        upstream_url: str,
        route_scopes: list[str],
        scope: str,
        status: int,
        code: str | None,
        reasons: list[str] | None,
    ) -> None:
        """With the scope the request reaches the upstream; without, identity or OPA says 403."""
        client = await make_gateway(
            identity={"issuers": [issuer_config(jwt_issuer)]},
            routes=self._routes(upstream_url, scopes=route_scopes),
        )
        response = await client.get("/locked/x", headers=bearer(jwt_issuer.token(scope=scope)))
        if code is None:
            assert response.status == status
            assert (await response.json())["path"] == "/locked/x"
            return
        body = await assert_problem(response, status, code, reasons)
        if code == "insufficient-scope":
            assert body["required_scopes"] == ["locked:read"]
            assert response.headers["WWW-Authenticate"] == (
                'Bearer realm="nops-gateway", error="insufficient_scope", scope="locked:read"'
            )

    async def test_policy_still_denies_when_the_gateway_lets_anyone_in(
        self, make_gateway: GatewayFactory, upstream_url: str
    ) -> None:
        """auth = "none" on locked: OPA denies the anonymous caller on its own."""
        client = await make_gateway(routes=self._routes(upstream_url, auth="none"))
        response = await client.get("/locked/x")
        await assert_problem(
            response, 403, "policy-denied", ["authentication_required", "missing_scope"]
        )


class TestApiKeys:
    @pytest.fixture
    async def key_gateway(
        self, make_gateway: GatewayFactory, jwt_issuer: FakeIssuer, upstream_url: str
    ) -> Client:
        def route(name: str, auth: str, **extra: Any) -> dict[str, Any]:
            return {"name": name, "prefix": f"/{name}/", "upstream": upstream_url, "auth": auth}

        return await make_gateway(
            identity={"issuers": [issuer_config(jwt_issuer)]},
            routes=[
                route("echo", "api_key"),
                route("readonly", "jwt"),
                {**route("locked", "jwt_or_api_key"), "scopes": ["locked:read"]},
            ],
            api_keys=[
                {
                    "id": "agent-7",
                    "tenant": TENANT,
                    "agent_id": "a7",
                    "scopes": ["locked:read"],
                    "hash": hash_secret(API_SECRET),
                },
                {"id": "agent-8", "tenant": TENANT, "hash": hash_secret(API_SECRET + "8")},
            ],
        )

    @pytest.mark.parametrize(
        ("path", "authorization", "status", "code", "reason"),
        [
            pytest.param("/echo/x", f"ApiKey agent-7.{API_SECRET}", 200, None, None, id="valid"),
            pytest.param(
                "/echo/x", f"apikey agent-7.{API_SECRET}", 200, None, None, id="scheme-any-case"
            ),
            pytest.param(
                "/locked/x", f"ApiKey agent-7.{API_SECRET}", 200, None, None, id="scoped-via-opa"
            ),
            pytest.param(
                "/echo/x",
                f"ApiKey agent-7.{API_SECRET}x",
                401,
                "invalid-token",
                "api_key_invalid",
                id="wrong-secret",
            ),
            pytest.param(
                "/echo/x",
                f"ApiKey agent-9.{API_SECRET}",
                401,
                "invalid-token",
                "api_key_invalid",
                id="unknown-id",
            ),
            pytest.param(
                "/echo/x", "ApiKey agent-7", 401, "invalid-token", "api_key_malformed", id="no-dot"
            ),
            pytest.param(
                "/readonly/x",
                f"ApiKey agent-7.{API_SECRET}",
                401,
                "missing-credentials",
                "api_key_not_accepted",
                id="wrong-route",
            ),
            pytest.param(
                "/locked/x",
                f"ApiKey agent-8.{API_SECRET}8",
                403,
                "insufficient-scope",
                "missing_scope",
                id="key-without-scope",
            ),
            pytest.param(
                "/echo/x",
                "Bearer x.y.z",
                401,
                "missing-credentials",
                "bearer_not_accepted",
                id="bearer-on-api-key-route",
            ),
        ],
    )
    async def test_api_key_outcomes(
        self,
        key_gateway: Client,
        path: str,
        authorization: str,
        status: int,
        code: str | None,
        reason: str | None,
    ) -> None:
        """API keys pass where the route takes them, with the right secret and scopes."""
        response = await key_gateway.get(path, headers={"Authorization": authorization})
        if code is None:
            assert response.status == status
            assert (await response.json())["path"] == path
        else:
            await assert_problem(response, status, code, [reason] if reason else None)

    async def test_jwt_also_passes_where_either_is_taken(
        self, key_gateway: Client, jwt_issuer: FakeIssuer
    ) -> None:
        """auth = "jwt_or_api_key" takes a bearer token too."""
        response = await key_gateway.get("/locked/x", headers=bearer(jwt_issuer.token()))
        assert response.status == 200

    async def test_secret_never_logged(
        self, key_gateway: Client, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A rejected API key is logged by id and reason only."""
        with caplog.at_level(logging.DEBUG):
            await key_gateway.get(
                "/echo/x", headers={"Authorization": f"ApiKey agent-7.{'z' * 40}"}
            )
        rejected = next(r for r in caplog.records if r.getMessage() == "API key rejected")
        assert rejected.__dict__["key_id"] == "agent-7"
        for record in caplog.records:
            assert "z" * 40 not in repr(record.__dict__)


class TestStage:
    """The stage on its own, where the signature stage's tenant can be set by hand."""

    @pytest.fixture
    async def stage(self, jwt_issuer: FakeIssuer) -> AsyncIterator[Identity]:
        async with aiohttp.ClientSession() as session:
            config = IdentityConfig(
                issuers=(
                    IssuerConfig(
                        issuer=jwt_issuer.issuer,
                        audiences=(AUDIENCE,),
                        jwks_url=jwt_issuer.jwks_url,
                    ),
                )
            )
            api_key = ApiKeyConfig(id="k", tenant=TENANT, hash=hash_secret(API_SECRET))
            stage = Identity(
                build_validator(config, session=session, clock=time.time), ApiKeyStore([api_key])
            )
            yield stage
            await stage.close()

    def _ctx(
        self,
        authorization: str,
        tenant: Tenant | None,
        *,
        auth: Literal["none", "jwt", "jwt_or_api_key", "api_key"] = "jwt_or_api_key",
    ) -> RequestContext:
        route = RouteConfig(name="r", prefix="/r/", upstream="http://u", auth=auth)
        request = make_mocked_request("GET", "/r/x", headers={"Authorization": authorization})
        return RequestContext(
            request=request, request_id="r", client_ip="127.0.0.1", route=route, tenant=tenant
        )

    @pytest.mark.parametrize("kind", ["jwt", "api_key"])
    async def test_signer_of_another_tenant_is_refused(
        self, stage: Identity, jwt_issuer: FakeIssuer, kind: str
    ) -> None:
        """A credential of tenant acme on a request signed by tenant globex: 403."""
        credential = f"Bearer {jwt_issuer.token()}" if kind == "jwt" else f"ApiKey k.{API_SECRET}"
        ctx = self._ctx(credential, Tenant("globex", "gold"))
        with pytest.raises(TenantMismatch) as caught:
            await stage.run(ctx)
        assert caught.value.reasons == ("tenant_mismatch",)

    async def test_signer_of_the_same_tenant_keeps_its_tier(
        self, stage: Identity, jwt_issuer: FakeIssuer
    ) -> None:
        """Matching tenants: the signer's tenant (and tier) stays; the subject is set."""
        ctx = self._ctx(f"Bearer {jwt_issuer.token()}", Tenant(TENANT, "gold"))
        assert await stage.run(ctx) is None
        assert ctx.tenant == Tenant(TENANT, "gold")
        assert ctx.subject.sub == "svc-42"
        assert ctx.subject.scopes == ("locked:read", "agents:write")
        assert ctx.subject.roles == ("OPERATOR",)
        assert ctx.subject.agent_id == "a1"

    async def test_unsigned_request_takes_the_token_tenant(
        self, stage: Identity, jwt_issuer: FakeIssuer
    ) -> None:
        """No signature stage tenant: the credential's tenant becomes ctx.tenant, tier None."""
        ctx = self._ctx(f"Bearer {jwt_issuer.token()}", None)
        await stage.run(ctx)
        assert ctx.tenant == Tenant(TENANT, None)

    @pytest.mark.parametrize(
        ("authorization", "error"),
        [
            pytest.param("", MissingCredentials, id="empty-header"),
            pytest.param("Bearer", InvalidToken, id="bearer-without-token"),
            pytest.param("ApiKey ", InvalidToken, id="api-key-without-key"),
        ],
    )
    async def test_empty_credentials(
        self, stage: Identity, authorization: str, error: type[Exception]
    ) -> None:
        """Empty credentials are refused, never taken as anonymous."""
        with pytest.raises(error):
            await stage.run(self._ctx(authorization, None))

    async def test_required_scope_missing(self, stage: Identity, jwt_issuer: FakeIssuer) -> None:
        """A route scope the subject lacks is 403 insufficient-scope."""
        ctx = self._ctx(f"Bearer {jwt_issuer.token(scope='a b')}", None)
        assert ctx.route is not None
        ctx.route = RouteConfig(name="r", prefix="/r/", upstream="http://u", scopes=("c",))
        with pytest.raises(InsufficientScope):
            await stage.run(ctx)


class TestIdentityConfig:
    ISSUER: ClassVar[dict[str, Any]] = {
        "issuer": "https://i.test/",
        "audiences": ["a"],
        "jwks_url": "https://i.test/jwks",
    }

    @pytest.mark.parametrize(
        ("table", "key", "message"),
        [
            pytest.param(
                {"identity": {"issuers": [{**ISSUER, "algorithms": ["none"]}]}},
                "identity.issuers[0].algorithms[0]",
                "unsupported",
                id="alg-none",
            ),
            pytest.param(
                {
                    "identity": {
                        "issuers": [
                            {
                                **ISSUER,
                                "jwks_url": "",
                                "algorithms": ["HS256", "RS256"],
                                "hs_secret_env": "X",
                            }
                        ]
                    }
                },
                "identity.issuers[0].algorithms",
                "must not mix",
                id="hs-mixed-with-rs",
            ),
            pytest.param(
                {"identity": {"issuers": [{**ISSUER, "jwks_url": "", "algorithms": ["HS256"]}]}},
                "identity.issuers[0].hs_secret_env",
                "exactly one",
                id="hs-without-secret",
            ),
            pytest.param(
                {"identity": {"issuers": [{**ISSUER, "algorithms": ["HS256"], "hs_secret": "x"}]}},
                "identity.issuers[0].jwks_url",
                "no use",
                id="hs-with-jwks",
            ),
            pytest.param(
                {"identity": {"issuers": [{**ISSUER, "hs_secret_env": "X"}]}},
                "identity.issuers[0].hs_secret_env",
                "only for HS",
                id="secret-without-hs",
            ),
            pytest.param(
                {"identity": {"issuers": [{**ISSUER, "jwks_url": ""}]}},
                "identity.issuers[0].jwks_url",
                "exactly one",
                id="no-key-source",
            ),
            pytest.param(
                {"identity": {"issuers": [{**ISSUER, "jwks_file": "/k.json"}]}},
                "identity.issuers[0].jwks_url",
                "exactly one",
                id="two-key-sources",
            ),
            pytest.param(
                {"identity": {"issuers": [{**ISSUER, "jwks_url": "http://idp.test/jwks"}]}},
                "identity.issuers[0].jwks_url",
                "https",
                id="plain-http-off-loopback",
            ),
            pytest.param(
                {"identity": {"issuers": [{**ISSUER, "audiences": []}]}},
                "identity.issuers[0].audiences",
                "at least one",
                id="no-audience",
            ),
            pytest.param(
                {"identity": {"issuers": [ISSUER, ISSUER]}},
                "identity.issuers[1].issuer",
                "duplicate",
                id="duplicate-issuer",
            ),
            pytest.param(
                {"identity": {"issuers": [{**ISSUER, "jwks_max_age_s": 1}]}},
                "identity.issuers[0].jwks_max_age_s",
                ">= jwks_min_refresh_s",
                id="max-age-below-min-refresh",
            ),
            pytest.param(
                {"identity": {"leeway_s": 3600}}, "identity.leeway_s", "between", id="leeway"
            ),
            pytest.param(
                {"api_keys": [{"id": "k", "tenant": "t", "hash": "md5:00"}]},
                "api_keys[0].hash",
                "sha256:",
                id="api-key-hash",
            ),
            pytest.param(
                {"api_keys": [{"id": "k.1", "tenant": "t", "hash": hash_secret("x")}]},
                "api_keys[0].id",
                "letters",
                id="api-key-id",
            ),
            pytest.param(
                {"api_keys": [{"id": "k", "tenant": "t", "hash": hash_secret("x")}] * 2},
                "api_keys[1].id",
                "duplicate",
                id="api-key-duplicate",
            ),
            pytest.param(
                {"routes": [{"name": "r", "prefix": "/r/", "upstream": "http://u", "auth": "x"}]},
                "routes[0].auth",
                "one of",
                id="route-auth",
            ),
            pytest.param(
                {
                    "routes": [
                        {
                            "name": "r",
                            "prefix": "/r/",
                            "upstream": "http://u",
                            "auth": "none",
                            "scopes": ["a"],
                        }
                    ]
                },
                "routes[0].scopes",
                "anonymous",
                id="scopes-on-anonymous-route",
            ),
        ],
    )
    def test_bad_identity_config_names_the_key(
        self, table: dict[str, Any], key: str, message: str
    ) -> None:
        """Every identity misconfiguration is a ConfigError naming its dotted key."""
        with pytest.raises(ConfigError) as caught:
            parse_config(table)
        assert caught.value.key == key
        assert message in caught.value.message

    def test_routes_take_a_jwt_by_default(self) -> None:
        """Secure default: a route that says nothing about auth needs a bearer token."""
        config = parse_config({"routes": [{"name": "r", "prefix": "/r/", "upstream": "http://u"}]})
        assert config.routes[0].auth == "jwt"

    @pytest.mark.parametrize(
        ("issuer", "environ", "key", "message"),
        [
            pytest.param(
                {"hs_secret_env": "NOPS_TEST_UNSET"},
                {},
                "identity.issuers[0].hs_secret_env",
                "not set",
                id="env-unset",
            ),
            pytest.param(
                {"hs_secret_env": "S"},
                {"S": "short"},
                "identity.issuers[0].hs_secret_env",
                "at least 32 bytes",
                id="short-secret",
            ),
            pytest.param(
                {"hs_secret_file": "/nonexistent/secret"},
                {},
                "identity.issuers[0].hs_secret_file",
                "cannot read",
                id="file-missing",
            ),
        ],
    )
    def test_hs_secret_problems_stop_start_up(
        self, issuer: dict[str, Any], environ: dict[str, str], key: str, message: str
    ) -> None:
        """A missing or short HS secret is a ConfigError at start-up, naming its key."""
        config = parse_config(
            {
                "identity": {
                    "issuers": [
                        {"issuer": "i", "audiences": ["a"], "algorithms": ["HS256"], **issuer}
                    ]
                }
            }
        )
        with pytest.raises(ConfigError) as caught:
            build_validator(config.identity, session=None, clock=time.time, environ=environ)
        assert caught.value.key == key
        assert message in caught.value.message


class TestUpstreamIdentity:
    """What the upstream learns about the caller, and what it never sees."""

    @pytest.mark.parametrize(
        ("forward", "authorization_seen"),
        [
            pytest.param(False, False, id="credential-removed"),
            pytest.param(True, True, id="forward-authorization"),
        ],
    )
    async def test_verified_identity_replaces_the_credential(
        self,
        make_gateway: GatewayFactory,
        jwt_issuer: FakeIssuer,
        upstream_url: str,
        forward: bool,
        authorization_seen: bool,
    ) -> None:
        """The upstream gets X-Nops-* identity; the bearer token only if the route opts in."""
        client = await make_gateway(
            identity={"issuers": [issuer_config(jwt_issuer)]},
            routes=[
                {
                    "name": "locked",
                    "prefix": "/locked/",
                    "upstream": upstream_url,
                    "forward_authorization": forward,
                }
            ],
        )
        token = jwt_issuer.token(scope="locked:read", agent_id="a1")
        response = await client.get("/locked/x", headers={**bearer(token), "X-Nops-Tenant": "evil"})
        assert response.status == 200
        seen = (await response.json())["headers"]
        assert ("authorization" in seen) is authorization_seen
        assert seen["x-nops-tenant"] == "acme"
        assert seen["x-nops-subject"] == jwt_issuer.claims()["sub"]
        assert seen["x-nops-scopes"] == "locked:read"
        assert len(seen["x-nops-decision-id"]) == 36

    async def test_callers_cannot_send_identity_headers(self, gateway: Client) -> None:
        """X-Nops-* from the caller is dropped, even on anonymous routes."""
        response = await gateway.get(
            "/echo/x", headers={"X-Nops-Tenant": "evil", "X-Nops-Subject": "root"}
        )
        seen = (await response.json())["headers"]
        # The tenant, if any, is the one the signature proved, never the caller's claim.
        assert seen.get("x-nops-tenant") != "evil"
        assert "x-nops-subject" not in seen
