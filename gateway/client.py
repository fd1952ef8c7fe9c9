"""Sign requests for the NOPS gateway: RFC 9421 ``hmac-sha256`` with a tenant key.

For client developers (see ``docs/clients.md``)::

    from gateway.client import sign_request

    headers = sign_request(
        "POST", "https://gateway.example/echo/tasks", {"Content-Type": "application/json"},
        body, keyid="acme-2026-01", secret=key_bytes,
    )
    # send the request with these three headers added (Content-Digest,
    # Signature-Input, Signature) and exactly this method, URL and body.

or let an aiohttp session sign every request it sends::

    async with aiohttp.ClientSession(
        middlewares=(signing_middleware(keyid="acme-2026-01", secret=key_bytes),)
    ) as session:
        await session.post("https://gateway.example/echo/tasks", json={"hello": "world"})

The signature covers ``@method``, ``@target-uri`` and, when there is a body,
``content-digest`` (the gateway's default requirement), with ``created``,
``keyid`` and a fresh random ``nonce``. Each signed request can be sent once:
the gateway refuses a nonce it has seen (409).
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Literal

import yarl
from aiohttp import ClientHandlerType, ClientMiddlewareType, ClientRequest, ClientResponse
from http_sfv.dictionary import Dictionary

from gateway.httpsig import Message, content_digest, hmac_sha256, signature_base, signature_params

__all__ = [
    "ALGORITHM",
    "DEFAULT_LABEL",
    "default_components",
    "new_secret",
    "sign_request",
    "signing_middleware",
]

ALGORITHM: Final = "hmac-sha256"
DEFAULT_LABEL: Final = "sig1"

Headers = Mapping[str, str] | Iterable[tuple[str, str]]


def default_components(body: bytes | None) -> tuple[str, ...]:
    """What the gateway requires by default: content-digest only with a body."""
    if body:
        return ("@method", "@target-uri", "content-digest")
    return ("@method", "@target-uri")


def sign_request(
    method: str,
    url: str | yarl.URL,
    headers: Headers | None = None,
    body: bytes | None = None,
    *,
    keyid: str,
    secret: bytes,
    created: float | Literal[False] | None = None,
    nonce: str | Literal[False] | None = None,
    expires: float | None = None,
    components: Sequence[str] | None = None,
    label: str = DEFAULT_LABEL,
    digest_algorithms: Sequence[str] = ("sha-256",),
    alg: str | None = None,
    clock: Callable[[], float] = time.time,
) -> dict[str, str]:
    """The headers that sign this request: Content-Digest (if covered), Signature-Input, Signature.

    ``url`` must be absolute and exactly what is sent (scheme, host, port,
    path and query as they go on the wire). ``headers`` supplies the values
    of covered header fields; a Content-Digest among them is kept as it is
    (it must match the body), else one is computed when covered.
    ``created`` defaults to ``clock()`` and ``nonce`` to 128 random bits;
    ``False`` leaves either parameter out (the gateway then refuses the
    request; useful for interop tests only).
    ``alg`` adds the optional alg parameter; the gateway takes the algorithm
    from the key and refuses any value but ``hmac-sha256``. The MAC is always
    HMAC-SHA256.
    """
    pairs = list(headers.items() if isinstance(headers, Mapping) else headers or ())
    covered = tuple(components) if components is not None else default_components(body)
    added: dict[str, str] = {}
    if "content-digest" in covered and not any(k.lower() == "content-digest" for k, _ in pairs):
        added["Content-Digest"] = content_digest(body or b"", digest_algorithms)
        pairs.append(("Content-Digest", added["Content-Digest"]))
    params: dict[str, Any] = {}
    if created is not False:
        params["created"] = int(clock() if created is None else created)
    if expires is not None:
        params["expires"] = int(expires)
    params["keyid"] = keyid
    if nonce is not False:
        params["nonce"] = secrets.token_urlsafe(16) if nonce is None else nonce
    if alg is not None:
        params["alg"] = alg
    inner = signature_params(covered, params)
    base = signature_base(Message.from_url(method, url, pairs), tuple(inner), str(inner))
    signature_input = Dictionary()
    signature_input[label] = inner
    signature = Dictionary()
    signature[label] = hmac_sha256(secret, base)
    added["Signature-Input"] = str(signature_input)
    added["Signature"] = str(signature)
    return added


def signing_middleware(
    *,
    keyid: str,
    secret: bytes,
    components: Sequence[str] | None = None,
    label: str = DEFAULT_LABEL,
    clock: Callable[[], float] = time.time,
) -> ClientMiddlewareType:
    """An aiohttp client middleware that signs each request (and redirect) it sends."""

    async def sign(request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        body = await request.body.as_bytes() if request.body else b""
        signed = sign_request(
            request.method,
            request.url,
            request.headers.items(),
            body,
            keyid=keyid,
            secret=secret,
            components=components,
            label=label,
            clock=clock,
        )
        for name, value in signed.items():
            request.headers[name] = value
        return await handler(request)

    return sign


def new_secret() -> str:
    """A fresh 256-bit key in the base64 form the gateway's config reads."""
    return base64.b64encode(secrets.token_bytes(32)).decode("ascii")
