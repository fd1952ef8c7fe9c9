"""Agent status from heartbeat TTLs, and the sweeper that stores it, on a pinned clock."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from registry.app import SWEEPER
from registry.status import StatusPolicy, Sweeper
from tests.conftest import PinnedClock
from tests.registrykit import Client, RegistryFactory, agent_body, tenant

ACME = tenant("acme")
POLICY = StatusPolicy(stale_after_s=15, zombie_after_s=60)


async def _stored(dsn: str) -> dict[str, str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT id, status FROM registry.agents ORDER BY id")
    finally:
        await conn.close()
    return {row["id"]: row["status"] for row in rows}


class TestStatusPolicy:
    @pytest.mark.parametrize(
        ("age", "status"),
        [
            pytest.param(0, "healthy", id="fresh"),
            pytest.param(14.999, "healthy", id="just-under-stale"),
            pytest.param(15, "stale", id="at-stale"),
            pytest.param(59.999, "stale", id="just-under-zombie"),
            pytest.param(60, "zombie", id="at-zombie"),
            pytest.param(86_400, "zombie", id="a-day"),
        ],
    )
    def test_status_by_heartbeat_age(self, age: float, status: str) -> None:
        """healthy below stale_after_s, stale below zombie_after_s, zombie after."""
        assert POLICY.status_at(1000.0, 1000.0 + age) == status

    @pytest.mark.parametrize(
        ("stale", "zombie"),
        [
            pytest.param(0, 10, id="zero"),
            pytest.param(10, 10, id="equal"),
            pytest.param(20, 10, id="reversed"),
        ],
    )
    def test_bad_ttls_are_refused(self, stale: float, zombie: float) -> None:
        """The TTLs must satisfy 0 < stale < zombie."""
        with pytest.raises(ValueError, match="stale_after_s"):
            StatusPolicy(stale_after_s=stale, zombie_after_s=zombie)


class TestTransitions:
    @pytest.fixture
    async def registry(self, make_registry: RegistryFactory) -> Client:
        registry = await make_registry(status=POLICY)
        response = await registry.post("/agents", json=agent_body("a1"), headers=ACME)
        assert response.status == 201
        return registry

    async def _status(self, registry: Client) -> str:
        agent = await (await registry.get("/agents/a1", headers=ACME)).json()
        status: str = agent["status"]
        return status

    async def test_healthy_stale_zombie_and_back(
        self, registry: Client, clock: PinnedClock
    ) -> None:
        """Reads show the status as of the read; a heartbeat makes a zombie healthy again."""
        observed = []
        for step in (14.9, 0.1, 44.9, 0.1, 1000):
            clock.advance(step)
            observed.append(await self._status(registry))
        assert observed == ["healthy", "stale", "stale", "zombie", "zombie"]
        beat = await registry.post("/agents/a1/heartbeat", headers=ACME)
        assert (await beat.json())["status"] == "healthy"
        assert await self._status(registry) == "healthy"

    async def test_healthy_filter_excludes_stale_and_zombie(
        self, registry: Client, clock: PinnedClock
    ) -> None:
        """status=healthy (what the gateway routes on) leaves stale and zombie agents out."""
        for agent_id in ("a2", "a3"):
            await registry.post("/agents", json=agent_body(agent_id), headers=ACME)
        clock.advance(61)  # everyone is a zombie
        await registry.post("/agents/a2/heartbeat", headers=ACME)
        clock.advance(15)  # a2 stale, a1/a3 zombies
        await registry.post("/agents/a3/heartbeat", headers=ACME)

        async def ids(status: str) -> list[str]:
            page = await (
                await registry.get("/agents", params={"status": status}, headers=ACME)
            ).json()
            return [a["id"] for a in page["agents"]]

        assert await ids("healthy") == ["a3"]
        assert await ids("stale") == ["a2"]
        assert await ids("zombie") == ["a1"]


class TestSweeper:
    async def test_sweep_stores_statuses_in_batches(
        self, make_registry: RegistryFactory, registry_dsn: str, clock: PinnedClock
    ) -> None:
        """The sweeper moves stored statuses along, many batches if needed, and only forward."""
        registry = await make_registry(status=POLICY, sweep_batch=2)
        for i in range(5):
            await registry.post("/agents", json=agent_body(f"a{i}"), headers=ACME)
        sweeper = registry.app[SWEEPER]
        assert await sweeper.sweep_once() == {}

        clock.advance(20)
        await registry.post("/agents/a0/heartbeat", headers=ACME)
        assert await sweeper.sweep_once() == {"stale": 4}
        assert await _stored(registry_dsn) == {
            "a0": "healthy",
            "a1": "stale",
            "a2": "stale",
            "a3": "stale",
            "a4": "stale",
        }
        assert await sweeper.sweep_once() == {}  # nothing more to do

        clock.advance(45)  # a1-a4 are 65 s old, a0 45 s
        assert await sweeper.sweep_once() == {"zombie": 4, "stale": 1}
        assert set((await _stored(registry_dsn)).values()) == {"zombie", "stale"}

        await registry.post("/agents/a3/heartbeat", headers=ACME)
        assert (await _stored(registry_dsn))["a3"] == "healthy"

    async def test_sweep_does_not_wait_for_a_busy_row(
        self, make_registry: RegistryFactory, registry_dsn: str, clock: PinnedClock
    ) -> None:
        """A row locked by a request is skipped, not waited for; requests are never blocked."""
        registry = await make_registry(status=POLICY)
        for agent_id in ("busy", "idle"):
            await registry.post("/agents", json=agent_body(agent_id), headers=ACME)
        clock.advance(20)
        holder = await asyncpg.connect(registry_dsn)
        try:
            transaction = holder.transaction()
            await transaction.start()
            await holder.execute("SELECT 1 FROM registry.agents WHERE id = 'busy' FOR UPDATE")
            moved = await asyncio.wait_for(registry.app[SWEEPER].sweep_once(), timeout=2)
            assert moved == {"stale": 1}
            # Meanwhile requests on other agents proceed.
            beat = await asyncio.wait_for(
                registry.post("/agents/idle/heartbeat", headers=ACME), timeout=2
            )
            assert beat.status == 200
            await transaction.rollback()
        finally:
            await holder.close()
        assert await _stored(registry_dsn) == {"busy": "healthy", "idle": "healthy"}
        assert await registry.app[SWEEPER].sweep_once() == {"stale": 1}

    async def test_background_sweeper_runs_on_its_own(
        self, make_registry: RegistryFactory, registry_dsn: str, clock: PinnedClock
    ) -> None:
        """With background tasks on, stored statuses follow the clock without being asked."""
        registry = await make_registry(status=POLICY, background=True)
        await registry.post("/agents", json=agent_body("a1"), headers=ACME)
        clock.advance(61)
        for _ in range(100):
            if (await _stored(registry_dsn))["a1"] == "zombie":
                break
            await asyncio.sleep(0.02)
        assert (await _stored(registry_dsn))["a1"] == "zombie"

    async def test_sweeper_survives_a_database_outage(
        self, registry_dsn: str, clock: PinnedClock, postgres_server: object
    ) -> None:
        """A failed sweep is logged and retried; the task keeps running."""
        from registry.db import create_pool

        pool = await create_pool(registry_dsn)
        try:
            sweeper = Sweeper(pool, POLICY, clock=clock, interval_s=0.01)
            await pool.close()  # every sweep now fails
            sweeper.start()
            await asyncio.sleep(0.05)
            assert sweeper.running
            await sweeper.close()
        finally:
            await pool.close()
