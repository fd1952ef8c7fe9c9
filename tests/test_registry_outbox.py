"""Registry events: written with the change, drained to a real HTTP bus, never lost."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from registry.app import RELAY
from registry.outbox import HttpBusPublisher, LogPublisher, OutboxRelay, PublishError
from tests.busfixtures import BusFactory
from tests.conftest import PinnedClock, free_port
from tests.registrykit import (
    FakeBus,
    RegistryFactory,
    agent_body,
    eventually,
    start_registry,
    tenant,
)

ACME = tenant("acme")
GLOBEX = tenant("globex")


@pytest.fixture
async def bus() -> AsyncIterator[FakeBus]:
    """A real HTTP bus double on a fixed port; starts down."""
    fake = FakeBus(port=free_port())
    yield fake
    await fake.stop()


async def _outbox(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(
            "SELECT seq, event_id, tenant, topic, event::text AS event, attempts,"
            " next_attempt_at, last_error, failed_at FROM registry.outbox ORDER BY seq"
        )
    finally:
        await conn.close()


class _Recorder:
    """A publisher that records, and fails while ``failing`` is set."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, Mapping[str, Any]]] = []
        self.failing: PublishError | None = None
        self.delay = 0.0

    async def publish(self, tenant: str, topic: str, event: Mapping[str, Any]) -> None:
        await asyncio.sleep(self.delay)
        self.events.append((tenant, topic, event))
        if self.failing is not None:
            raise self.failing


class TestEventsWithChanges:
    async def test_each_change_writes_one_event_in_order(
        self, make_registry: RegistryFactory, registry_dsn: str
    ) -> None:
        """register, update, heartbeat and deregister each leave exactly one event."""
        registry = await make_registry()
        await registry.post("/agents", json=agent_body("a1"), headers=ACME)
        await registry.patch("/agents/a1", json={"weight": 3}, headers=ACME)
        await registry.post("/agents/a1/heartbeat", headers=ACME)
        await registry.delete("/agents/a1", headers=ACME)
        rows = await _outbox(registry_dsn)
        events = [orjson.loads(row["event"]) for row in rows]
        assert [e["type"] for e in events] == [
            "agent.registered",
            "agent.updated",
            "agent.heartbeat",
            "agent.deregistered",
        ]
        assert {row["topic"] for row in rows} == {"agents"}
        assert all(e["tenant"] == "acme" and e["subject"] == "a1" for e in events)
        assert events[1]["data"]["weight"] == 3
        assert [str(row["event_id"]) for row in rows] == [e["id"] for e in events]

    async def test_refused_changes_write_no_event(
        self, make_registry: RegistryFactory, registry_dsn: str
    ) -> None:
        """A change that does not happen (409, 404, 400) leaves no event behind."""
        registry = await make_registry()
        await registry.post("/agents", json=agent_body("a1"), headers=ACME)
        assert (await registry.post("/agents", json=agent_body("a1"), headers=ACME)).status == 409
        assert (await registry.post("/agents/zz/heartbeat", headers=ACME)).status == 404
        assert (await registry.delete("/agents/a1", headers=GLOBEX)).status == 404
        assert (await registry.patch("/agents/a1", json={"weight": -1}, headers=ACME)).status == 400
        assert len(await _outbox(registry_dsn)) == 1


class TestRelay:
    async def test_drains_in_order_to_the_bus(
        self, make_registry: RegistryFactory, registry_dsn: str, bus: FakeBus
    ) -> None:
        """Events reach the bus in order, with the tenant, and the event id as idempotency key."""
        await bus.start()
        registry = await make_registry(bus_url=bus.url)
        await registry.post("/agents", json=agent_body("a1"), headers=ACME)
        await registry.post("/agents", json=agent_body("g1"), headers=GLOBEX)
        await registry.post("/agents/a1/heartbeat", headers=ACME)
        assert await registry.app[RELAY].drain_once() == 3
        assert [(m["topic"], m["tenant"], m["event"]["type"]) for m in bus.received] == [
            ("agents", "acme", "agent.registered"),
            ("agents", "globex", "agent.registered"),
            ("agents", "acme", "agent.heartbeat"),
        ]
        assert all(m["idempotency_key"] == m["event"]["id"] for m in bus.received)
        assert await _outbox(registry_dsn) == []

    async def test_bus_down_keeps_events_and_drains_later(
        self, make_registry: RegistryFactory, registry_dsn: str, bus: FakeBus, clock: PinnedClock
    ) -> None:
        """While the bus is down nothing is lost or reordered; once it is back, all arrive once."""
        registry = await make_registry(
            bus_url=bus.url, outbox_backoff_base_s=1.0, outbox_backoff_max_s=8.0
        )
        relay = registry.app[RELAY]
        for i in range(3):
            await registry.post("/agents", json=agent_body(f"a{i}"), headers=ACME)

        assert await relay.drain_once() == 0  # bus down: connection refused
        rows = await _outbox(registry_dsn)
        assert len(rows) == 3
        assert rows[0]["attempts"] == 1
        assert "bus unreachable" in rows[0]["last_error"]
        assert [r["attempts"] for r in rows[1:]] == [0, 0]  # nothing overtook the head

        await bus.start()
        assert await relay.drain_once() == 0  # the head is still backing off
        assert bus.received == []
        clock.advance(1.0)
        assert await relay.drain_once() == 3
        assert [m["event"]["payload"]["subject"] for m in bus.received] == ["a0", "a1", "a2"]
        assert await _outbox(registry_dsn) == []

    async def test_backoff_grows_and_is_capped(self, make_registry: RegistryFactory) -> None:
        """Retry delays double from the base, are jittered in [d/2, d], and stop at the cap."""
        registry = await make_registry(outbox_backoff_base_s=0.5, outbox_backoff_max_s=4.0)
        relay = registry.app[RELAY]
        for attempts, ceiling in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)):
            delays = [relay.backoff(attempts) for _ in range(200)]
            assert all(ceiling / 2 <= d <= ceiling for d in delays)
            assert max(delays) - min(delays) > ceiling / 10  # jittered

    async def test_failed_publish_is_redelivered_with_the_same_key(
        self, registry_dsn: str, clock: PinnedClock, make_registry: RegistryFactory
    ) -> None:
        """A publish whose answer was lost is sent again with the same idempotency key."""
        recorder = _Recorder()
        registry = await make_registry(publisher=recorder)
        await registry.post("/agents", json=agent_body("a1"), headers=ACME)
        recorder.failing = PublishError("timed out after sending")
        assert await registry.app[RELAY].drain_once() == 0
        recorder.failing = None
        clock.advance(60)
        assert await registry.app[RELAY].drain_once() == 1
        first, second = (event["id"] for _, _, event in recorder.events)
        assert first == second

    async def test_refused_event_is_parked_not_blocking(
        self, make_registry: RegistryFactory, registry_dsn: str, bus: FakeBus
    ) -> None:
        """An event the bus refuses for good is kept as failed, and the rest still flow."""
        await bus.start()
        bus.status = 422
        registry = await make_registry(bus_url=bus.url)
        relay = registry.app[RELAY]
        await registry.post("/agents", json=agent_body("a1"), headers=ACME)
        assert await relay.drain_once() == 0
        bus.status = 201
        await registry.post("/agents", json=agent_body("a2"), headers=ACME)
        assert await relay.drain_once() == 1
        rows = await _outbox(registry_dsn)
        assert len(rows) == 1
        assert rows[0]["failed_at"] is not None
        assert rows[0]["last_error"] == "bus answered 422"
        assert await relay.pending() == 0

    async def test_conflict_counts_as_delivered(
        self, make_registry: RegistryFactory, registry_dsn: str, bus: FakeBus
    ) -> None:
        """A 409 (the idempotency key was seen) means the bus has the event already."""
        await bus.start()
        bus.status = 409
        registry = await make_registry(bus_url=bus.url)
        await registry.post("/agents", json=agent_body("a1"), headers=ACME)
        assert await registry.app[RELAY].drain_once() == 1
        assert await _outbox(registry_dsn) == []

    async def test_one_relay_at_a_time_across_replicas(
        self, registry_dsn: str, clock: PinnedClock
    ) -> None:
        """Two replicas draining at once deliver each event once."""
        slow = _Recorder()
        slow.delay = 0.05
        one = await start_registry(registry_dsn, clock, publisher=slow)
        two = await start_registry(registry_dsn, clock, publisher=slow)
        try:
            for i in range(4):
                await one.post("/agents", json=agent_body(f"a{i}"), headers=ACME)
            counts = await asyncio.gather(one.app[RELAY].drain_once(), two.app[RELAY].drain_once())
            assert sorted(counts) == [0, 4]
            assert len(slow.events) == 4
        finally:
            await one.close()
            await two.close()

    async def test_background_relay_delivers_after_outage(
        self, registry_dsn: str, bus: FakeBus
    ) -> None:
        """With the background relay, events written while the bus is down arrive once it is up."""
        registry = await start_registry(
            registry_dsn,
            time.time,
            background=True,
            bus_url=bus.url,
            outbox_backoff_base_s=0.05,
            outbox_backoff_max_s=0.2,
        )
        try:
            for i in range(5):
                await registry.post("/agents", json=agent_body(f"a{i}"), headers=ACME)
            await asyncio.sleep(0.3)
            ready = await (await registry.get("/_readyz")).json()
            assert ready["outbox_pending"] == 5
            await bus.start()
            await eventually(lambda: len(bus.received) >= 5)
            assert [m["event"]["payload"]["subject"] for m in bus.received] == [
                f"a{i}" for i in range(5)
            ]

            async def drained() -> bool:
                ready = await (await registry.get("/_readyz")).json()
                return bool(ready["outbox_pending"] == 0)

            await eventually(drained)
            assert len(bus.received) == 5  # each once
        finally:
            await registry.close()


class TestPublishers:
    async def test_log_publisher_logs_type_and_ids(self, caplog: pytest.LogCaptureFixture) -> None:
        """Without a bus, each event is one log line with its type, id, tenant and agent."""
        caplog.set_level(logging.INFO, logger="registry.outbox")
        event = {"id": "e1", "type": "agent.registered", "subject": "a1", "data": {}}
        await LogPublisher().publish("acme", "agents", event)
        record = caplog.records[-1]
        assert (record.event_type, record.event_id, record.tenant, record.agent) == (  # type: ignore[attr-defined]
            "agent.registered",
            "e1",
            "acme",
            "a1",
        )

    @pytest.mark.parametrize(
        ("status", "permanent"),
        [
            pytest.param(500, False, id="500-transient"),
            pytest.param(503, False, id="503-transient"),
            pytest.param(429, False, id="429-transient"),
            pytest.param(401, False, id="401-transient"),
            pytest.param(400, True, id="400-permanent"),
            pytest.param(413, True, id="413-permanent"),
            pytest.param(422, True, id="422-permanent"),
        ],
    )
    async def test_http_publisher_classifies_answers(
        self, bus: FakeBus, status: int, permanent: bool
    ) -> None:
        """Bus answers that a retry may fix are transient; a refused event is permanent."""
        await bus.start()
        bus.status = status
        async with aiohttp.ClientSession() as session:
            publisher = HttpBusPublisher(session, bus.url)
            with pytest.raises(PublishError) as caught:
                await publisher.publish("acme", "agents", {"id": "e1", "type": "agent.heartbeat"})
        assert caught.value.permanent is permanent

    def test_relay_jitter_uses_the_given_rng(self) -> None:
        """The jitter source is injectable (tests pin it)."""
        relay = OutboxRelay(None, LogPublisher(), rng=random.Random(7))  # type: ignore[arg-type]  # noqa: S311
        again = OutboxRelay(None, LogPublisher(), rng=random.Random(7))  # type: ignore[arg-type]  # noqa: S311
        assert [relay.backoff(3) for _ in range(3)] == [again.backoff(3) for _ in range(3)]


class TestThroughTheRealBus:
    async def test_registry_events_arrive_as_bus_envelopes(
        self, make_registry: RegistryFactory, make_bus: BusFactory
    ) -> None:
        """The relay publishes valid v1 envelopes: a bus consumer gets agent.registered for a1."""
        bus_service = await make_bus()
        registry = await make_registry(bus_url=str(bus_service.make_url("")).rstrip("/"))
        await registry.post("/agents", json=agent_body("a1"), headers=ACME)
        await registry.post("/agents/a1/heartbeat", headers=ACME)
        assert await registry.app[RELAY].drain_once() == 2
        response = await bus_service.get(
            "/topics/agents/subscriptions/watchers/messages?consumer=c1&max=10",
            headers={"X-Nops-Tenant": "acme"},
        )
        assert response.status == 200
        envelopes = [m["envelope"] for m in (await response.json())["messages"]]
        assert [e["type"] for e in envelopes] == ["agent.registered", "agent.heartbeat"]
        assert {e["tenant"] for e in envelopes} == {"acme"}
        assert envelopes[0]["payload"]["subject"] == "a1"
        assert envelopes[0]["payload"]["data"]["id"] == "a1"
        assert envelopes[0]["idempotency_key"] == envelopes[0]["id"]
