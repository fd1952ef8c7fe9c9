"""A fake token issuer for the tests: real keys, a real aiohttp JWKS endpoint, and minting.

It is an issuer the tests control (rotate keys, go down, redirect, grow),
served over real HTTP on a loopback port and counting every JWKS fetch.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from tests.secretscan import register_secret

__all__ = [
    "AUDIENCE",
    "TENANT",
    "FakeIssuer",
    "SigningKey",
    "b64url",
    "hs_token",
    "unsigned_token",
]

AUDIENCE = "nops-gateway"
TENANT = "acme"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segment(value: Mapping[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def unsigned_token(header: Mapping[str, Any], claims: Mapping[str, Any], signature: bytes) -> str:
    """A compact JWS with exactly this header, these claims and this signature."""
    token = f"{_segment(header)}.{_segment(claims)}.{b64url(signature)}"
    register_secret(token, "JWT (unsigned_token)")
    return token


def hs_token(header: Mapping[str, Any], claims: Mapping[str, Any], secret: bytes) -> str:
    """Signed with HMAC-SHA256 by hand: PyJWT refuses PEM secrets, attackers do not."""
    signing_input = f"{_segment(header)}.{_segment(claims)}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{b64url(signature)}"
    register_secret(token, "JWT (hs_token)")
    return token


@functools.cache
def _private_key(alg: str, index: int) -> Any:
    """Keys are slow to make (RSA): one per (alg, index) for the whole session."""
    if alg in ("RS256", "PS256"):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "ES384":
        return ec.generate_private_key(ec.SECP384R1())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(alg)


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: Any

    @property
    def jwk(self) -> dict[str, Any]:
        """The public JWK, with kid, use and alg."""
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig", "alg": self.alg}

    @property
    def public_pem(self) -> bytes:
        pem: bytes = self.private.public_key().public_bytes(
            Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
        )
        return pem


class FakeIssuer:
    """Signing keys plus a JWKS endpoint at ``/jwks.json`` that counts its fetches."""

    def __init__(self, issuer: str = "https://issuer.test/") -> None:
        self.issuer = issuer
        self.keys: dict[str, SigningKey] = {}
        #: Extra raw JWKs served as they are (broken keys, private members ...).
        self.extra_jwks: list[dict[str, Any]] = []
        self.fetches = 0
        #: While set, the JWKS endpoint answers with this status and no keys.
        self.failing_status: int | None = None
        #: Seconds the JWKS endpoint waits before answering.
        self.delay_s = 0.0
        #: Where ``/redirect`` points (absolute or relative).
        self.redirect_to = "/jwks.json"
        self.server: TestServer | None = None
        self._counter = 0

    # -- keys -------------------------------------------------------------
    def add_key(self, alg: str = "RS256", kid: str | None = None, *, index: int = 0) -> SigningKey:
        self._counter += 1
        key = SigningKey(kid or f"{alg.lower()}-{self._counter}", alg, _private_key(alg, index))
        self.keys[key.kid] = key
        return key

    def remove_key(self, kid: str) -> None:
        del self.keys[kid]

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.jwk for k in self.keys.values()] + self.extra_jwks}

    # -- tokens -----------------------------------------------------------
    def claims(self, **overrides: Any) -> dict[str, Any]:
        """Good claims for the gateway, with ``overrides`` applied (None drops a claim)."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": "svc-42",
            "tenant": TENANT,
            "scope": "locked:read agents:write",
            "roles": ["OPERATOR"],
            "agent_id": "a1",
            "iat": now,
            "nbf": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(
        self,
        key: SigningKey | None = None,
        *,
        headers: Mapping[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        """A token signed by ``key`` (the first key by default) with good claims."""
        key = key or next(iter(self.keys.values()))
        header: dict[str, Any] = {"kid": key.kid, **(headers or {})}
        header = {k: v for k, v in header.items() if v is not None}
        token = jwt.encode(self.claims(**claims), key.private, algorithm=key.alg, headers=header)
        register_secret(token, "JWT (FakeIssuer)")
        return token

    # -- the JWKS server ----------------------------------------------------
    @property
    def jwks_url(self) -> str:
        return self.url("/jwks.json")

    def url(self, path: str) -> str:
        assert self.server is not None
        return str(self.server.make_url(path))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/jwks.json", self._jwks)
        app.router.add_get("/redirect", self._redirect)
        app.router.add_get("/big", self._big)
        app.router.add_get("/not-json", self._not_json)
        return app

    async def start(self) -> FakeIssuer:
        self.server = TestServer(self.app(), host="127.0.0.1")
        await self.server.start_server()
        return self

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    async def _jwks(self, request: web.Request) -> web.StreamResponse:
        self.fetches += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.failing_status is not None:
            return web.Response(status=self.failing_status, text="down")
        return web.json_response(self.jwks(), content_type="application/jwk-set+json")

    async def _redirect(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(self.redirect_to)

    async def _big(self, request: web.Request) -> web.StreamResponse:
        """A JWKS padded past any sane size, streamed without a Content-Length."""
        self.fetches += 1
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b'{"keys": [], "padding": "')
        for _ in range(64):
            await response.write(b"x" * 4096)
        await response.write(b'"}')
        return response

    async def _not_json(self, request: web.Request) -> web.StreamResponse:
        self.fetches += 1
        return web.Response(text="<html>login</html>", content_type="text/html")
