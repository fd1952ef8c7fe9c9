"""The ``signature`` stage: RFC 9421 HMAC over method, target, digest, nonce.

For a request carrying ``Signature-Input`` and ``Signature``:

1. parse both (RFC 8941) and pick the one signature to verify: the
   configured ``signature.label``, or else the only one present;
2. resolve ``keyid`` to a tenant key; the key alone fixes the algorithm, and
   an ``alg`` parameter that names another one is refused;
3. read the body (bounded by ``server.max_body_bytes``) and check that the
   covered components include the required ones (``content-digest`` only
   when there is a body; ``@authority`` + ``@path`` + ``@query`` stand in for
   ``@target-uri``);
4. rebuild the signature base (RFC 9421 §2.5) and compare HMAC-SHA256 in
   constant time;
5. check a covered ``Content-Digest`` (RFC 9530, sha-256 / sha-512) against
   the body read.

On success ``ctx.tenant`` and ``ctx.signature`` are set and ``ctx.body`` holds
the verified bytes for the proxy. ``created``, ``expires`` and the nonce are
judged by the next stage (:mod:`gateway.pipeline.freshness`).

A route with ``require_signature = false`` lets unsigned requests pass as
anonymous (their body still streams), but a signature that is present must
verify.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, NoReturn

from aiohttp import hdrs, web

from gateway.config import SignatureConfig
from gateway.context import RequestContext, Tenant
from gateway.errors import BadSignature, MalformedSignature, MissingSignature, PayloadTooLarge
from gateway.httpsig import (
    ComponentError,
    MalformedFields,
    Message,
    SignatureEntry,
    accept_signature,
    digest_mismatches,
    hmac_sha256,
    normalize_authority,
    parse_signature,
    signature_base,
)
from gateway.keyring import Keyring, KeyState, build_keyring

if TYPE_CHECKING:
    from gateway.pipeline import PipelineDeps

__all__ = ["SignatureStage", "build", "challenge"]

SIGNATURE_INPUT: Final = "Signature-Input"
SIGNATURE: Final = "Signature"
CONTENT_DIGEST: Final = "Content-Digest"
_TARGET_URI_PARTS: Final = frozenset({"@authority", "@path", "@query"})


def challenge(config: SignatureConfig) -> dict[str, str]:
    """Headers for a 401: Accept-Signature (RFC 9421 §5.1) with what to cover."""
    label = config.label or "sig1"
    return {"Accept-Signature": accept_signature(config.required_components, label)}


class SignatureStage:
    name = "signature"

    def __init__(
        self,
        config: SignatureConfig,
        keyring: Keyring,
        *,
        max_body: int,
        trusted_proxies: frozenset[str],
        clock: Callable[[], float],
    ) -> None:
        self._config = config
        self._keyring = keyring
        self._max_body = max_body
        self._trusted = trusted_proxies
        self._clock = clock
        self._required = frozenset(config.required_components)
        self._challenge = challenge(config)

    async def run(self, ctx: RequestContext) -> web.StreamResponse | None:
        request = ctx.request
        inputs = request.headers.getall(SIGNATURE_INPUT, [])
        values = request.headers.getall(SIGNATURE, [])
        if not inputs and not values:
            if ctx.route is not None and not ctx.route.require_signature:
                return None
            raise MissingSignature(
                "sign this request (RFC 9421); Accept-Signature lists what to cover",
                reasons=("signature_missing",),
                headers=self._challenge,
            )
        if not inputs or not values:
            raise MalformedSignature(
                "Signature-Input and Signature must both be present",
                reasons=("signature_incomplete",),
            )
        try:
            entry = parse_signature(inputs, values, self._config.label)
        except MalformedFields as exc:
            raise MalformedSignature(exc.detail, reasons=(exc.reason,)) from None
        params = _checked_params(entry)
        key = self._keyring.get(params["keyid"])
        if key is None:
            self._deny("unknown_key", "the keyid is not known")
        state = key.state(self._clock())
        if state is not KeyState.VALID:
            self._deny(state.value, "the key is outside its validity period")
        # SECURITY: the algorithm comes from the key, never from the message.
        if params.get("alg") is not None and params["alg"] != key.alg:
            self._deny("alg_mismatch", "the alg parameter does not match the key")
        body = await self._read_body(request)
        self._check_coverage(entry, has_body=bool(body))
        try:
            base = signature_base(self._message(request), entry.components, entry.params_value)
        except ComponentError as exc:
            self._deny(exc.reason, exc.detail)
        # SECURITY: constant-time comparison of the MAC.
        if not hmac.compare_digest(hmac_sha256(key.secret, base), entry.signature):
            self._deny("mac_mismatch", "the signature does not match the request")
        if any(item.value == "content-digest" for item in entry.components):
            self._check_digest(request.headers.getall(CONTENT_DIGEST, []), body)
        ctx.body = body
        ctx.tenant = Tenant(key.tenant_id, key.tier)
        if key.agent_id is not None:
            # The key proves the agent: per-agent quotas apply from here on.
            ctx.subject.agent_id = key.agent_id
        ctx.signature = {
            "keyid": key.keyid,
            "alg": key.alg,
            "created": params.get("created"),
            "expires": params.get("expires"),
            "nonce": params.get("nonce"),
            "label": entry.label,
        }
        return None

    def _deny(self, reason: str, detail: str) -> NoReturn:
        raise BadSignature(detail, reasons=(reason,), headers=self._challenge)

    async def _read_body(self, request: web.Request) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > self._max_body:
                raise PayloadTooLarge(f"request body exceeds {self._max_body} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _check_coverage(self, entry: SignatureEntry, *, has_body: bool) -> None:
        covered = {item.value for item in entry.components}
        missing = set(self._required) - covered
        if "@target-uri" in missing and covered >= _TARGET_URI_PARTS:
            missing.discard("@target-uri")
        if not has_body:
            missing.discard("content-digest")
        if missing:
            self._deny(
                "component_missing",
                f"the signature must cover {', '.join(sorted(missing))}",
            )

    def _check_digest(self, lines: list[str], body: bytes) -> None:
        try:
            mismatches = digest_mismatches(lines, body)
        except MalformedFields as exc:
            raise MalformedSignature(exc.detail, reasons=(exc.reason,)) from None
        if mismatches:
            self._deny("digest_mismatch", "Content-Digest does not match the body")

    def _message(self, request: web.Request) -> Message:
        scheme = request.scheme
        forwarded = request.headers.get(hdrs.X_FORWARDED_PROTO)
        if forwarded and request.remote in self._trusted:
            # The scheme the client used, as told by the proxy that terminated TLS.
            scheme = forwarded.split(",", 1)[0].strip().lower()
        path, sep, query = request.raw_path.partition("?")
        fields: dict[str, list[bytes]] = {}
        for name, value in request.raw_headers:
            fields.setdefault(name.decode("latin-1").lower(), []).append(value)
        return Message(
            method=request.method,
            scheme=scheme,
            authority=normalize_authority(request.host, scheme),
            path=path or "/",
            query=query if sep else None,
            fields={name: tuple(lines) for name, lines in fields.items()},
        )


def _checked_params(entry: SignatureEntry) -> dict[str, Any]:
    """The parameters the gateway reads, with their RFC 9421 §2.3 types."""
    params = dict(entry.params)
    expected = {"keyid": str, "alg": str, "nonce": str, "tag": str, "created": int, "expires": int}
    for name, kind in expected.items():
        if name in params and type(params[name]) is not kind:
            raise MalformedSignature(
                f"signature parameter {name} has the wrong type", reasons=(f"{name}_invalid",)
            )
    if "keyid" not in params:
        raise MalformedSignature("the signature has no keyid", reasons=("keyid_missing",))
    return params


def build(deps: PipelineDeps) -> SignatureStage:
    config = deps.config
    return SignatureStage(
        config.signature,
        build_keyring(config),
        max_body=config.server.max_body_bytes,
        trusted_proxies=frozenset(config.server.trusted_proxies),
        clock=deps.clock,
    )
