"""The replay (nonce) store: each nonce may be claimed once within its TTL.

Two implementations of one small interface:

- :class:`MemoryNonceStore` for a single node. A claim is a dictionary lookup
  with no ``await`` in it, so concurrent claims of one nonce on the event loop
  cannot both win. Expired entries are purged on every claim. The store is
  bounded: when it holds ``max_entries`` live nonces it refuses new claims
  (:class:`ReplayStoreFull`) rather than forgetting a live one, because
  forgetting would let that nonce be replayed. Only callers whose signature
  verified reach it, and they are rate limited.
- :class:`RedisNonceStore` for a cluster: ``SET key 1 NX PX ttl``, atomic on
  the Redis server, so replicas sharing one Redis agree on the one winner.
  (With the rate limits in the same Redis the freshness stage claims through
  :mod:`gateway.admission` instead, the same SET inside one script.)
  Any Redis failure is :class:`ReplayStoreUnavailable`; the caller fails
  closed.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

__all__ = [
    "MemoryNonceStore",
    "NonceStore",
    "RedisNonceStore",
    "ReplayStoreError",
    "ReplayStoreFull",
    "ReplayStoreUnavailable",
    "nonce_key",
]


class ReplayStoreError(Exception):
    """The store cannot say whether a nonce is new; ``reason`` names why."""

    reason = "replay_store_error"


class ReplayStoreUnavailable(ReplayStoreError):
    reason = "replay_store_unavailable"


class ReplayStoreFull(ReplayStoreError):
    reason = "replay_store_full"


class NonceStore(Protocol):
    async def claim(self, key: str, ttl_s: int) -> bool:
        """True iff ``key`` was not claimed within the last ``ttl_s`` seconds."""
        ...


def nonce_key(tenant_id: str, keyid: str, nonce: str) -> str:
    """The store key of one nonce; tenant ids and keyids never contain ':'."""
    return f"nops:nonce:{tenant_id}:{keyid}:{nonce}"


class MemoryNonceStore:
    """Nonces of one node, bounded, expired by the injected clock."""

    def __init__(self, *, max_entries: int, clock: Callable[[], float] = time.time) -> None:
        self._max = max_entries
        self._clock = clock
        self._expiry: dict[str, float] = {}
        # (expires_at, key) in expiry order; stale pairs are skipped on purge.
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    async def claim(self, key: str, ttl_s: int) -> bool:
        now = self._clock()
        self._purge(now)
        if key in self._expiry:
            return False
        if len(self._expiry) >= self._max:
            # SECURITY: fail closed; evicting a live nonce would allow its replay.
            raise ReplayStoreFull(f"{self._max} live nonces")
        expires = now + ttl_s
        self._expiry[key] = expires
        heapq.heappush(self._heap, (expires, key))
        return True

    def _purge(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            expires, key = heapq.heappop(heap)
            if self._expiry.get(key) == expires:
                del self._expiry[key]


class RedisNonceStore:
    """Nonces shared by every replica through one Redis."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def claim(self, key: str, ttl_s: int) -> bool:
        try:
            created = await self._redis.set(key, b"1", nx=True, px=max(ttl_s, 1) * 1000)
        except (RedisError, OSError, TimeoutError) as exc:
            raise ReplayStoreUnavailable(type(exc).__name__) from None
        return bool(created)
