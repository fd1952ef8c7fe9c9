"""The Redis Streams core (the Python API, ``bus.streams.BusClient``) against a real Redis."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis

from bus import streams as bus_streams
from bus.config import BusConfig
from bus.envelope import Envelope
from bus.errors import (
    IdempotencyKeyReused,
    InvalidEnvelope,
    MalformedRequest,
    NoSubscription,
    PayloadTooLarge,
    RedisUnavailable,
    TenantMismatch,
)
from bus.streams import BusClient, dlq_key, stream_key
from tests.services import RedisService

EVENT = {"type": "agent.registered", "payload": {"agent": "a1"}}


def _event(n: int) -> dict[str, object]:
    return {"type": "test.event", "payload": {"n": n}}


class TestKeys:
    def test_stream_names_are_tenant_scoped_with_a_hash_tag(self) -> None:
        """Tenant in a Redis Cluster hash tag, topic after it; the DLQ beside the stream."""
        assert stream_key("acme", "agents") == "nops:bus:{acme}:agents"
        assert dlq_key("acme", "agents") == "nops:bus:{acme}:agents:dlq"

    @pytest.mark.parametrize(
        ("tenant_name", "topic", "reason"),
        [
            pytest.param("acme", "a:dlq", "invalid_topic", id="colon-in-topic"),
            pytest.param("acme", "", "invalid_topic", id="empty-topic"),
            pytest.param("acme", "x" * 129, "invalid_topic", id="long-topic"),
            pytest.param("acme", "../x", "invalid_topic", id="dots-first"),
            pytest.param("ac}me", "t", "invalid_tenant", id="brace-in-tenant"),
            pytest.param("acme:other", "t", "invalid_tenant", id="colon-in-tenant"),
            pytest.param("", "t", "invalid_tenant", id="empty-tenant"),
        ],
    )
    def test_names_that_could_reach_other_keys_are_refused(
        self, tenant_name: str, topic: str, reason: str
    ) -> None:
        """No name can make a key outside its own tenant and topic."""
        with pytest.raises(MalformedRequest) as caught:
            stream_key(tenant_name, topic)
        assert caught.value.reasons == (reason,)


class TestPublishConsumeAck:
    async def test_published_message_is_consumed_and_acked_once(
        self, bus: BusClient, tenant: str
    ) -> None:
        """Publish, consume (first delivery), ack (1), ack again (0), nothing pending."""
        published = await bus.publish(tenant, "agents", EVENT)
        [delivery] = await bus.consume(tenant, "agents", "g", "c1", max_messages=10)
        assert delivery.id == published.id
        assert delivery.deliveries == 1
        assert delivery.envelope["id"] == published.event_id
        assert delivery.envelope["tenant"] == tenant
        assert delivery.envelope["payload"] == {"agent": "a1"}
        assert await bus.ack(tenant, "agents", "g", [delivery.id]) == 1
        assert await bus.ack(tenant, "agents", "g", [delivery.id]) == 0
        assert (await bus.pending(tenant, "agents", "g")).count == 0

    async def test_messages_come_in_order_in_bounded_batches(
        self, bus: BusClient, tenant: str
    ) -> None:
        """A batch holds at most ``max_messages``, oldest first."""
        ids = [(await bus.publish(tenant, "t", _event(n))).id for n in range(7)]
        first = await bus.consume(tenant, "t", "g", "c", max_messages=5)
        second = await bus.consume(tenant, "t", "g", "c", max_messages=5)
        assert [d.id for d in first] == ids[:5]
        assert [d.id for d in second] == ids[5:]

    async def test_each_group_gets_every_message(self, bus: BusClient, tenant: str) -> None:
        """Two consumer groups on one topic each receive the message."""
        await bus.publish(tenant, "t", EVENT)
        first = await bus.consume(tenant, "t", "billing", "c", max_messages=5)
        second = await bus.consume(tenant, "t", "audit", "c", max_messages=5)
        assert [d.id for d in first] == [d.id for d in second]

    async def test_group_created_on_demand_sees_earlier_messages(
        self, bus: BusClient, tenant: str
    ) -> None:
        """A group made by its first consume starts from the beginning of the stream."""
        published = await bus.publish(tenant, "t", EVENT)
        [delivery] = await bus.consume(tenant, "t", "late", "c", max_messages=5)
        assert delivery.id == published.id

    async def test_complete_envelope_can_be_published(self, bus: BusClient, tenant: str) -> None:
        """An Envelope object (e.g. from the registry) is stored as given."""
        envelope = Envelope(
            id="evt-7",
            tenant=tenant,
            type="agent.heartbeat",
            time="2025-01-01T00:00:00Z",
            payload={"a": 1},
        )
        await bus.publish(tenant, "t", envelope)
        [delivery] = await bus.consume(tenant, "t", "g", "c")
        assert delivery.envelope == envelope.to_dict()

    async def test_complete_envelope_of_another_tenant_is_refused(
        self, bus: BusClient, tenant: str
    ) -> None:
        """An Envelope for tenant B cannot be published into tenant A's topic."""
        envelope = Envelope(
            id="e", tenant="other", type="x", time="2025-01-01T00:00:00Z", payload=1
        )
        with pytest.raises(TenantMismatch):
            await bus.publish(tenant, "t", envelope)

    async def test_invalid_complete_envelope_is_refused(self, bus: BusClient, tenant: str) -> None:
        """A hand-built Envelope is validated like a draft."""
        envelope = Envelope(id="e", tenant=tenant, type="Not Valid", time="x", payload=1)
        with pytest.raises(InvalidEnvelope):
            await bus.publish(tenant, "t", envelope)

    async def test_oversized_envelope_is_refused(self, bus: BusClient, tenant: str) -> None:
        """An envelope over max_message_bytes is a 413 and is not stored."""
        with pytest.raises(PayloadTooLarge):
            await bus.publish(tenant, "t", {"type": "x", "payload": "a" * 5000})
        assert await bus.consume(tenant, "t", "g", "c") == []

    async def test_ack_of_unknown_group_or_id_acks_nothing(
        self, bus: BusClient, tenant: str
    ) -> None:
        """Acking an id that is not pending in the group counts 0 (XACK's answer)."""
        published = await bus.publish(tenant, "t", EVENT)
        assert await bus.ack(tenant, "t", "nobody", [published.id]) == 0
        assert await bus.ack(tenant, "t", "g", ["1-0"]) == 0

    async def test_consume_recovers_when_stream_is_deleted(
        self, bus: BusClient, tenant: str, raw_redis: Redis
    ) -> None:
        """A deleted stream (and its groups) is recreated on the next consume."""
        await bus.consume(tenant, "t", "g", "c")
        await raw_redis.delete(stream_key(tenant, "t"))
        published = await bus.publish(tenant, "t", EVENT)
        [delivery] = await bus.consume(tenant, "t", "g", "c")
        assert delivery.id == published.id


class TestLongPoll:
    async def test_empty_poll_returns_after_wait(self, bus: BusClient, tenant: str) -> None:
        """With nothing to read, a long-poll returns empty after about ``wait_s``."""
        started = time.monotonic()
        assert await bus.consume(tenant, "t", "g", "c", wait_s=0.5) == []
        assert 0.45 <= time.monotonic() - started < 2.0

    async def test_poll_wakes_when_a_message_arrives(self, bus: BusClient, tenant: str) -> None:
        """A waiting consumer gets a new message at once, not at the end of its wait."""
        poll = asyncio.create_task(bus.consume(tenant, "t", "g", "c", wait_s=4.0))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        published = await bus.publish(tenant, "t", EVENT)
        [delivery] = await poll
        assert delivery.id == published.id
        assert time.monotonic() - started < 1.0

    async def test_waiting_consumer_picks_up_expired_deliveries(
        self, bus: BusClient, tenant: str
    ) -> None:
        """A long-poll longer than the visibility timeout also reclaims abandoned messages."""
        published = await bus.publish(tenant, "t", EVENT)
        await bus.consume(tenant, "t", "g", "crashed")
        started = time.monotonic()
        [delivery] = await bus.consume(tenant, "t", "g", "waiting", wait_s=4.0)
        assert delivery.id == published.id
        assert delivery.deliveries == 2
        assert time.monotonic() - started < 2.5

    @pytest.mark.parametrize(
        ("max_messages", "wait_s", "reason"),
        [
            pytest.param(0, 0.0, "invalid_max", id="max-0"),
            pytest.param(51, 0.0, "invalid_max", id="max-over-batch"),
            pytest.param(1, -1.0, "invalid_wait", id="negative-wait"),
            pytest.param(1, 5.1, "invalid_wait", id="wait-over-max-poll"),
        ],
    )
    async def test_poll_bounds(
        self, bus: BusClient, tenant: str, max_messages: int, wait_s: float, reason: str
    ) -> None:
        """Batches and waits are bounded by max_batch and max_poll_s."""
        with pytest.raises(MalformedRequest) as caught:
            await bus.consume(tenant, "t", "g", "c", max_messages=max_messages, wait_s=wait_s)
        assert caught.value.reasons == (reason,)


class TestRedelivery:
    async def test_unacked_message_is_redelivered_after_visibility_timeout(
        self, bus: BusClient, tenant: str
    ) -> None:
        """Not before the timeout; after it, to another consumer, with deliveries 2."""
        published = await bus.publish(tenant, "t", EVENT)
        await bus.consume(tenant, "t", "g", "c1")
        assert await bus.consume(tenant, "t", "g", "c2") == []
        await asyncio.sleep(1.1)
        [again] = await bus.consume(tenant, "t", "g", "c2")
        assert (again.id, again.deliveries) == (published.id, 2)
        pending = await bus.pending(tenant, "t", "g")
        assert pending.consumers == {"c2": 1}
        assert pending.entries[0].deliveries == 2

    async def test_pending_lists_owner_idle_time_and_deliveries(
        self, bus: BusClient, tenant: str
    ) -> None:
        """The pending list shows each unacked message's consumer, idle time and count."""
        for n in range(3):
            await bus.publish(tenant, "t", _event(n))
        await bus.consume(tenant, "t", "g", "c1", max_messages=2)
        await bus.consume(tenant, "t", "g", "c2", max_messages=2)
        pending = await bus.pending(tenant, "t", "g")
        assert pending.count == 3
        assert pending.consumers == {"c1": 2, "c2": 1}
        assert [e.consumer for e in pending.entries] == ["c1", "c1", "c2"]
        assert all(e.deliveries == 1 and e.idle_ms >= 0 for e in pending.entries)
        only_c2 = await bus.pending(tenant, "t", "g", consumer="c2")
        assert [e.consumer for e in only_c2.entries] == ["c2"]

    async def test_pending_of_unknown_group_is_no_subscription(
        self, bus: BusClient, tenant: str
    ) -> None:
        """Asking for a group that was never consumed from is a 404."""
        with pytest.raises(NoSubscription):
            await bus.pending(tenant, "t", "never")


class TestDeadLetters:
    async def _deliver_until_dead(self, bus: BusClient, tenant: str) -> str:
        published = await bus.publish(tenant, "t", EVENT)
        for attempt in range(1, 4):  # max_deliveries = 3
            [delivery] = await bus.consume(tenant, "t", "g", f"c{attempt}")
            assert delivery.deliveries == attempt
            await asyncio.sleep(1.05)
        # The next consume finds it delivered max_deliveries times: dead letter.
        assert await bus.consume(tenant, "t", "g", "c4") == []
        return published.id

    async def test_message_moves_to_dlq_after_max_deliveries(
        self, bus: BusClient, tenant: str
    ) -> None:
        """After N unacked deliveries the message is dead-lettered with the reason."""
        source_id = await self._deliver_until_dead(bus, tenant)
        [letter] = await bus.dead_letters(tenant, "t")
        assert letter.source_id == source_id
        assert (letter.group, letter.deliveries, letter.last_consumer) == ("g", 3, "c3")
        assert letter.reason == "max_deliveries"
        assert letter.dead_at_ms > 0
        assert (await bus.pending(tenant, "t", "g")).count == 0

    async def test_redrive_puts_the_message_back_with_a_fresh_count(
        self, bus: BusClient, tenant: str
    ) -> None:
        """Re-drive republishes the same envelope under a new id; the DLQ empties."""
        await self._deliver_until_dead(bus, tenant)
        [letter] = await bus.dead_letters(tenant, "t")
        [moved] = await bus.redrive(tenant, "t")
        assert moved.dead_letter_id == letter.id
        assert moved.id is not None
        [delivery] = await bus.consume(tenant, "t", "g", "c5")
        assert (delivery.id, delivery.deliveries) == (moved.id, 1)
        assert delivery.envelope_json == letter.envelope_json
        assert await bus.dead_letters(tenant, "t") == []

    async def test_redrive_of_unknown_id_reports_it_missing(
        self, bus: BusClient, tenant: str
    ) -> None:
        """A dead-letter id that is not there is reported, not invented."""
        [moved] = await bus.redrive(tenant, "t", ["1-0"])
        assert moved.id is None

    async def test_dead_letters_page_with_after(self, bus: BusClient, tenant: str) -> None:
        """Listing pages through the DLQ oldest first."""
        for n in range(3):
            await bus.publish(tenant, "t", _event(n))
        for _ in range(3):
            await bus.consume(tenant, "t", "g", "c", max_messages=10)
            await asyncio.sleep(1.05)
        await bus.consume(tenant, "t", "g", "c", max_messages=10)
        first = await bus.dead_letters(tenant, "t", max_entries=2)
        rest = await bus.dead_letters(tenant, "t", max_entries=2, after=first[-1].id)
        assert len(first) == 2
        assert len(rest) == 1
        assert [lt.deliveries for lt in first + rest] == [3, 3, 3]


class TestIdempotency:
    async def test_retry_returns_the_original_id(self, bus: BusClient, tenant: str) -> None:
        """A retried publish with the same key is a no-op that returns the first id."""
        first = await bus.publish(tenant, "t", EVENT, idempotency_key="k-1")
        again = await bus.publish(tenant, "t", EVENT, idempotency_key="k-1")
        assert (again.id, again.event_id, again.duplicate) == (first.id, first.event_id, True)
        assert len(await bus.consume(tenant, "t", "g", "c", max_messages=10)) == 1

    async def test_fifty_concurrent_duplicates_make_one_message(
        self, bus: BusClient, tenant: str, raw_redis: Redis
    ) -> None:
        """50 concurrent publishes with one key: exactly one message, one id for all."""
        results = await asyncio.gather(
            *(bus.publish(tenant, "t", EVENT, idempotency_key="same") for _ in range(50))
        )
        assert len({r.id for r in results}) == 1
        assert sum(not r.duplicate for r in results) == 1
        assert await raw_redis.xlen(stream_key(tenant, "t")) == 1

    async def test_key_reused_for_other_payload_is_a_conflict(
        self, bus: BusClient, tenant: str
    ) -> None:
        """The same key with a different payload is refused (409), not silently deduplicated."""
        first = await bus.publish(tenant, "t", EVENT, idempotency_key="k")
        with pytest.raises(IdempotencyKeyReused) as caught:
            await bus.publish(
                tenant, "t", {**EVENT, "payload": {"agent": "a2"}}, idempotency_key="k"
            )
        assert caught.value.extra == {"id": first.id}

    async def test_keys_are_scoped_per_tenant_and_topic(self, bus: BusClient, tenant: str) -> None:
        """The same key on another topic or tenant is a separate message."""
        a = await bus.publish(tenant, "t1", EVENT, idempotency_key="k")
        b = await bus.publish(tenant, "t2", EVENT, idempotency_key="k")
        c = await bus.publish(tenant + "x", "t1", EVENT, idempotency_key="k")
        assert [a.duplicate, b.duplicate, c.duplicate] == [False, False, False]

    async def test_key_expires_after_ttl(self, bus_config: BusConfig, tenant: str) -> None:
        """After idempotency_ttl_s the key is forgotten and a publish makes a new message."""
        client = BusClient.connect(bus_config.replace(idempotency_ttl_s=1))
        try:
            first = await client.publish(tenant, "t", EVENT, idempotency_key="k")
            await asyncio.sleep(2.1)
            later = await client.publish(tenant, "t", EVENT, idempotency_key="k")
        finally:
            await client.aclose()
        assert later.id != first.id
        assert not later.duplicate


class TestTenantIsolation:
    async def test_tenants_never_see_each_others_messages(
        self, bus: BusClient, tenant: str
    ) -> None:
        """Same topic and group names under two tenants are two separate streams."""
        other = tenant + "b"
        mine = await bus.publish(tenant, "t", EVENT)
        assert await bus.consume(other, "t", "g", "c", max_messages=10) == []
        assert await bus.ack(other, "t", "g", [mine.id]) == 0
        [delivery] = await bus.consume(tenant, "t", "g", "c")
        assert delivery.id == mine.id
        assert (await bus.pending(other, "t", "g")).count == 0


class TestBackpressure:
    async def test_stream_is_trimmed_to_about_max_stream_len(
        self, bus: BusClient, tenant: str, raw_redis: Redis
    ) -> None:
        """MAXLEN ~ keeps the stream near max_stream_len, dropping the oldest."""
        for n in range(3000):
            await bus.publish(tenant, "t", _event(n))
        length = await raw_redis.xlen(stream_key(tenant, "t"))
        assert 1000 <= length < 1200

    async def test_too_many_waiting_polls_are_refused(
        self, bus_config: BusConfig, tenant: str
    ) -> None:
        """Past max_pollers, a long-poll is refused with 503 instead of queueing."""
        from bus.errors import Overloaded

        client = BusClient.connect(bus_config.replace(max_pollers=2))
        try:
            polls = [
                asyncio.create_task(client.consume(tenant, "t", "g", f"c{n}", wait_s=1.0))
                for n in range(2)
            ]
            await asyncio.sleep(0.2)
            with pytest.raises(Overloaded):
                await client.consume(tenant, "t", "g", "c3", wait_s=1.0)
            # A non-blocking poll still works.
            assert await client.consume(tenant, "t", "g", "c4") == []
            assert await asyncio.gather(*polls) == [[], []]
        finally:
            await client.aclose()


class TestRedisDown:
    async def test_unreachable_redis_is_503(
        self, bus_config: BusConfig, redis_server: RedisService, tenant: str
    ) -> None:
        """With Redis down, publish and consume fail with RedisUnavailable, then recover."""
        client = BusClient.connect(bus_config)
        try:
            redis_server.stop()
            with pytest.raises(RedisUnavailable) as caught:
                await client.publish(tenant, "t", EVENT)
            assert caught.value.reasons == ("redis_unreachable",)
            with pytest.raises(RedisUnavailable):
                await client.consume(tenant, "t", "g", "c")
            redis_server.start()
            await client.publish(tenant, "t", EVENT)
        finally:
            redis_server.start()
            await client.aclose()


def test_public_api_is_all() -> None:
    """bus.streams exports exactly what __all__ names."""
    for name in bus_streams.__all__:
        assert hasattr(bus_streams, name)
