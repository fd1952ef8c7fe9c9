"""The bus HTTP service against a real Redis: API, problems, tenancy, long-polls."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from bus.streams import stream_key
from tests.busfixtures import BusFactory, as_tenant, assert_bus_problem
from tests.services import RedisService

Client = TestClient[Any, Any]
EVENT = {"type": "agent.registered", "payload": {"agent": "a1"}}
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def _publish(client: Client, tenant: str, body: Any = EVENT, **headers: str) -> Any:
    response = await client.post(
        "/topics/t/messages", json=body, headers=as_tenant(tenant, **headers)
    )
    assert response.status in (200, 201), await response.text()
    return await response.json()


async def _consume(client: Client, tenant: str, query: str = "consumer=c&max=10") -> Any:
    response = await client.get(
        f"/topics/t/subscriptions/g/messages?{query}", headers=as_tenant(tenant)
    )
    assert response.status == 200, await response.text()
    return (await response.json())["messages"]


#: A stream id whose milliseconds part is 2**64: well formed, but more than Redis can hold.
_TOO_BIG = f"{2**64}-0"


class TestPublishConsumeAck:
    async def test_round_trip(self, bus_http: Client, tenant: str) -> None:
        """201 on publish, the full envelope on consume, acked once, nothing pending."""
        response = await bus_http.post(
            "/topics/t/messages",
            json=EVENT,
            headers=as_tenant(tenant, traceparent=TRACEPARENT, tracestate="v=1"),
        )
        assert response.status == 201
        published = await response.json()
        assert published["duplicate"] is False
        [message] = await _consume(bus_http, tenant)
        assert message["id"] == published["id"]
        assert message["deliveries"] == 1
        envelope = message["envelope"]
        assert envelope["id"] == published["event_id"]
        assert envelope["tenant"] == tenant
        assert envelope["traceparent"] == TRACEPARENT
        assert envelope["tracestate"] == "v=1"
        assert envelope["payload"] == EVENT["payload"]
        ack = await bus_http.post(
            "/topics/t/subscriptions/g/ack",
            json={"ids": [message["id"]]},
            headers=as_tenant(tenant),
        )
        assert await ack.json() == {"acked": 1}
        again = await bus_http.post(
            "/topics/t/subscriptions/g/ack",
            json={"ids": [message["id"]]},
            headers=as_tenant(tenant),
        )
        assert await again.json() == {"acked": 0}
        pending = await bus_http.get("/topics/t/subscriptions/g/pending", headers=as_tenant(tenant))
        assert await pending.json() == {"count": 0, "consumers": {}, "messages": []}

    async def test_malformed_trace_header_is_ignored(self, bus_http: Client, tenant: str) -> None:
        """A broken traceparent header is dropped (W3C), not a reason to refuse the message."""
        await _publish(bus_http, tenant, traceparent="garbage")
        [message] = await _consume(bus_http, tenant)
        assert "traceparent" not in message["envelope"]

    async def test_gateway_request_id_is_kept(self, bus_http: Client, tenant: str) -> None:
        """The X-Request-Id the gateway sent is the bus's request id too."""
        response = await bus_http.get("/health", headers={"X-Request-Id": "gw-req-1"})
        assert response.headers["X-Request-Id"] == "gw-req-1"

    async def test_health_and_readiness(self, bus_http: Client) -> None:
        """/health needs no tenant; /_readyz pings Redis."""
        assert (await bus_http.get("/health")).status == 200
        ready = await bus_http.get("/_readyz")
        assert await ready.json() == {"status": "ready", "redis": "ok"}


class TestLongPoll:
    async def test_times_out_empty_after_wait(self, bus_http: Client, tenant: str) -> None:
        """An empty long-poll answers 200 with no messages after about ``wait`` seconds."""
        started = time.monotonic()
        assert await _consume(bus_http, tenant, "consumer=c&wait=0.5") == []
        assert 0.45 <= time.monotonic() - started < 2.0

    async def test_returns_as_soon_as_a_message_arrives(
        self, bus_http: Client, tenant: str
    ) -> None:
        """A publish during the wait ends the poll at once."""
        poll = asyncio.create_task(_consume(bus_http, tenant, "consumer=c&wait=4"))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        published = await _publish(bus_http, tenant)
        [message] = await poll
        assert message["id"] == published["id"]
        assert time.monotonic() - started < 1.0

    async def test_too_many_waiting_polls_get_503(self, make_bus: BusFactory, tenant: str) -> None:
        """Past max_pollers, another long-poll is refused with Retry-After."""
        client = await make_bus(max_pollers=1)
        first = asyncio.create_task(_consume(client, tenant, "consumer=a&wait=1"))
        await asyncio.sleep(0.2)
        response = await client.get(
            "/topics/t/subscriptions/g/messages?consumer=b&wait=1", headers=as_tenant(tenant)
        )
        await assert_bus_problem(response, 503, "overloaded")
        assert response.headers["Retry-After"] == "1"
        assert await first == []


class TestPendingAndDeadLetters:
    async def test_pending_redelivery_dlq_and_redrive(self, bus_http: Client, tenant: str) -> None:
        """The whole life of a poisoned message over HTTP, ending back on the topic."""
        published = await _publish(bus_http, tenant)
        for attempt in range(1, 4):
            [message] = await _consume(bus_http, tenant, f"consumer=c{attempt}")
            assert message["deliveries"] == attempt
            pending = await bus_http.get(
                "/topics/t/subscriptions/g/pending?consumer=c" + str(attempt),
                headers=as_tenant(tenant),
            )
            [entry] = (await pending.json())["messages"]
            assert (entry["consumer"], entry["deliveries"]) == (f"c{attempt}", attempt)
            await asyncio.sleep(1.05)
        assert await _consume(bus_http, tenant, "consumer=c4") == []
        listing = await bus_http.get("/topics/t/dlq", headers=as_tenant(tenant))
        body = await listing.json()
        [letter] = body["dead_letters"]
        assert body["next"] == letter["id"]
        assert letter["source_id"] == published["id"]
        assert (letter["group"], letter["deliveries"], letter["last_consumer"]) == ("g", 3, "c3")
        assert letter["reason"] == "max_deliveries"
        assert letter["envelope"]["id"] == published["event_id"]
        redrive = await bus_http.post(
            "/topics/t/dlq/redrive", json={"ids": [letter["id"], "1-0"]}, headers=as_tenant(tenant)
        )
        moved = await redrive.json()
        assert moved["missing"] == ["1-0"]
        [back] = moved["redriven"]
        [message] = await _consume(bus_http, tenant, "consumer=c5")
        assert (message["id"], message["deliveries"]) == (back["id"], 1)
        assert message["envelope"]["id"] == published["event_id"]

    async def test_redrive_without_ids_takes_the_oldest(
        self, bus_http: Client, tenant: str
    ) -> None:
        """An empty redrive body moves the oldest dead letters (none here: empty answer)."""
        response = await bus_http.post("/topics/t/dlq/redrive", headers=as_tenant(tenant))
        assert await response.json() == {"redriven": [], "missing": []}

    async def test_pending_for_unknown_group_is_404(self, bus_http: Client, tenant: str) -> None:
        """No subscription by that name: a problem, not an empty list."""
        response = await bus_http.get(
            "/topics/t/subscriptions/nope/pending", headers=as_tenant(tenant)
        )
        await assert_bus_problem(response, 404, "no-subscription")


class TestIdempotency:
    async def test_retry_replays_the_original(self, bus_http: Client, tenant: str) -> None:
        """The second publish with a key answers 200, the same id, Idempotent-Replayed."""
        first = await _publish(bus_http, tenant, **{"Idempotency-Key": "order-42"})
        response = await bus_http.post(
            "/topics/t/messages",
            json=EVENT,
            headers=as_tenant(tenant, **{"Idempotency-Key": "order-42"}),
        )
        assert response.status == 200
        assert response.headers["Idempotent-Replayed"] == "true"
        assert await response.json() == {**first, "duplicate": True}

    async def test_fifty_concurrent_duplicates_over_http(
        self, bus_http: Client, tenant: str, raw_redis: Redis
    ) -> None:
        """50 concurrent HTTP publishes with one key: one 201, 49 replays, one message."""
        headers = as_tenant(tenant, **{"Idempotency-Key": "dup"})
        responses = await asyncio.gather(
            *(bus_http.post("/topics/t/messages", json=EVENT, headers=headers) for _ in range(50))
        )
        statuses = sorted(r.status for r in responses)
        assert statuses == [200] * 49 + [201]
        ids = {(await r.json())["id"] for r in responses}
        assert len(ids) == 1
        assert await raw_redis.xlen(stream_key(tenant, "t")) == 1

    async def test_key_reuse_with_other_payload_is_409(self, bus_http: Client, tenant: str) -> None:
        """A key first used for another message is a conflict naming the original id."""
        first = await _publish(bus_http, tenant, **{"Idempotency-Key": "k"})
        response = await bus_http.post(
            "/topics/t/messages",
            json={**EVENT, "payload": {}},
            headers=as_tenant(tenant, **{"Idempotency-Key": "k"}),
        )
        body = await assert_bus_problem(response, 409, "idempotency-key-reused")
        assert body["id"] == first["id"]


class TestTenancy:
    @pytest.mark.parametrize(
        ("headers", "reason"),
        [
            pytest.param({}, "no_tenant", id="absent"),
            pytest.param({"X-Nops-Tenant": ""}, "invalid_tenant", id="empty"),
            pytest.param({"X-Nops-Tenant": "a:b"}, "invalid_tenant", id="colon"),
            pytest.param({"X-Nops-Tenant": "a}b"}, "invalid_tenant", id="brace"),
            pytest.param({"X-Nops-Tenant": "x" * 65}, "invalid_tenant", id="too-long"),
        ],
    )
    @pytest.mark.parametrize(
        ("method", "path"),
        [
            pytest.param("POST", "/topics/t/messages", id="publish"),
            pytest.param("GET", "/topics/t/subscriptions/g/messages?consumer=c", id="consume"),
            pytest.param("POST", "/topics/t/subscriptions/g/ack", id="ack"),
            pytest.param("GET", "/topics/t/subscriptions/g/pending", id="pending"),
            pytest.param("GET", "/topics/t/dlq", id="dlq"),
            pytest.param("POST", "/topics/t/dlq/redrive", id="redrive"),
        ],
    )
    async def test_every_topic_request_needs_a_tenant(
        self, bus_http: Client, method: str, path: str, headers: dict[str, str], reason: str
    ) -> None:
        """Without a valid X-Nops-Tenant the bus answers 401 before touching Redis."""
        response = await bus_http.request(method, path, headers=headers, json=EVENT)
        await assert_bus_problem(response, 401, "missing-tenant", [reason])

    async def test_two_tenant_headers_are_refused(self, bus_http: Client) -> None:
        """An ambiguous tenant (two headers) is never resolved by picking one."""
        response = await bus_http.post(
            "/topics/t/messages",
            json=EVENT,
            headers=[("X-Nops-Tenant", "a"), ("X-Nops-Tenant", "b")],
        )
        await assert_bus_problem(response, 401, "missing-tenant", ["invalid_tenant"])

    async def test_tenants_are_isolated_end_to_end(self, bus_http: Client, tenant: str) -> None:
        """Tenant B sees none of A's messages, pending entries or dead letters, nor acks them."""
        other = tenant + "b"
        published = await _publish(bus_http, tenant)
        assert await _consume(bus_http, other) == []
        ack = await bus_http.post(
            "/topics/t/subscriptions/g/ack",
            json={"ids": [published["id"]]},
            headers=as_tenant(other),
        )
        assert await ack.json() == {"acked": 0}
        [message] = await _consume(bus_http, tenant)
        assert message["id"] == published["id"]
        pending = await bus_http.get("/topics/t/subscriptions/g/pending", headers=as_tenant(other))
        assert (await pending.json())["count"] == 0
        dlq = await bus_http.get("/topics/t/dlq", headers=as_tenant(other))
        assert (await dlq.json())["dead_letters"] == []

    async def test_envelope_cannot_claim_another_tenant(
        self, bus_http: Client, tenant: str
    ) -> None:
        """A body naming another tenant is 403, whatever the header says."""
        response = await bus_http.post(
            "/topics/t/messages", json={**EVENT, "tenant": "victim"}, headers=as_tenant(tenant)
        )
        await assert_bus_problem(response, 403, "tenant-mismatch")


class TestProblems:
    @pytest.mark.parametrize(
        ("body", "headers", "status", "code", "reasons"),
        [
            pytest.param(b"{not json", {}, 400, "malformed-request", ["invalid_json"], id="json"),
            pytest.param(b"[]", {}, 400, "malformed-request", ["not_an_object"], id="array"),
            pytest.param(b'{"payload": 1}', {}, 422, "invalid-envelope", None, id="missing-type"),
            pytest.param(
                b'{"type": "x", "payload": 1, "id": "a b"}',
                {},
                422,
                "invalid-envelope",
                None,
                id="bad-id",
            ),
            pytest.param(
                b'{"type": "x", "payload": 1, "bus_owned": 1}',
                {},
                422,
                "invalid-envelope",
                None,
                id="unknown-field",
            ),
            pytest.param(
                b'{"type": "x", "payload": "' + b"a" * 5000 + b'"}',
                {},
                413,
                "payload-too-large",
                ["body_too_large"],
                id="oversized-body",
            ),
            pytest.param(
                b'{"type": "x", "payload": 1}',
                {"Idempotency-Key": "has space"},
                400,
                "malformed-request",
                ["invalid_idempotency_key"],
                id="bad-idempotency-key",
            ),
        ],
    )
    async def test_bad_publishes(
        self,
        bus_http: Client,
        tenant: str,
        body: bytes,
        headers: dict[str, str],
        status: int,
        code: str,
        reasons: list[str] | None,
    ) -> None:
        """Malformed, invalid and oversized messages get a clear 4xx problem and are not stored."""
        response = await bus_http.post(
            "/topics/t/messages",
            data=body,
            headers=as_tenant(tenant, **{"Content-Type": "application/json", **headers}),
        )
        await assert_bus_problem(response, status, code, reasons)
        assert await _consume(bus_http, tenant) == []

    async def test_invalid_envelope_lists_errors_by_pointer(
        self, bus_http: Client, tenant: str
    ) -> None:
        """A 422 says which field broke which rule."""
        response = await bus_http.post(
            "/topics/t/messages", json={"type": "Bad Type", "payload": 1}, headers=as_tenant(tenant)
        )
        body = await assert_bus_problem(response, 422, "invalid-envelope")
        assert [e["pointer"] for e in body["errors"]] == ["/type"]

    async def test_oversized_streamed_body_is_413(self, bus_http: Client, tenant: str) -> None:
        """A chunked body (no Content-Length) over the limit is cut off with 413."""

        async def chunks() -> Any:
            for _ in range(10):
                yield b"a" * 1000

        response = await bus_http.post(
            "/topics/t/messages", data=chunks(), headers=as_tenant(tenant)
        )
        await assert_bus_problem(response, 413, "payload-too-large")

    @pytest.mark.parametrize(
        ("path", "reason"),
        [
            pytest.param("/topics/t/subscriptions/g/messages", "no_consumer", id="no-consumer"),
            pytest.param(
                "/topics/t/subscriptions/g/messages?consumer=a:b", "invalid_consumer", id="consumer"
            ),
            pytest.param(
                "/topics/t/subscriptions/g/messages?consumer=c&max=x", "invalid_max", id="max-nan"
            ),
            pytest.param(
                "/topics/t/subscriptions/g/messages?consumer=c&max=51", "invalid_max", id="max-big"
            ),
            pytest.param(
                "/topics/t/subscriptions/g/messages?consumer=c&wait=nan", "invalid_wait", id="nan"
            ),
            pytest.param(
                "/topics/t/subscriptions/g/messages?consumer=c&wait=60", "invalid_wait", id="long"
            ),
            pytest.param("/topics/a:b/dlq", "invalid_topic", id="topic"),
            pytest.param("/topics/t/dlq?after=x", "invalid_after", id="after"),
            pytest.param("/topics/t/subscriptions/g:x/pending", "invalid_group", id="group"),
        ],
    )
    async def test_bad_queries(self, bus_http: Client, tenant: str, path: str, reason: str) -> None:
        """Bad names and parameters are a 400 naming the parameter."""
        response = await bus_http.get(path, headers=as_tenant(tenant))
        await assert_bus_problem(response, 400, "malformed-request", [reason])

    @pytest.mark.parametrize(
        "body",
        [
            pytest.param({}, id="no-ids"),
            pytest.param({"ids": []}, id="empty"),
            pytest.param({"ids": "1-0"}, id="not-a-list"),
            pytest.param({"ids": [1]}, id="not-strings"),
            pytest.param({"ids": ["1-0"] * 1001}, id="too-many"),
        ],
    )
    async def test_bad_ack_bodies(self, bus_http: Client, tenant: str, body: Any) -> None:
        """Ack needs 1..1000 message ids."""
        response = await bus_http.post(
            "/topics/t/subscriptions/g/ack", json=body, headers=as_tenant(tenant)
        )
        await assert_bus_problem(response, 400, "malformed-request", ["invalid_ids"])

    async def test_bad_message_id_in_ack(self, bus_http: Client, tenant: str) -> None:
        """An id that is not <ms>-<seq> is refused before Redis sees it."""
        response = await bus_http.post(
            "/topics/t/subscriptions/g/ack", json={"ids": ["nope"]}, headers=as_tenant(tenant)
        )
        await assert_bus_problem(response, 400, "malformed-request", ["invalid_id"])

    @pytest.mark.parametrize(
        ("method", "path", "body", "reason"),
        [
            pytest.param(
                "POST", "/topics/t/subscriptions/g/ack", {"ids": [_TOO_BIG]}, "invalid_id", id="ack"
            ),
            pytest.param(
                "POST", "/topics/t/dlq/redrive", {"ids": [_TOO_BIG]}, "invalid_id", id="redrive"
            ),
            pytest.param("GET", f"/topics/t/dlq?after={_TOO_BIG}", None, "invalid_after", id="dlq"),
        ],
    )
    async def test_message_id_past_64_bits(
        self, bus_http: Client, tenant: str, method: str, path: str, body: Any, reason: str
    ) -> None:
        """An id whose parts do not fit 64 bits is a 400, not a Redis error and a 500 (contract)."""
        response = await bus_http.request(method, path, json=body, headers=as_tenant(tenant))
        await assert_bus_problem(response, 400, "malformed-request", [reason])

    @pytest.mark.parametrize(
        ("max_value", "status"),
        [
            pytest.param(True, 400, id="true-is-not-a-number"),
            pytest.param(0, 400, id="zero"),
            pytest.param(1001, 400, id="too-many"),
            pytest.param(2.5, 400, id="fraction"),
            pytest.param(2.0, 200, id="whole-float-is-an-integer"),
        ],
    )
    async def test_redrive_max(
        self, bus_http: Client, tenant: str, max_value: Any, status: int
    ) -> None:
        """Redrive's max is an integer from 1 to 1000 as JSON Schema reads one (contract)."""
        response = await bus_http.post(
            "/topics/t/dlq/redrive", json={"max": max_value}, headers=as_tenant(tenant)
        )
        if status == 400:
            await assert_bus_problem(response, 400, "malformed-request", ["invalid_max"])
        else:
            assert response.status == 200
            assert await response.json() == {"redriven": [], "missing": []}

    async def test_redrive_ids_null_is_not_absent(self, bus_http: Client, tenant: str) -> None:
        """ "ids": null is a bad list of ids, not "the oldest ones" (contract)."""
        response = await bus_http.post(
            "/topics/t/dlq/redrive", json={"ids": None}, headers=as_tenant(tenant)
        )
        await assert_bus_problem(response, 400, "malformed-request", ["invalid_ids"])

    async def test_nothing_after_the_largest_id(self, bus_http: Client, tenant: str) -> None:
        """Dead letters after the largest possible id: none (Redis refuses that interval)."""
        largest = f"{2**64 - 1}-{2**64 - 1}"
        response = await bus_http.get(f"/topics/t/dlq?after={largest}", headers=as_tenant(tenant))
        assert response.status == 200
        assert await response.json() == {"dead_letters": [], "next": None}

    async def test_unknown_path_and_method(self, bus_http: Client, tenant: str) -> None:
        """404 and 405 are problems too, 405 with Allow."""
        await assert_bus_problem(await bus_http.get("/nope"), 404, "not-found")
        response = await bus_http.delete("/topics/t/dlq", headers=as_tenant(tenant))
        await assert_bus_problem(response, 405, "method-not-allowed")
        assert "GET" in response.headers["Allow"]


class TestRedisTrouble:
    async def test_redis_down_is_503_then_recovers(
        self, bus_http: Client, redis_server: RedisService, tenant: str
    ) -> None:
        """Redis unreachable: 503 redis-unavailable with Retry-After; back when it is."""
        redis_server.stop()
        try:
            response = await bus_http.post(
                "/topics/t/messages", json=EVENT, headers=as_tenant(tenant)
            )
            await assert_bus_problem(response, 503, "redis-unavailable", ["redis_unreachable"])
            assert response.headers["Retry-After"] == "1"
            await assert_bus_problem(await bus_http.get("/_readyz"), 503, "redis-unavailable")
        finally:
            redis_server.start()
        await _publish(bus_http, tenant)

    async def test_redis_out_of_memory_is_503(
        self, make_bus: BusFactory, tmp_path: Path, tenant: str
    ) -> None:
        """A full Redis (maxmemory, noeviction) refuses writes: 503 redis_out_of_memory."""
        full = RedisService(tmp_path)
        full.start()
        admin = Redis.from_url(full.url)
        try:
            client = await make_bus(redis_url=full.url)
            await admin.config_set("maxmemory", "1")
            for headers in ({}, {"Idempotency-Key": "k"}):  # plain XADD and the Lua script
                response = await client.post(
                    "/topics/t/messages", json=EVENT, headers=as_tenant(tenant, **headers)
                )
                await assert_bus_problem(
                    response, 503, "redis-unavailable", ["redis_out_of_memory"]
                )
        finally:
            await admin.aclose()
            full.close()
