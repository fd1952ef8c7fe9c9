"""The Redis Streams core: publish, consume, ack, pending, dead letters.

One topic of one tenant is one stream, ``nops:bus:{<tenant>}:<topic>``; its
dead letters are ``nops:bus:{<tenant>}:<topic>:dlq`` and its idempotency
keys ``nops:bus:{<tenant>}:<topic>:idem:<sha256>``. The braces are a Redis
Cluster hash tag: every key of a tenant lives in one slot, so the Lua
scripts (``bus/lua/``), which touch several of them, stay valid on a cluster. Names
are checked against :data:`NAME` (no ``:``), so no topic can reach another
topic's or another tenant's keys.

Delivery is at least once:

- **publish** is one ``XADD MAXLEN ~``; with an idempotency key, a Lua
  script does "if the key exists return its message id, else XADD and SET
  the key EX ttl" atomically, so concurrent duplicates make one message.
- **consume** first reclaims, then reads: one Lua script finds the group's
  entries idle longer than the visibility timeout (``XPENDING IDLE``),
  moves those already delivered ``max_deliveries`` times to the dead-letter
  stream (with the delivery count and the last consumer) and claims the
  rest for the caller (``XCLAIM``); then ``XREADGROUP >`` reads new entries,
  long-polling with ``BLOCK`` when nothing was reclaimed. Consumer groups
  are created on demand from the start of the stream (``MKSTREAM``).
- **ack** is ``XACK``; it counts only entries that were still pending, so
  each message is acknowledged exactly once.
- **redrive** moves dead letters back onto the topic (same envelope, new
  message id) in one Lua script.

Everything is bounded: streams by ``MAXLEN ~``, batches by ``max_batch``,
long-polls by ``max_poll_s`` and ``max_pollers``, commands waiting for Redis
by the auto-pipeline's queue (:mod:`bus.pipelining`); nothing is buffered
per consumer in this process.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from importlib import resources
from typing import Any, Final

import redis.exceptions
from redis.asyncio import BlockingConnectionPool, Redis

from bus.config import DEFAULT_BUS_CONFIG, BusConfig
from bus.envelope import Envelope, complete, fingerprint, validate
from bus.errors import (
    IdempotencyKeyReused,
    MalformedRequest,
    NoSubscription,
    Overloaded,
    PayloadTooLarge,
    RedisUnavailable,
    TenantMismatch,
)
from bus.keys import (
    MAX_ID_PART,
    MESSAGE_ID,
    NAME,
    TENANT,
    check,
    dlq_key,
    idempotency_redis_key,
    stream_key,
)
from bus.pipelining import AutoPipeline
from bus.results import DeadLetter, Delivery, Pending, PendingEntry, PublishResult, Redriven

__all__ = [
    "NAME",
    "TENANT",
    "BusClient",
    "DeadLetter",
    "Delivery",
    "Pending",
    "PendingEntry",
    "PublishResult",
    "Redriven",
    "dlq_key",
    "stream_key",
]

_log = logging.getLogger("bus.streams")

_FIELD: Final = b"e"
#: Connections for everything but blocking reads.
_COMMAND_POOL_SIZE: Final = 64
_COMMAND_TIMEOUT_S: Final = 5.0
#: Bound on the per-(stream, group) caches; past it they start over.
_MAX_TRACKED: Final = 10_000


def _lua(name: str) -> str:
    return resources.files("bus").joinpath(f"lua/{name}.lua").read_text()


_PUBLISH_IDEMPOTENT: Final = _lua("publish_idempotent")
_RECLAIM: Final = _lua("reclaim")
_REDRIVE: Final = _lua("redrive")


class BusClient:
    """The bus over Redis Streams; the HTTP service and in-process publishers use it.

    ``redis`` serves every command; ``poll_redis`` (default: ``redis``) serves
    the blocking ``XREADGROUP`` of long-polls, whose socket timeout must
    exceed ``config.max_poll_s``. Both must not decode responses.
    """

    def __init__(
        self,
        redis: Redis,
        config: BusConfig = DEFAULT_BUS_CONFIG,
        *,
        poll_redis: Redis | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._redis = redis
        self._poll_redis = poll_redis or redis
        self._clock = clock
        self._owned: list[Redis] = []
        # Per (stream, group) seen by this process: the group exists; when the
        # last reclaim ran. Both are caches, cleared when they grow past a bound.
        self._groups: set[tuple[str, str]] = set()
        self._reclaimed_at: dict[tuple[str, str], float] = {}
        # Reclaiming more often than this finds nothing new: entries become
        # reclaimable only after a whole visibility timeout.
        self._reclaim_every_s = min(config.visibility_timeout_s / 4, 1.0)
        self._pollers = 0
        self._pipeline = AutoPipeline(redis)
        self._publish_idempotent = redis.register_script(_PUBLISH_IDEMPOTENT)
        self._reclaim = redis.register_script(_RECLAIM)
        self._redrive = redis.register_script(_REDRIVE)

    @classmethod
    def connect(
        cls, config: BusConfig = DEFAULT_BUS_CONFIG, *, clock: Callable[[], float] = time.time
    ) -> BusClient:
        """A client with its own connection pools to ``config.redis_url``."""
        commands = Redis.from_pool(
            BlockingConnectionPool.from_url(
                config.redis_url,
                max_connections=_COMMAND_POOL_SIZE,
                timeout=_COMMAND_TIMEOUT_S,
                socket_connect_timeout=_COMMAND_TIMEOUT_S,
                socket_timeout=_COMMAND_TIMEOUT_S,
            )
        )
        polls = Redis.from_pool(
            BlockingConnectionPool.from_url(
                config.redis_url,
                max_connections=config.max_pollers,
                timeout=_COMMAND_TIMEOUT_S,
                socket_connect_timeout=_COMMAND_TIMEOUT_S,
                socket_timeout=config.max_poll_s + _COMMAND_TIMEOUT_S,
            )
        )
        client = cls(commands, config, poll_redis=polls, clock=clock)
        client._owned = [commands, polls]
        return client

    async def aclose(self) -> None:
        """Close the pools :meth:`connect` made (not clients passed in)."""
        for owned in self._owned:
            await owned.aclose()
        self._owned = []

    async def ping(self) -> None:
        async with _redis_errors():
            await self._redis.ping()

    # -- publish ------------------------------------------------------------------

    async def publish(
        self,
        tenant: str,
        topic: str,
        envelope: Envelope | Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> PublishResult:
        """Append a message to the tenant's topic; at most once per idempotency key.

        ``envelope`` is a complete :class:`Envelope` (its tenant must be
        ``tenant``) or a draft mapping with at least ``type`` and ``payload``,
        completed with the other arguments. Raises :class:`~bus.errors.BusError`
        subclasses: 422 invalid envelope, 403 tenant mismatch, 413 too large,
        409 idempotency key reused for another message, 503 Redis unavailable.
        """
        stream = stream_key(tenant, topic)
        if isinstance(envelope, Envelope):
            validate(envelope.to_dict())
            if envelope.tenant != tenant:
                raise TenantMismatch("the envelope names another tenant than the caller's")
        else:
            envelope = complete(
                envelope,
                tenant=tenant,
                idempotency_key=idempotency_key,
                traceparent=traceparent,
                tracestate=tracestate,
                clock=self._clock,
            )
        body = envelope.to_json()
        if len(body) > self.config.max_message_bytes:
            raise PayloadTooLarge(
                f"the envelope exceeds {self.config.max_message_bytes} bytes",
                reasons=("envelope_too_large",),
            )
        key = envelope.idempotency_key
        async with _redis_errors():
            if key is None:
                raw_id = await self._pipeline.call(
                    lambda pipe: pipe.xadd(
                        stream, {_FIELD: body}, maxlen=self.config.max_stream_len, approximate=True
                    )
                )
                return PublishResult(_text(raw_id), envelope.id, duplicate=False)
            mine = fingerprint(envelope)
            created, value = await self._pipeline.script(
                self._publish_idempotent,
                [stream, idempotency_redis_key(tenant, topic, key)],
                [
                    self.config.max_stream_len,
                    body,
                    self.config.idempotency_ttl_s,
                    envelope.id,
                    mine,
                ],
            )
        if created:
            return PublishResult(_text(value), envelope.id, duplicate=False)
        message_id, event_id, theirs = _text(value).split(" ")
        if theirs != mine:
            raise IdempotencyKeyReused(
                "this Idempotency-Key was used for a message with another type or payload",
                extra={"id": message_id},
            )
        return PublishResult(message_id, event_id, duplicate=True)

    # -- consume ------------------------------------------------------------------

    async def consume(
        self,
        tenant: str,
        topic: str,
        group: str,
        consumer: str,
        *,
        max_messages: int = 1,
        wait_s: float = 0.0,
    ) -> list[Delivery]:
        """Up to ``max_messages`` for ``consumer``: reclaimed ones first, then new ones.

        Waits up to ``wait_s`` for a new message when there is none (long
        poll). Raises :class:`~bus.errors.Overloaded` when ``max_pollers``
        long-polls are already waiting.
        """
        stream, dlq = stream_key(tenant, topic), dlq_key(tenant, topic)
        check(NAME, group, "group")
        check(NAME, consumer, "consumer")
        limit = self.config.max_batch
        if not 1 <= max_messages <= limit:
            raise MalformedRequest(f"max must be between 1 and {limit}", reasons=("invalid_max",))
        if not 0 <= wait_s <= self.config.max_poll_s:
            raise MalformedRequest(
                f"wait must be between 0 and {self.config.max_poll_s:g} seconds",
                reasons=("invalid_wait",),
            )
        if wait_s > 0:
            if self._pollers >= self.config.max_pollers:
                raise Overloaded(
                    "too many consumers are waiting; retry shortly",
                    headers={"Retry-After": "1"},
                )
            self._pollers += 1
        try:
            return await self._consume(stream, dlq, group, consumer, max_messages, wait_s)
        finally:
            if wait_s > 0:
                self._pollers -= 1

    async def _consume(
        self, stream: str, dlq: str, group: str, consumer: str, max_messages: int, wait_s: float
    ) -> list[Delivery]:
        async with _redis_errors():
            try:
                return await self._consume_once(stream, dlq, group, consumer, max_messages, wait_s)
            except redis.exceptions.ResponseError as exc:
                if not _is_nogroup(exc):
                    raise
            # The stream or group was deleted behind our cache: create it again, once.
            self._groups.discard((stream, group))
            return await self._consume_once(stream, dlq, group, consumer, max_messages, wait_s)

    async def _consume_once(
        self, stream: str, dlq: str, group: str, consumer: str, max_messages: int, wait_s: float
    ) -> list[Delivery]:
        await self._ensure_group(stream, group)
        deadline = time.monotonic() + wait_s
        # A long-poll blocks at most one visibility timeout at a time, then
        # looks for expired deliveries again, so a waiting consumer picks up
        # another's abandoned messages without waiting out its whole poll.
        slice_ms = max(int(self.config.visibility_timeout_s * 1000), 1)
        while True:
            found = await self._reclaim_expired(stream, dlq, group, consumer, max_messages)
            room = max_messages - len(found)
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            block_ms = min(remaining_ms, slice_ms) if not found else 0
            if room > 0:
                found += await self._read_new(stream, group, consumer, room, block_ms)
            if found or remaining_ms <= block_ms:
                return found

    async def _ensure_group(self, stream: str, group: str) -> None:
        if (stream, group) in self._groups:
            return
        try:
            await self._redis.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise
        if len(self._groups) >= _MAX_TRACKED:
            self._groups.clear()
        self._groups.add((stream, group))

    async def _reclaim_expired(
        self, stream: str, dlq: str, group: str, consumer: str, count: int
    ) -> list[Delivery]:
        key, now = (stream, group), time.monotonic()
        if now - self._reclaimed_at.get(key, -math.inf) < self._reclaim_every_s:
            return []
        if len(self._reclaimed_at) >= _MAX_TRACKED:
            self._reclaimed_at.clear()
        self._reclaimed_at[key] = now  # before the await: concurrent polls skip it
        result = await self._pipeline.script(
            self._reclaim,
            [stream, dlq],
            [
                group,
                consumer,
                int(self.config.visibility_timeout_s * 1000),
                self.config.max_deliveries,
                count,
                self.config.max_stream_len,
                int(self._clock() * 1000),
            ],
        )
        dead, *claimed = result
        if dead:
            _log.warning(
                "messages dead-lettered",
                extra={"stream": stream, "group": group, "count": int(dead)},
            )
        if len(claimed) >= count:
            self._reclaimed_at.pop(key, None)  # maybe more expired: the next poll looks again
        return [Delivery(_text(i), int(n), bytes(body)) for i, n, body in claimed]

    async def _read_new(
        self, stream: str, group: str, consumer: str, count: int, wait_ms: int
    ) -> list[Delivery]:
        if wait_ms <= 0:
            reply = await self._pipeline.call(
                lambda pipe: pipe.xreadgroup(group, consumer, {stream: ">"}, count=count)
            )
        else:
            reply = await self._poll_redis.xreadgroup(
                group, consumer, {stream: ">"}, count=count, block=wait_ms
            )
        deliveries: list[Delivery] = []
        for _name, entries in _stream_entries(reply):
            for raw_id, fields in entries:
                if fields is None:
                    continue  # trimmed between XADD and XREADGROUP
                deliveries.append(Delivery(_text(raw_id), 1, bytes(fields.get(_FIELD, b""))))
        return deliveries

    # -- ack, pending ---------------------------------------------------------------

    async def ack(self, tenant: str, topic: str, group: str, ids: Sequence[str]) -> int:
        """Acknowledge ``ids``; returns how many were pending (each counts once, ever)."""
        stream = stream_key(tenant, topic)
        check(NAME, group, "group")
        for message_id in ids:
            check(MESSAGE_ID, message_id, "id")
        if not ids:
            return 0
        async with _redis_errors():
            return int(await self._pipeline.call(lambda pipe: pipe.xack(stream, group, *ids)))

    async def pending(
        self,
        tenant: str,
        topic: str,
        group: str,
        *,
        max_entries: int = 100,
        consumer: str | None = None,
    ) -> Pending:
        """The group's delivered but unacknowledged messages (oldest first)."""
        stream = stream_key(tenant, topic)
        check(NAME, group, "group")
        if consumer is not None:
            check(NAME, consumer, "consumer")
        async with _redis_errors():
            with _no_group():
                summary = await self._redis.xpending(stream, group)
                rows = await self._redis.xpending_range(
                    stream, group, min="-", max="+", count=max_entries, consumername=consumer
                )
        return Pending(
            count=int(summary["pending"]),
            consumers={_text(c["name"]): int(c["pending"]) for c in summary["consumers"]},
            entries=[
                PendingEntry(
                    id=_text(row["message_id"]),
                    consumer=_text(row["consumer"]),
                    idle_ms=int(row["time_since_delivered"]),
                    deliveries=int(row["times_delivered"]),
                )
                for row in rows
            ],
        )

    # -- dead letters -----------------------------------------------------------------

    async def dead_letters(
        self, tenant: str, topic: str, *, max_entries: int = 100, after: str | None = None
    ) -> list[DeadLetter]:
        """The topic's dead letters, oldest first, after the id ``after`` if given."""
        dlq = dlq_key(tenant, topic)
        start = "-" if after is None else "(" + check(MESSAGE_ID, after, "after")
        if after is not None and all(int(part) == MAX_ID_PART for part in after.split("-")):
            return []  # nothing comes after the largest id (Redis refuses the interval)
        async with _redis_errors():
            rows = await self._redis.xrange(dlq, min=start, max="+", count=max_entries)
        letters: list[DeadLetter] = []
        for raw_id, fields in rows or []:
            field: dict[str, Any] = {_text(k): v for k, v in (fields or {}).items()}
            letters.append(
                DeadLetter(
                    id=_text(raw_id),
                    source_id=_text(field.get("source_id", b"")),
                    group=_text(field.get("group", b"")),
                    deliveries=int(field.get("deliveries", 0)),
                    last_consumer=_text(field.get("last_consumer", b"")),
                    reason=_text(field.get("reason", b"")),
                    dead_at_ms=int(field.get("dead_at", 0)),
                    envelope_json=bytes(field.get("e", b"null")),
                )
            )
        return letters

    async def redrive(
        self,
        tenant: str,
        topic: str,
        ids: Sequence[str] | None = None,
        *,
        max_entries: int = 100,
    ) -> list[Redriven]:
        """Move dead letters (``ids``, or the oldest ``max_entries``) back onto the topic.

        Each gets a new message id and a fresh delivery count; its envelope
        (and envelope id) is unchanged. Every consumer group of the topic sees
        it again, so consumers deduplicate by envelope id.
        """
        stream, dlq = stream_key(tenant, topic), dlq_key(tenant, topic)
        if ids is None:
            ids = [
                letter.id
                for letter in await self.dead_letters(tenant, topic, max_entries=max_entries)
            ]
        for message_id in ids:
            check(MESSAGE_ID, message_id, "id")
        if not ids:
            return []
        async with _redis_errors():
            rows = await self._redrive(keys=[dlq, stream], args=[self.config.max_stream_len, *ids])
        return [Redriven(_text(old), _text(new) if new else None) for old, new in rows]


def _stream_entries(reply: Any) -> list[tuple[Any, list[tuple[Any, Any]]]]:
    """XREADGROUP's reply as ``[(stream, [(id, fields)])]`` for RESP2 and RESP3 shapes."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return [(name, value[0] if value else []) for name, value in reply.items()]
    return [(name, entries) for name, entries in reply]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _is_nogroup(exc: redis.exceptions.ResponseError) -> bool:
    # Inside a script the error comes wrapped: "Error running script ... NOGROUP ...".
    return "NOGROUP" in str(exc)


@contextlib.contextmanager
def _no_group() -> Iterator[None]:
    """Redis's NOGROUP as :class:`~bus.errors.NoSubscription` (404)."""
    try:
        yield
    except redis.exceptions.ResponseError as exc:
        if _is_nogroup(exc):
            raise NoSubscription(
                "no such subscription on this topic (consume creates it)"
            ) from None
        raise


@contextlib.asynccontextmanager
async def _redis_errors() -> AsyncIterator[None]:
    """Redis trouble as :class:`~bus.errors.RedisUnavailable` (503)."""
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        _log.warning("redis unavailable", extra={"error": type(exc).__name__})
        raise RedisUnavailable(
            "the bus cannot reach Redis",
            reasons=("redis_unreachable",),
            headers={"Retry-After": "1"},
        ) from None
    except redis.exceptions.ResponseError as exc:
        # Scripts wrap the error ("Error running script ... OOM ..."), plain commands do not.
        if isinstance(exc, redis.exceptions.OutOfMemoryError) or "OOM " in str(exc):
            raise RedisUnavailable(
                "Redis is out of memory; the topic cannot take more messages",
                reasons=("redis_out_of_memory",),
                headers={"Retry-After": "5"},
            ) from None
        raise
