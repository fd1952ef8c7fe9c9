"""The ``freshness`` stage: ``created`` within the window, ``expires`` honoured, nonce once.

Runs only for requests whose signature the previous stage verified
(``ctx.signature`` is set); anonymous requests pass untouched. With ``now``
from the gateway's clock:

- ``created`` is required: more than ``max_skew_s`` ahead of ``now`` is
  ``created_in_future``, more than ``max_age_s`` behind is ``created_too_old``;
- ``expires``, when present, must not be in the past;
- the ``nonce`` parameter is required and is claimed in the replay store
  under ``nops:nonce:{tenant}:{keyid}:{nonce}`` for ``max_skew_s +
  max_age_s`` seconds, which covers every moment the same signature could
  still pass the ``created`` check. The first claim wins; every other copy
  gets 409 replayed-nonce.

The store is Redis (``SET NX PX``) when ``freshness.nonce_store`` is
``redis``, or ``auto`` with a Redis configured; otherwise memory. A store
that cannot answer fails closed: 503 dependency-unavailable.

When the rate limits live in the same Redis (and the ratelimit stage is on),
the claim and the take of the request's quotas are one call
(:mod:`gateway.admission`): one round trip instead of two or more. The
result goes to the ratelimit stage in ``ctx.quotas_taken``; a replay takes
nothing, exactly as when the stages called Redis one after the other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final, NoReturn

from aiohttp import web

from gateway.config import FreshnessConfig
from gateway.context import RequestContext
from gateway.errors import (
    DependencyUnavailable,
    MalformedSignature,
    ReplayedNonce,
    StaleRequest,
)
from gateway.pipeline.ratelimit import Ratelimit
from gateway.pipeline.signature import challenge
from gateway.ratelimits import STORAGE_ERRORS, admitted_result
from gateway.replay import (
    MemoryNonceStore,
    NonceStore,
    RedisNonceStore,
    ReplayStoreError,
    ReplayStoreUnavailable,
    nonce_key,
)

if TYPE_CHECKING:
    from gateway.pipeline import PipelineDeps

__all__ = ["MAX_NONCE_LENGTH", "Freshness", "build"]

_log = logging.getLogger("gateway.freshness")

#: Longer nonces are refused: they only cost replay-store memory.
MAX_NONCE_LENGTH: Final = 128


class Freshness:
    name = "freshness"

    def __init__(
        self,
        config: FreshnessConfig,
        store: NonceStore,
        *,
        clock: Callable[[], float],
        challenge: Mapping[str, str],
        quotas: Ratelimit | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._challenge = dict(challenge)
        # Set when the quotas are in the nonce store's Redis: one call for both.
        self._quotas = quotas

    async def run(self, ctx: RequestContext) -> web.StreamResponse | None:
        signature = ctx.signature
        if not signature or ctx.tenant is None:
            return None  # an anonymous request on a route that allows it
        now = self._clock()
        created = signature.get("created")
        expires = signature.get("expires")
        if created is None:
            self._stale("created_missing", "the signature has no created parameter")
        if created - now > self._config.max_skew_s:
            self._stale("created_in_future", "created lies in the future")
        if now - created > self._config.max_age_s:
            self._stale("created_too_old", "the signature is too old")
        if expires is not None and now > expires:
            self._stale("expired", "the signature has expired")
        nonce = signature.get("nonce")
        if nonce is None:
            raise MalformedSignature(
                "the signature has no nonce parameter", reasons=("nonce_missing",)
            )
        if not 0 < len(nonce) <= MAX_NONCE_LENGTH:
            raise MalformedSignature(
                f"the nonce must be 1 to {MAX_NONCE_LENGTH} characters", reasons=("nonce_invalid",)
            )
        key = nonce_key(ctx.tenant.id, signature["keyid"], nonce)
        try:
            if self._quotas is not None:
                first = await self._claim_and_take(ctx, key)
            else:
                first = await self._store.claim(key, self._config.nonce_ttl_s)
        except ReplayStoreError as exc:
            # SECURITY: fail closed; an unknown nonce state must not let a replay through.
            _log.error("replay store failed", extra={"reason": exc.reason})
            raise DependencyUnavailable(
                "the replay cache is unavailable; the request was not forwarded",
                reasons=(exc.reason,),
            ) from None
        if not first:
            raise ReplayedNonce("this nonce was already used", reasons=("nonce_reused",))
        return None

    async def _claim_and_take(self, ctx: RequestContext, key: str) -> bool:
        """Claim ``key`` and take ``ctx``'s quotas in one Redis call; True iff claimed."""
        assert self._quotas is not None  # noqa: S101 - only called when set
        admission = self._quotas.limiter.shared
        assert admission is not None  # noqa: S101 - build() checks it
        quotas = self._quotas.quotas(ctx)
        try:
            admitted = await admission.admit(
                [(q.item, q.identifiers) for q in quotas],
                nonce_key=key,
                nonce_ttl_s=self._config.nonce_ttl_s,
            )
        except STORAGE_ERRORS as exc:
            raise ReplayStoreUnavailable(type(exc).__name__) from None
        if admitted.nonce_claimed:
            ctx.quotas_taken = admitted_result(quotas, admitted)
        return admitted.nonce_claimed

    def _stale(self, reason: str, detail: str) -> NoReturn:
        raise StaleRequest(detail, reasons=(reason,), headers=self._challenge)


def build(deps: PipelineDeps) -> Freshness:
    config = deps.config.freshness
    store: NonceStore
    quotas: Ratelimit | None = None
    use_redis = config.nonce_store == "redis" or (
        config.nonce_store == "auto" and deps.redis is not None
    )
    if use_redis:
        if deps.redis is None:
            raise RuntimeError("freshness.nonce_store = redis needs a Redis client")
        store = RedisNonceStore(deps.redis)
        limits = deps.config.ratelimit
        if limits.enabled and limits.storage != "memory":
            quotas = Ratelimit.create(limits, redis=deps.redis, metrics=deps.metrics)
    else:
        store = MemoryNonceStore(max_entries=config.memory_max_nonces, clock=deps.clock)
    return Freshness(
        config,
        store,
        clock=deps.clock,
        challenge=challenge(deps.config.signature),
        quotas=quotas,
    )
