"""Quotas for the ``ratelimit`` stage: ``limits`` strategies over Redis or memory.

A request takes one unit from each of its quotas (tenant, agent, route, or
per-IP for anonymous traffic) through :class:`QuotaLimiter.take`, which works
in two passes:

1. *peek*: read every quota's window; the first one in order with nothing
   left refuses the request. A refused request consumes nothing, so an agent
   that floods past its own limit cannot use up its tenant's quota and starve
   the tenant's other agents, and a client hammering while limited does not
   push its own recovery further out.
2. *take*: ``hit`` every quota. Between the peek and the hit a concurrent
   request may take the last unit; that hit then fails and the request is
   refused, and only in that race do the units taken from its other quotas
   stay consumed (``limits`` has no atomic multi-key take and no refund).

The peek is not an extra cost: it is the read that the ``RateLimit`` header
fields need anyway. Over Redis the quotas of each pass are sent at once, so
a request waits two round trips whatever its number of quotas; in memory
they run one after another (no task overhead).

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

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Final, TypeVar

from limits import RateLimitItem
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import STRATEGIES, RateLimiter
from limits.errors import StorageError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.config import RateLimitConfig
from gateway.metrics import Metrics

__all__ = ["KEY_PREFIX", "Quota", "QuotaLimiter", "QuotaState", "TakeResult"]

_log = logging.getLogger("gateway.ratelimit")

#: Prefix of every rate-limit key in Redis (followed by the strategy name).
KEY_PREFIX: Final = "nops:rl"
# A failing Redis surfaces as any of these, depending on where it failed.
_STORAGE_ERRORS: Final = (StorageError, RedisError, OSError, TimeoutError)
_T = TypeVar("_T")


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
        strategy: Callable[[Storage], RateLimiter],
        shared: Storage | None,
        *,
        metrics: Metrics,
        retry_s: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._shared = strategy(shared) if shared is not None else None
        self._local = strategy(MemoryStorage())
        self._metrics = metrics
        self._retry_s = retry_s
        self._monotonic = monotonic
        self._retry_at = 0.0
        self.degraded = False

    @property
    def shared(self) -> bool:
        """True when quotas live in Redis (shared by every node), memory being the fallback."""
        return self._shared is not None

    @classmethod
    def for_config(
        cls, config: RateLimitConfig, *, redis: Redis | None, metrics: Metrics
    ) -> QuotaLimiter:
        """The limiter for ``config``; ``redis`` is the app's client, or None without Redis."""
        shared: Storage | None = None
        if config.storage == "redis" and redis is None:
            raise RuntimeError("ratelimit.storage is 'redis' but no Redis client is configured")
        if config.storage != "memory" and redis is not None:
            # Reuses the app's connection pool (and its timeouts); the URI only
            # tells limits which client library to drive. limits documents
            # ``connection_pool`` but types its options as scalars.
            shared = RedisStorage(
                "async+redis://",
                wrap_exceptions=True,
                implementation="redispy",
                # Strategies keep different data types under a key: a rolling
                # change of strategy must not meet the old one's keys.
                key_prefix=f"{KEY_PREFIX}:{config.strategy}",
                connection_pool=redis.connection_pool,  # type: ignore[arg-type]
            )
        return cls(
            STRATEGIES[config.strategy],
            shared,
            metrics=metrics,
            retry_s=config.fallback_retry_s,
        )

    async def take(self, quotas: Sequence[Quota]) -> TakeResult:
        """Peek at every quota in order, then take one unit from each (see module doc)."""
        if not quotas:
            return TakeResult()
        limiter = self._shared
        if limiter is None or (self.degraded and self._monotonic() < self._retry_at):
            return await _take(self._local, quotas, concurrent=False)
        try:
            result = await _take(limiter, quotas, concurrent=True)
        except _STORAGE_ERRORS as exc:
            self._fail(exc)
            return await _take(self._local, quotas, concurrent=False)
        if self.degraded:
            self._recover()
        return result

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


async def _take(limiter: RateLimiter, quotas: Sequence[Quota], *, concurrent: bool) -> TakeResult:
    windows = await _each(
        concurrent, [partial(limiter.get_window_stats, q.item, *q.identifiers) for q in quotas]
    )
    now = time.time()
    peeked: list[tuple[Quota, int, float]] = []
    for quota, stats in zip(quotas, windows, strict=True):
        reset_in = stats.reset_time - now
        if stats.remaining < 1:
            states = (*_passed(peeked, taken=False), _refused(quota, reset_in))
            return TakeResult(states, quota)
        peeked.append((quota, stats.remaining, reset_in))
    hits = await _each(concurrent, [partial(limiter.hit, q.item, *q.identifiers) for q in quotas])
    for index, hit in enumerate(hits):
        if not hit:
            # Lost a race for the last unit since the peek.
            quota, _, reset_in = peeked[index]
            states = (*_passed(peeked[:index], taken=True), _refused(quota, reset_in))
            return TakeResult(states, quota)
    return TakeResult(_passed(peeked, taken=True))


async def _each(concurrent: bool, calls: Sequence[Callable[[], Awaitable[_T]]]) -> list[_T]:
    """Run ``calls`` one after another, or at once (one round trip of latency over Redis)."""
    if concurrent and len(calls) > 1:
        return list(await asyncio.gather(*(call() for call in calls)))
    return [await call() for call in calls]


def _passed(peeked: Sequence[tuple[Quota, int, float]], *, taken: bool) -> tuple[QuotaState, ...]:
    states = []
    for quota, remaining, reset_in in peeked:
        window = quota.item.get_expiry()
        # An empty window (nothing to reset yet) starts with this request.
        reset = min(math.ceil(reset_in), window) if reset_in > 0 else window
        left = remaining - 1 if taken else remaining
        states.append(QuotaState(quota.policy, quota.item.amount, window, left, reset))
    return tuple(states)


def _refused(quota: Quota, reset_in: float) -> QuotaState:
    window = quota.item.get_expiry()
    reset = min(max(math.ceil(reset_in), 1), window)
    return QuotaState(quota.policy, quota.item.amount, window, 0, reset)
