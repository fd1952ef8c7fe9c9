"""Where agents are: the registry service, read over HTTP with a short cache.

The gateway asks the registry (``registry/``, its own service) through its
public API, as the tenant of the request (``X-Nops-Tenant``), so the
registry's tenant scoping applies to the gateway too:

- ``GET {registry_url}/agents/{id}`` for ``/agents/{id}/...``;
- ``GET {registry_url}/agents?capability=...&status=healthy`` for
  ``/agents/by-capability/{capability}/...``.

Answers (including "no such agent") are reused for ``cache_ttl_s``; one
lookup per key is in flight at a time, shared by every request waiting on
it. While the registry is unreachable, a cached answer keeps serving for
``stale_if_error_s`` more; past that, lookups fail and the route answers 503.
From a failed lookup until the next one that succeeds the directory is
``degraded`` (``/_readyz`` reports it).
Every endpoint URL is checked again here (http/https, a host, no
credentials, query or fragment); a record that fails is dropped.

See docs/adr/0007-agent-routing.md for why HTTP and not the database.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

import aiohttp
import orjson
import yarl

from gateway.config import AgentRouteConfig

__all__ = [
    "AgentDirectory",
    "AgentEndpoint",
    "HttpAgentDirectory",
    "RegistryUnavailable",
]

_log = logging.getLogger("gateway.agents")

_T = TypeVar("_T")
_MAX_ENTRIES: Final = 10_000
_MAX_ANSWER_BYTES: Final = 4 * 1024 * 1024
#: Most instances of one capability the gateway chooses among (one registry page).
_MAX_CANDIDATES: Final = 500
_NOT_FOUND: Final = "urn:nops:registry:problem:agent-not-found"


class RegistryUnavailable(Exception):
    """The registry did not give a usable answer; ``reason`` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class AgentEndpoint:
    """One agent as routing needs it."""

    id: str
    url: yarl.URL
    weight: int
    status: str

    @property
    def key(self) -> str:
        """Identifies the endpoint (circuit breakers, failover bookkeeping, logs)."""
        return str(self.url)


class AgentDirectory(Protocol):
    """Looks agents up for one tenant at a time."""

    async def agent(self, tenant: str, agent_id: str) -> AgentEndpoint | None: ...

    async def healthy(self, tenant: str, capability: str) -> tuple[AgentEndpoint, ...]: ...

    @property
    def degraded(self) -> bool:
        """True while the registry fails and answers come from the cache (or not at all)."""
        ...


def parse_endpoint(item: object) -> AgentEndpoint | None:
    """An agent record from the registry, or None if it is not one we would call."""
    if not isinstance(item, dict):
        return None
    agent_id, raw_url = item.get("id"), item.get("endpoint_url")
    weight, status = item.get("weight"), item.get("status")
    if not (
        isinstance(agent_id, str)
        and isinstance(raw_url, str)
        and isinstance(weight, int)
        and isinstance(status, str)
    ):
        return None
    try:
        url = yarl.URL(raw_url)
        port = url.port
    except ValueError:
        return None
    # SECURITY: never dial a URL with credentials, and only plain http(s).
    if (
        url.scheme not in ("http", "https")
        or not url.host
        or not port
        or url.raw_user is not None
        or url.raw_password is not None
        or url.raw_query_string
        or url.raw_fragment
    ):
        _log.warning("registry record with an unusable endpoint skipped", extra={"agent": agent_id})
        return None
    return AgentEndpoint(id=agent_id, url=url, weight=weight, status=status)


class HttpAgentDirectory:
    """The registry service's API, cached per (tenant, question)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        config: AgentRouteConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = _MAX_ENTRIES,
    ) -> None:
        self._session = session
        self._base = config.registry_url.rstrip("/")
        self._ttl = config.cache_ttl_s
        self._stale = config.stale_if_error_s
        self._timeout = aiohttp.ClientTimeout(total=config.registry_timeout_s)
        self._clock = clock
        self._max = max_entries
        self._cache: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self._inflight: dict[Hashable, asyncio.Task[Any]] = {}
        self._degraded = False

    @property
    def degraded(self) -> bool:
        return self._degraded

    async def agent(self, tenant: str, agent_id: str) -> AgentEndpoint | None:
        return await self._cached(
            ("agent", tenant, agent_id), lambda: self._fetch_agent(tenant, agent_id)
        )

    async def healthy(self, tenant: str, capability: str) -> tuple[AgentEndpoint, ...]:
        return await self._cached(
            ("capability", tenant, capability), lambda: self._fetch_healthy(tenant, capability)
        )

    async def _cached(self, key: Hashable, fetch: Callable[[], Awaitable[_T]]) -> _T:
        now = self._clock()
        entry = self._cache.get(key)
        if entry is not None and now - entry[0] < self._ttl:
            value: _T = entry[1]
            return value
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._load(key, fetch))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._settle(key, done))
        try:
            loaded: _T = await asyncio.shield(task)
        except RegistryUnavailable as exc:
            if not self._degraded:
                self._degraded = True
                _log.warning("agent registry failing", extra={"reason": exc.reason})
            if entry is not None and now - entry[0] < self._ttl + self._stale:
                _log.warning(
                    "registry unavailable; serving a cached answer",
                    extra={"reason": exc.reason, "age_s": round(now - entry[0], 3)},
                )
                stale: _T = entry[1]
                return stale
            raise
        return loaded

    def _settle(self, key: Hashable, task: asyncio.Task[Any]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved: waiters may all have gone

    async def _load(self, key: Hashable, fetch: Callable[[], Awaitable[_T]]) -> _T:
        value = await fetch()
        if self._degraded:
            self._degraded = False
            _log.info("agent registry answers again")
        self._cache[key] = (self._clock(), value)
        self._cache.move_to_end(key)
        while len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return value

    async def _fetch_agent(self, tenant: str, agent_id: str) -> AgentEndpoint | None:
        status, body = await self._get(f"/agents/{agent_id}", tenant, {})
        if status == 404:
            return None
        endpoint = parse_endpoint(body)
        if endpoint is None or endpoint.id != agent_id:
            raise RegistryUnavailable("registry_answer_malformed")
        return endpoint

    async def _fetch_healthy(self, tenant: str, capability: str) -> tuple[AgentEndpoint, ...]:
        params = {"capability": capability, "status": "healthy", "limit": str(_MAX_CANDIDATES)}
        _, body = await self._get("/agents", tenant, params)
        items = body.get("agents") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise RegistryUnavailable("registry_answer_malformed")
        endpoints = (parse_endpoint(item) for item in items)
        return tuple(e for e in endpoints if e is not None)

    async def _get(self, path: str, tenant: str, params: dict[str, str]) -> tuple[int, Any]:
        headers = {"X-Nops-Tenant": tenant, "Accept": "application/json"}
        try:
            async with self._session.get(
                self._base + path,
                params=params,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as response:
                status = response.status
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_chunked(64 * 1024):
                    size += len(chunk)
                    if size > _MAX_ANSWER_BYTES:
                        raise RegistryUnavailable("registry_answer_too_large")
                    chunks.append(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RegistryUnavailable(f"registry_{type(exc).__name__}") from None
        raw = b"".join(chunks)
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            raise RegistryUnavailable("registry_answer_malformed") from None
        if status == 404 and isinstance(body, dict) and body.get("type") == _NOT_FOUND:
            return 404, None
        if status != 200:
            # A 404 of another kind means a wrong registry_url, not a missing agent.
            raise RegistryUnavailable(f"registry_status_{status}")
        return status, body
