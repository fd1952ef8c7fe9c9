"""The decision cache: same input, same policy revision, same decision.

:class:`CachingEngine` wraps the enforcing engine. Its key is the SHA-256 of
the RFC 8785 canonical JSON of the whole input document (less any
``key_exclude`` paths), the decision path and the policy and data revision
OPA reported (the canonical form is computed once per request). The
``key_exclude`` paths are also left out of the input OPA evaluates, so a
policy can never read a field that is not in the key. Correct by
construction:

- A decision is cached only under the revision that OPA reported *with it*
  (the ``provenance`` of the very answer). An answer without a revision (OPA
  loaded plain files, not a bundle) is never cached: nothing would tell the
  cache that those files changed. The supervised local OPA always reports one
  (gateway/policy/supervisor.py builds its directory into a bundle named by
  the files' SHA-256).
- Any revision change empties the whole cache. The cache learns of one from
  each answer and, because hits do not ask OPA, from a revision check made
  before a hit whenever ``revision_check_s`` has passed since the last one.
  A check that fails empties the cache and asks the engine (fail closed).
- An answer that reports a new revision while an older request was in flight
  is trusted only if no other change was seen since that request started, so
  a late answer from the old policy can never switch the cache back.

The cache is bounded twice: ``max_entries_per_tenant`` per tenant (so one
tenant cannot evict the others) and ``max_entries`` in all (the fullest
tenant gives up its least recently used entry first); entries also expire
after ``ttl_s``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from audit.record import canonical as canonical_json
from gateway.config import PolicyCacheConfig
from gateway.metrics import Metrics
from gateway.policy.engine import Decision, PolicyEngine, PolicyEngineError
from gateway.policy.result import REASON_ILL_TYPED, REASON_UNDEFINED

__all__ = ["CacheStats", "CachingEngine", "DecisionCache", "cache_key", "canonical_json"]

_log = logging.getLogger("gateway.policy.cache")

#: Decisions the gateway made up for an unusable answer: never cached, so a
#: fixed policy is asked again at once.
_UNCACHEABLE_REASONS: Final = frozenset({REASON_UNDEFINED, REASON_ILL_TYPED})

RevisionProbe = Callable[[], Awaitable[str]]


def cache_key(
    document: Mapping[str, Any], *, revision: str, scope: str, exclude: tuple[str, ...] = ()
) -> str:
    """SHA-256 hex of the decision path, the revision and the canonical input."""
    return _key(canonical_json(_without(document, exclude)), revision=revision, scope=scope)


def _key(canonical_input: bytes, *, revision: str, scope: str) -> str:
    # The JSON array is self-delimiting, so no two (scope, revision, input) collide.
    digest = hashlib.sha256(canonical_json([scope, revision]))
    digest.update(canonical_input)
    return digest.hexdigest()


def _without(document: Mapping[str, Any], paths: tuple[str, ...]) -> Mapping[str, Any]:
    if not paths:
        return document
    copy: dict[str, Any] = dict(document)
    for path in paths:
        _drop_path(copy, path.split("."))
    return copy


def _drop_path(node: dict[str, Any], parts: list[str]) -> None:
    """Remove ``parts`` from ``node``, copying (never changing) nested objects."""
    head, rest = parts[0], parts[1:]
    if not rest:
        node.pop(head, None)
        return
    child = node.get(head)
    if isinstance(child, Mapping):
        node[head] = dict(child)
        _drop_path(node[head], rest)


@dataclass(frozen=True, slots=True)
class CacheStats:
    revision: str
    entries: int
    tenants: int
    hits: int
    misses: int
    uncacheable: int
    flushes: int
    evictions: int


class DecisionCache:
    """Per-tenant LRU partitions with a TTL and a global bound."""

    def __init__(
        self,
        *,
        max_entries: int,
        max_entries_per_tenant: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max = max_entries
        self._max_per_tenant = max_entries_per_tenant
        self._ttl = ttl_s
        self._clock = clock
        self._partitions: dict[str, OrderedDict[str, tuple[float, Decision]]] = {}
        self._size = 0
        self.evictions = 0

    def __len__(self) -> int:
        return self._size

    @property
    def tenants(self) -> int:
        return len(self._partitions)

    def get(self, tenant: str, key: str) -> Decision | None:
        partition = self._partitions.get(tenant)
        if partition is None:
            return None
        entry = partition.get(key)
        if entry is None:
            return None
        expires, decision = entry
        if self._clock() >= expires:
            self._drop(tenant, key)
            return None
        partition.move_to_end(key)
        return decision

    def put(self, tenant: str, key: str, decision: Decision) -> None:
        partition = self._partitions.setdefault(tenant, OrderedDict())
        if key in partition:
            partition.move_to_end(key)
            partition[key] = (self._clock() + self._ttl, decision)
            return
        if len(partition) >= self._max_per_tenant:
            self._evict_oldest(tenant)
        if self._size >= self._max:
            # SECURITY (availability): the fullest tenant pays for the space.
            fullest = max(self._partitions, key=lambda t: len(self._partitions[t]))
            self._evict_oldest(fullest)
        partition = self._partitions.setdefault(tenant, OrderedDict())
        partition[key] = (self._clock() + self._ttl, decision)
        self._size += 1

    def clear(self) -> None:
        self._partitions.clear()
        self._size = 0

    def _evict_oldest(self, tenant: str) -> None:
        partition = self._partitions[tenant]
        oldest = next(iter(partition))
        self._drop(tenant, oldest)
        self.evictions += 1

    def _drop(self, tenant: str, key: str) -> None:
        partition = self._partitions[tenant]
        del partition[key]
        self._size -= 1
        if not partition:
            del self._partitions[tenant]


class CachingEngine:
    """A :class:`PolicyEngine` that answers repeated questions from memory."""

    def __init__(
        self,
        inner: PolicyEngine,
        config: PolicyCacheConfig,
        *,
        scope: str,
        revision_probe: RevisionProbe | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inner = inner
        self._config = config
        self._scope = scope
        self._probe = revision_probe
        self._metrics = metrics or Metrics()
        self._clock = clock
        self._cache = DecisionCache(
            max_entries=config.max_entries,
            max_entries_per_tenant=config.max_entries_per_tenant,
            ttl_s=config.ttl_s,
            clock=clock,
        )
        #: The revision the cached decisions belong to ("" before the first).
        self.revision = ""
        #: Counts revision changes seen; an answer is trusted only in its epoch.
        self._epoch = 0
        self._checked_at = float("-inf")
        self._check: asyncio.Future[None] | None = None
        self._counts = {"hit": 0, "miss": 0, "uncacheable": 0, "flush": 0}

    async def decide(self, document: Mapping[str, Any], decision_id: str) -> Decision:
        # SECURITY: a field left out of the key is left out of what the policy
        # sees too, so no policy can decide on it and be answered from another
        # request's decision (a per-request value such as signature.created).
        document = _without(document, self._config.key_exclude)
        tenant = _tenant_of(document)
        if self._cache and self._probe is not None:
            await self._check_revision()
        # The canonical form costs ~0.1 ms: only made once a revision makes it usable.
        canonical = self._canonical(document) if self.revision else None
        key = self._key(canonical, self.revision)
        if key is not None:
            cached = self._cache.get(tenant, key)
            if cached is not None:
                self._count("hit")
                return dataclasses.replace(
                    cached, decision_id=decision_id, engine_decision_id=None, cached=True
                )
        epoch = self._epoch
        decision = await self._inner.decide(document, decision_id)
        self._observe(decision.revision, epoch)
        # A decision is stored only under the revision OPA reported with it.
        if (
            not decision.revision
            or decision.revision != self.revision
            or _UNCACHEABLE_REASONS.intersection(decision.reasons)
        ):
            self._count("uncacheable")
            return decision
        if canonical is None:
            canonical = self._canonical(document)
        store = self._key(canonical, decision.revision)
        if store is None:
            self._count("uncacheable")
            return decision
        self._count("miss")
        self._cache.put(tenant, store, decision)
        return decision

    def flush(self, why: str = "admin") -> int:
        """Empty the cache; returns how many decisions were dropped."""
        dropped = len(self._cache)
        self._cache.clear()
        self._count("flush")
        _log.info(
            "decision cache emptied",
            extra={"why": why, "dropped": dropped, "policy_revision": self.revision},
        )
        return dropped

    def recheck(self) -> None:
        """Confirm the revision with the engine before the next hit.

        For an engine known to have gone away (the supervised OPA exited):
        until the check succeeds nothing is served from memory, and if the
        engine is still down the check fails, empties the cache and the
        request fails closed. A restarted engine on the same revision keeps
        the entries.
        """
        self._checked_at = float("-inf")

    def stats(self) -> CacheStats:
        return CacheStats(
            revision=self.revision,
            entries=len(self._cache),
            tenants=self._cache.tenants,
            hits=self._counts["hit"],
            misses=self._counts["miss"],
            uncacheable=self._counts["uncacheable"],
            flushes=self._counts["flush"],
            evictions=self._cache.evictions,
        )

    async def healthy(self) -> bool:
        return await self._inner.healthy()

    async def close(self) -> None:
        await self._inner.close()

    def _canonical(self, document: Mapping[str, Any]) -> bytes | None:
        try:
            return canonical_json(document)  # key_exclude already left out by decide()
        except (TypeError, ValueError):  # rfc8785.CanonicalizationError is a ValueError
            return None  # not canonical JSON (a float NaN, a huge integer): ask every time

    def _key(self, canonical: bytes | None, revision: str) -> str | None:
        if canonical is None:
            return None
        return _key(canonical, revision=revision, scope=self._scope)

    def _observe(self, revision: str, epoch: int) -> None:
        """Learn the revision from an answer to a request that started in ``epoch``."""
        if revision == self.revision:
            return
        if epoch != self._epoch:
            # SECURITY: a change was seen while this request was in flight, so
            # its answer may come from the older policy: it must not switch back.
            return
        self._switch(revision, why="answer")

    def _switch(self, revision: str, *, why: str) -> None:
        _log.info(
            "policy revision changed",
            extra={"from_revision": self.revision, "to_revision": revision, "seen_in": why},
        )
        self.revision = revision
        self._epoch += 1
        self.flush(why=f"revision change ({why})")

    async def _check_revision(self) -> None:
        if self._clock() - self._checked_at < self._config.revision_check_s:
            return
        if self._check is None:
            self._check = asyncio.ensure_future(self._run_check())
        check = self._check
        try:
            await asyncio.shield(check)
        finally:
            if check.done() and self._check is check:
                self._check = None

    async def _run_check(self) -> None:
        assert self._probe is not None  # noqa: S101 - only scheduled with a probe
        try:
            revision = await self._probe()
        except PolicyEngineError:
            # SECURITY: the revision cannot be confirmed; serve nothing cached.
            if len(self._cache):
                self.flush(why="revision check failed")
            self.revision = ""
            self._epoch += 1
            self._checked_at = float("-inf")
            return
        self._checked_at = self._clock()
        if revision != self.revision:
            self._switch(revision, why="check")

    def _count(self, outcome: str) -> None:
        self._counts[outcome] += 1
        self._metrics.decision_cache[outcome] += 1


def _tenant_of(document: Mapping[str, Any]) -> str:
    tenant = document.get("tenant")
    tenant_id = tenant.get("id") if isinstance(tenant, Mapping) else None
    return tenant_id if isinstance(tenant_id, str) else ""
