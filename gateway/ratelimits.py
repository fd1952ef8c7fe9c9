"""Quotas for the ``ratelimit`` stage: ``limits`` strategies over Redis or memory.

A request takes one unit from each of its quotas (tenant, agent, route, or
per-IP for anonymous traffic) through :class:`QuotaLimiter.take`: it *peeks*
at every quota's window, and the first one in order with nothing left
refuses the request; only when none refuses does it *take* one unit from
each. A refused request consumes nothing, so an agent that floods past its
own limit cannot use up its tenant's quota and starve the tenant's other
agents, and a client hammering while limited does not push its own recovery
further out (ADR 0006). The peek is the read the ``RateLimit`` header fields
need anyway.

Over Redis the peek and the take are one Lua script
(:mod:`gateway.admission`): one round trip whatever the number of quotas,
atomic, and able to claim the request's nonce in the same call
(:meth:`QuotaLimiter.admit`, used by the freshness stage). In memory they
are the ``limits`` strategies, one call after another; between the peek and
the take nothing else runs on the event loop unless a storage call yields,
and a lost race only refuses the request.

With Redis, every node shares the windows. When Redis fails (any storage
error, including a timeout) the limiter answers from a per-node memory
storage instead, reports itself degraded (``degraded``, and
``Metrics.ratelimit_degraded``), logs one warning, and goes back to Redis
once it answers again, trying at most every ``fallback_retry_s``: security
checks fail closed, quotas degrade (DESIGN.md). Quotas restart from zero in
memory, so a degraded cluster of N nodes admits up to N times the quota.

Times come from ``time.time``, not an injected clock: ``limits`` reads the
wall clock itself, and the seconds reported to clients must agree with it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from limits import RateLimitItem
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import STRATEGIES, RateLimiter
from limits.errors import StorageError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.admission import Admitted, RedisAdmission, Strategy
from gateway.config import RateLimitConfig
from gateway.metrics import Metrics

__all__ = [
    "KEY_PREFIX",
    "STORAGE_ERRORS",
    "Quota",
    "QuotaLimiter",
    "QuotaState",
    "TakeResult",
    "admitted_result",
]

_log = logging.getLogger("gateway.ratelimit")

#: Prefix of every rate-limit key in Redis (followed by the strategy name).
KEY_PREFIX: Final = "nops:rl"
# A failing Redis surfaces as any of these, depending on where it failed.
STORAGE_ERRORS: Final = (StorageError, RedisError, OSError, TimeoutError)


@dataclass(frozen=True, slots=True)
class Quota:
    """One limit applied to one partition, e.g. tenant ``acme`` at 1000/minute."""

    #: The policy name sent in the RateLimit header fields ("tenant", ...).
    policy: str
    item: RateLimitItem
    #: What partitions the limit (tenant id, agent id, route, address).
    identifiers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class QuotaState:
    """A quota as this request left it."""

    policy: str
    #: Requests allowed per window, and the window in seconds.
    limit: int
    window: int
    #: Requests left (0 when this quota refused the request).
    remaining: int
    #: Whole seconds until more requests are allowed (>= 1 when refused).
    reset: int


@dataclass(frozen=True, slots=True)
class TakeResult:
    #: The quotas read, in order; the refusing one last.
    states: tuple[QuotaState, ...] = ()
    #: The quota that refused the request, or None when it may go on.
    refused: Quota | None = None


class QuotaLimiter:
    """Takes quotas from Redis (shared) or memory (this node), falling back to memory."""

    def __init__(
        self,
        strategy: Strategy,
        shared: RedisAdmission | None,
        *,
        metrics: Metrics,
        retry_s: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.shared = shared
        local: Callable[[MemoryStorage], RateLimiter] = STRATEGIES[strategy]
        self._local = local(MemoryStorage())
        self._metrics = metrics
        self._retry_s = retry_s
        self._monotonic = monotonic
        self._retry_at = 0.0
        self.degraded = False

    @classmethod
    def for_config(
        cls, config: RateLimitConfig, *, redis: Redis | None, metrics: Metrics
    ) -> QuotaLimiter:
        """The limiter for ``config``; ``redis`` is the app's client, or None without Redis."""
        shared: RedisAdmission | None = None
        if config.storage == "redis" and redis is None:
            raise RuntimeError("ratelimit.storage is 'redis' but no Redis client is configured")
        if config.storage != "memory" and redis is not None:
            # Strategies keep different data types under a key: a rolling
            # change of strategy must not meet the old one's keys.
            shared = RedisAdmission(
                redis, strategy=config.strategy, key_prefix=f"{KEY_PREFIX}:{config.strategy}"
            )
        return cls(config.strategy, shared, metrics=metrics, retry_s=config.fallback_retry_s)

    @property
    def uses_shared(self) -> bool:
        """True when the next take should go to Redis (not degraded, or time to retry)."""
        return self.shared is not None and (
            not self.degraded or self._monotonic() >= self._retry_at
        )

    async def take(self, quotas: Sequence[Quota]) -> TakeResult:
        """Peek at every quota in order, then take one unit from each (see module doc)."""
        if not quotas:
            return TakeResult()
        if self.shared is None or not self.uses_shared:
            return await _take_local(self._local, quotas)
        try:
            admitted = await self.shared.admit([(q.item, q.identifiers) for q in quotas])
        except STORAGE_ERRORS as exc:
            self._fail(exc)
            return await _take_local(self._local, quotas)
        self.shared_answered()
        return admitted_result(quotas, admitted)

    def shared_answered(self) -> None:
        """Redis answered a take (here or in the freshness stage's combined call)."""
        if self.degraded:
            self._recover()

    def _fail(self, exc: BaseException) -> None:
        self._metrics.ratelimit_storage_errors += 1
        self._retry_at = self._monotonic() + self._retry_s
        if not self.degraded:
            self.degraded = self._metrics.ratelimit_degraded = True
            # SECURITY: the error type only; its text may carry the Redis address.
            _log.warning(
                "rate-limit storage unavailable: limiting per node in memory",
                extra={"error": type(exc).__name__, "retry_s": self._retry_s},
            )

    def _recover(self) -> None:
        self.degraded = self._metrics.ratelimit_degraded = False
        _log.info("rate-limit storage is back: limits are shared again")


def admitted_result(quotas: Sequence[Quota], admitted: Admitted) -> TakeResult:
    """The :class:`TakeResult` of a script run that claimed its nonce (if it had one)."""
    now = time.time()
    peeked = [
        (quota, stats.remaining, stats.reset_time - now)
        for quota, stats in zip(quotas, admitted.windows, strict=False)
    ]
    if admitted.refused is None:
        return TakeResult(_passed(peeked, taken=True))
    quota, _, reset_in = peeked[admitted.refused]
    return TakeResult(
        (*_passed(peeked[: admitted.refused], taken=False), _refused(quota, reset_in)), quota
    )


async def _take_local(limiter: RateLimiter, quotas: Sequence[Quota]) -> TakeResult:
    windows = [await limiter.get_window_stats(q.item, *q.identifiers) for q in quotas]
    # After the reads: an empty window's reset time is "now" as the strategy saw it.
    now = time.time()
    peeked: list[tuple[Quota, int, float]] = []
    for quota, stats in zip(quotas, windows, strict=True):
        reset_in = stats.reset_time - now
        if stats.remaining < 1:
            states = (*_passed(peeked, taken=False), _refused(quota, reset_in))
            return TakeResult(states, quota)
        peeked.append((quota, stats.remaining, reset_in))
    for index, quota in enumerate(quotas):
        if not await limiter.hit(quota.item, *quota.identifiers):
            # Lost a race for the last unit since the peek.
            quota, _, reset_in = peeked[index]
            states = (*_passed(peeked[:index], taken=True), _refused(quota, reset_in))
            return TakeResult(states, quota)
    return TakeResult(_passed(peeked, taken=True))


def _passed(peeked: Sequence[tuple[Quota, int, float]], *, taken: bool) -> tuple[QuotaState, ...]:
    states = []
    for quota, remaining, reset_in in peeked:
        window = quota.item.get_expiry()
        # An empty window (nothing to reset yet) starts with this request.
        reset = min(math.ceil(reset_in), window) if reset_in > 0 else window
        left = max(remaining - 1, 0) if taken else remaining
        states.append(QuotaState(quota.policy, quota.item.amount, window, left, reset))
    return tuple(states)


def _refused(quota: Quota, reset_in: float) -> QuotaState:
    window = quota.item.get_expiry()
    reset = min(max(math.ceil(reset_in), 1), window)
    return QuotaState(quota.policy, quota.item.amount, window, 0, reset)
