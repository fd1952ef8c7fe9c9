"""Degraded modes under faults, while traffic flows (docs/operations.md, "Degraded modes").

Each case builds the whole stack: a real OPA (external, or supervised by the
gateway), Redis (replay cache, rate limits), PostgreSQL (the audit store and
the registry's database), the registry service, an agent process, the echo
upstream, RFC 9421 signatures and RS256 JWTs. A steady stream of three kinds
of request flows through the gateway while the test kills one dependency,
checks what the traffic and ``/_readyz`` get while it is down, restores it,
waits for recovery, and finally checks that every answered request has its
record in the audit chain (matched by request id and decision id) and that
the chain verifies.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from audit import ANONYMOUS_CODES
from audit.verify import verify_postgres
from gateway.app import AUDIT, LOCAL_OPA
from gateway.problem import PROBLEM_CONTENT_TYPE, problem_type
from tests.agentkit import AgentProcess
from tests.audit_support import trusted_keys
from tests.conftest import (
    OPA_BINARY,
    POLICY_DIR,
    GatewayFactory,
    OpaProcess,
    Signer,
    free_port,
)
from tests.jwtissuer import AUDIENCE, FakeIssuer
from tests.promscrape import METRICS_ON, scrape, value
from tests.registrykit import Client, RegistryFactory, tenant
from tests.services import PostgresService, RedisService

#: What each kind of request is (all GET):
#: signed     /locked/x: RFC 9421 signature and a bearer JWT, to an upstream process;
#: agent      /agents/a1/x: signature and JWT, to agent a1 found in the registry;
#: anonymous  /echo/x: unsigned, rate limited per address, no replay check.
PATHS: Final = {"signed": "/locked/x", "agent": "/agents/a1/x", "anonymous": "/echo/x"}
KINDS: Final = tuple(PATHS)

#: (status, problem code): the code is None for an answer that is not a problem.
Outcome = tuple[int, str | None]
OK: Final[Outcome] = (200, None)
POLICY_UNAVAILABLE: Final[Outcome] = (503, "policy-unavailable")
REPLAY_UNAVAILABLE: Final[Outcome] = (503, "dependency-unavailable")
UPSTREAM_UNAVAILABLE: Final[Outcome] = (502, "upstream-unavailable")
AGENT_CIRCUIT_OPEN: Final[Outcome] = (503, "agent-unavailable")
ROUTE_CIRCUIT_OPEN: Final[Outcome] = (503, "circuit-open")

_WAIT_S: Final = 20.0


@dataclass(frozen=True, slots=True)
class Sent:
    """One request of the traffic and what it got."""

    kind: str
    started: float
    ended: float
    status: int
    code: str | None
    reasons: tuple[str, ...]
    request_id: str
    decision_id: str | None

    @property
    def outcome(self) -> Outcome:
        return (self.status, self.code)


class Traffic:
    """Workers sending every kind of request in turn, until stopped."""

    def __init__(self, client: TestClient[Any, Any], token: str, *, workers: int = 3) -> None:
        self._client = client
        self._signer = Signer(client, keyid="acme-k1")
        self._token = token
        self._workers = workers
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.sent: list[Sent] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._work(offset), name=f"traffic-{offset}")
            for offset in range(self._workers)
        ]

    async def stop(self) -> None:
        self._stopping = True
        await asyncio.gather(*self._tasks)

    async def _work(self, offset: int) -> None:
        turn = offset
        while not self._stopping:
            self.sent.append(await self.send(KINDS[turn % len(KINDS)]))
            turn += 1
            await asyncio.sleep(0.01)

    async def send(self, kind: str) -> Sent:
        path = PATHS[kind]
        headers: dict[str, str] = {}
        if kind != "anonymous":
            headers = {"Authorization": f"Bearer {self._token}", **self._signer.sign("GET", path)}
        started = time.monotonic()
        async with self._client.get(path, headers=headers) as response:
            body: dict[str, Any] = orjson.loads(await response.read())
            ended = time.monotonic()
            request_id = response.headers["X-Request-Id"]
            if response.content_type == PROBLEM_CONTENT_TYPE:
                prefix = problem_type("")
                assert body["type"].startswith(prefix), body
                code: str | None = body["type"][len(prefix) :]
                reasons = tuple(body.get("reasons", ()))
                decision_id = body.get("decision_id")
            else:
                code, reasons = None, ()
                # The upstream echoes what the gateway told it.
                decision_id = body["headers"].get("x-nops-decision-id")
        return Sent(kind, started, ended, response.status, code, reasons, request_id, decision_id)

    async def wait_for(self, kind: str, outcome: Outcome, *, since: float) -> None:
        """Wait until a request of ``kind`` started after ``since`` got ``outcome``."""
        await self._wait(
            lambda: any(
                s.kind == kind and s.started >= since and s.outcome == outcome for s in self.sent
            ),
            f"no {kind} {outcome}",
        )

    async def wait_answered(self, count: int, *, since: float) -> None:
        """Wait until ``count`` requests started after ``since`` have their answer."""
        await self._wait(
            lambda: sum(s.started >= since for s in self.sent) >= count, f"not {count} answers"
        )

    async def _wait(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + _WAIT_S
        while not done():
            recent = [(s.kind, s.outcome) for s in self.sent[-6:]]
            assert time.monotonic() < deadline, f"{what}; lately {recent}"
            await asyncio.sleep(0.02)


@dataclass
class Stack:
    client: TestClient[Any, Any]
    opa: OpaProcess | None
    redis: RedisService
    postgres: PostgresService
    agent: AgentProcess
    #: The upstream of the plain route /locked/.
    backend: AgentProcess
    chain_id: str
    audit_dir: Path
    traffic: Traffic
    #: What the kill step noted for the restore step (the supervised OPA's pid).
    notes: dict[str, Any] = field(default_factory=dict)

    async def readiness(self) -> tuple[int, dict[str, Any]]:
        async with self.client.get("/_readyz") as response:
            return response.status, orjson.loads(await response.read())

    async def wait_readiness(
        self, expected: Callable[[int, dict[str, Any]], bool]
    ) -> tuple[int, dict[str, Any]]:
        """Poll /_readyz until its answer is ``expected``; that answer."""
        deadline = time.monotonic() + _WAIT_S
        while True:
            status, body = await self.readiness()
            if expected(status, body):
                return status, body
            assert time.monotonic() < deadline, (status, body)
            await asyncio.sleep(0.05)

    async def wait_ready(self) -> None:
        await self.wait_readiness(lambda status, body: body.get("readiness") == "ready")


# -- the faults ----------------------------------------------------------------------------


Step = Callable[[Stack], Awaitable[None]]


async def _kill_opa(stack: Stack) -> None:
    assert stack.opa is not None
    await asyncio.to_thread(stack.opa.stop)


async def _start_opa(stack: Stack) -> None:
    assert stack.opa is not None
    await asyncio.to_thread(stack.opa.start)


async def _kill_supervised_opa(stack: Stack) -> None:
    local = stack.client.app[LOCAL_OPA]
    assert local is not None
    assert local.pid is not None
    stack.notes["opa_pid"] = local.pid
    os.kill(local.pid, signal.SIGKILL)


async def _supervisor_restarts_opa(stack: Stack) -> None:
    """Nothing to do by hand: the supervisor starts a new OPA (a new pid)."""
    local = stack.client.app[LOCAL_OPA]
    assert local is not None
    deadline = time.monotonic() + _WAIT_S
    while local.pid in (None, stack.notes["opa_pid"]):
        assert time.monotonic() < deadline, "the supervisor did not restart OPA"
        await asyncio.sleep(0.02)


async def _stop_redis(stack: Stack) -> None:
    await asyncio.to_thread(stack.redis.stop)


async def _start_redis(stack: Stack) -> None:
    await asyncio.to_thread(stack.redis.start)


async def _stop_postgres(stack: Stack) -> None:
    await asyncio.to_thread(stack.postgres.stop)


async def _start_postgres(stack: Stack) -> None:
    await asyncio.to_thread(stack.postgres.start)


async def _kill_agent(stack: Stack) -> None:
    await asyncio.to_thread(stack.agent.kill)


async def _start_agent(stack: Stack) -> None:
    await asyncio.to_thread(stack.agent.start)  # the same port: the registry is unchanged


async def _kill_backend(stack: Stack) -> None:
    await asyncio.to_thread(stack.backend.kill)


async def _start_backend(stack: Stack) -> None:
    await asyncio.to_thread(stack.backend.start)


@dataclass(frozen=True, slots=True)
class Fault:
    kill: Step
    restore: Step
    #: Outcomes allowed, per kind, for requests sent while the dependency is down.
    during: Mapping[str, frozenset[Outcome]]
    #: Outcomes that must be seen while it is down, per kind (with the reason).
    must_see: Mapping[str, tuple[Outcome, str | None]]
    #: What /_readyz says while it is down: HTTP status, readiness, and the
    #: checks named under ``unavailable`` / ``degraded`` (at least these).
    ready_status: int | None
    readiness: str | None = None
    unavailable: frozenset[str] = frozenset()
    degraded: frozenset[str] = frozenset()
    supervised_opa: bool = False
    #: The audit log spools (and drains) while the dependency is down.
    spools: bool = False


def _each(outcomes: set[Outcome], **per_kind: set[Outcome]) -> dict[str, frozenset[Outcome]]:
    return {kind: frozenset(per_kind.get(kind, outcomes)) for kind in KINDS}


FAULTS: Final = [
    pytest.param(
        Fault(
            kill=_kill_opa,
            restore=_start_opa,
            # SECURITY: fail closed; no request passes without a decision.
            during=_each({POLICY_UNAVAILABLE}),
            must_see={kind: (POLICY_UNAVAILABLE, "policy_engine_error") for kind in KINDS},
            ready_status=503,
            readiness="unavailable",
            unavailable=frozenset({"opa"}),
        ),
        id="opa-external",
    ),
    pytest.param(
        Fault(
            kill=_kill_supervised_opa,
            restore=_supervisor_restarts_opa,
            # The supervisor restarts it within moments: some requests fail closed.
            during=_each({OK, POLICY_UNAVAILABLE}),
            must_see={"signed": (POLICY_UNAVAILABLE, "policy_engine_error")},
            ready_status=None,  # too brief an outage to catch reliably
            supervised_opa=True,
        ),
        id="opa-supervised",
    ),
    pytest.param(
        Fault(
            kill=_stop_redis,
            restore=_start_redis,
            # SECURITY: the replay cache fails closed; quotas fall back to memory.
            during=_each({REPLAY_UNAVAILABLE}, anonymous={OK}),
            must_see={
                "signed": (REPLAY_UNAVAILABLE, "replay_store_unavailable"),
                "agent": (REPLAY_UNAVAILABLE, "replay_store_unavailable"),
                "anonymous": (OK, None),
            },
            ready_status=200,
            readiness="degraded",
            degraded=frozenset({"redis", "ratelimit"}),
        ),
        id="redis",
    ),
    pytest.param(
        Fault(
            kill=_stop_postgres,
            restore=_start_postgres,
            # Audit records spool locally; agents come from the registry cache.
            during=_each({OK}),
            must_see={kind: (OK, None) for kind in KINDS},
            ready_status=200,
            readiness="degraded",
            degraded=frozenset({"postgres", "audit", "registry"}),
            spools=True,
        ),
        id="postgres",
    ),
    pytest.param(
        Fault(
            kill=_kill_agent,
            restore=_start_agent,
            # The agent's circuit opens: refused at once, without a call.
            during=_each({OK}, agent={UPSTREAM_UNAVAILABLE, AGENT_CIRCUIT_OPEN}),
            must_see={"agent": (AGENT_CIRCUIT_OPEN, "circuit_open"), "signed": (OK, None)},
            # An upstream is not a dependency of the node: it stays ready.
            ready_status=200,
            readiness="ready",
        ),
        id="agent",
    ),
    pytest.param(
        Fault(
            kill=_kill_backend,
            restore=_start_backend,
            # The route's circuit opens: 503 circuit-open, without a call.
            during=_each({OK}, signed={UPSTREAM_UNAVAILABLE, ROUTE_CIRCUIT_OPEN}),
            must_see={"signed": (ROUTE_CIRCUIT_OPEN, "circuit_open"), "agent": (OK, None)},
            ready_status=200,
            readiness="ready",
        ),
        id="upstream",
    ),
]


# -- the stack -----------------------------------------------------------------------------


@pytest.fixture
async def agent() -> AsyncIterator[AgentProcess]:
    """Agent a1, in its own process."""
    process = AgentProcess("a1", free_port())
    await asyncio.to_thread(process.start)
    yield process
    process.kill()


@pytest.fixture
async def backend() -> AsyncIterator[AgentProcess]:
    """The upstream of /locked/: an echoing process that can be killed."""
    process = AgentProcess("backend", free_port())
    await asyncio.to_thread(process.start)
    yield process
    process.kill()


@pytest.fixture
async def registry(make_registry: RegistryFactory, agent: AgentProcess) -> Client:
    """The registry service (on the test PostgreSQL) knowing agent a1 of acme."""
    client = await make_registry()
    body = {"id": "a1", "endpoint_url": agent.url}
    response = await client.post("/agents", json=body, headers=tenant("acme"))
    assert response.status == 201, await response.text()
    return client


StackFactory = Callable[[Fault], Awaitable[Stack]]


@pytest.fixture
async def make_stack(
    make_gateway: GatewayFactory,
    upstream: TestServer,
    registry: Client,
    agent: AgentProcess,
    backend: AgentProcess,
    redis_server: RedisService,
    postgres_server: PostgresService,
    jwt_issuer: FakeIssuer,
    tmp_path: Path,
) -> AsyncIterator[StackFactory]:
    opas: list[OpaProcess] = []
    stacks: list[Stack] = []

    async def factory(fault: Fault) -> Stack:
        opa: OpaProcess | None = None
        if fault.supervised_opa:
            policy = {"url": "", "opa_binary": str(OPA_BINARY), "bundle_dir": str(POLICY_DIR)}
        else:
            opa = OpaProcess(POLICY_DIR)
            opas.append(opa)
            await asyncio.to_thread(opa.start)
            policy = {"url": opa.url}
        chain_id = f"faults-{uuid.uuid4().hex[:12]}"
        audit_dir = tmp_path / "audit"
        upstream_url = str(upstream.make_url("")).rstrip("/")
        client = await make_gateway(
            metrics=METRICS_ON,
            policy={**policy, "timeout_s": 1.0},
            dependencies={
                "redis_url": redis_server.url,
                "postgres_dsn": postgres_server.dsn,
                "probe_timeout_s": 0.5,
            },
            identity={
                "issuers": [
                    {
                        "issuer": jwt_issuer.issuer,
                        "audiences": [AUDIENCE],
                        "jwks_url": jwt_issuer.jwks_url,
                    }
                ]
            },
            audit={
                "store": "postgres",
                "dsn": postgres_server.dsn,
                "chain_id": chain_id,
                "path": str(audit_dir / "audit.jsonl"),
                "spool_path": str(audit_dir / "spool.jsonl"),
            },
            # Quotas far above the traffic: these tests are about faults, not limits.
            ratelimit={
                "anonymous": "1000000/minute",
                "fallback_retry_s": 0.2,
                "tiers": {"free": {"tenant": "1000000/minute", "agent": "1000000/second"}},
            },
            routes=[
                {
                    "name": "echo",
                    "prefix": "/echo/",
                    "upstream": upstream_url,
                    "auth": "none",
                    "require_signature": False,
                },
                {
                    "name": "locked",
                    "prefix": "/locked/",
                    "upstream": backend.url,
                    "connect_timeout_s": 0.5,
                    "circuit_failures": 3,
                    "circuit_open_s": 0.5,
                },
                {
                    "name": "agents",
                    "prefix": "/agents/",
                    "kind": "agent",
                    "timeout_s": 2.0,
                    "connect_timeout_s": 0.5,
                    "agent": {
                        "registry_url": str(registry.make_url("")).rstrip("/"),
                        "cache_ttl_s": 0.1,
                        "stale_if_error_s": 120,
                        "registry_timeout_s": 0.5,
                        "retries": 0,
                        "circuit_failures": 3,
                        "circuit_open_s": 0.5,
                    },
                },
            ],
        )
        traffic = Traffic(client, jwt_issuer.token(scope="locked:read"))
        stack = Stack(
            client,
            opa,
            redis_server,
            postgres_server,
            agent,
            backend,
            chain_id,
            audit_dir,
            traffic,
        )
        stacks.append(stack)
        return stack

    yield factory
    for stack in stacks:
        with contextlib.suppress(Exception):
            await stack.traffic.stop()
    for opa in opas:
        opa.stop()
    # Leave the session services running for the next test.
    redis_server.start()
    postgres_server.start()


async def _audit_records(dsn: str, chain_id: str) -> list[dict[str, Any]]:
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            "SELECT record FROM audit_records WHERE chain_id = $1 ORDER BY seq", chain_id
        )
    finally:
        await connection.close()
    return [orjson.loads(row["record"]) for row in rows]


# -- the test ------------------------------------------------------------------------------


class TestFaultsUnderTraffic:
    @pytest.mark.parametrize("fault", FAULTS)
    async def test_kill_and_restore_a_dependency_mid_stream(
        self, make_stack: StackFactory, fault: Fault
    ) -> None:
        """Down: the table's outcomes and readiness; back: recovery; every answer audited."""
        stack = await make_stack(fault)
        traffic = stack.traffic
        assert (await stack.readiness())[1]["readiness"] == "ready"
        traffic.start()
        for kind in KINDS:
            await traffic.wait_for(kind, OK, since=0)

        killed_at = time.monotonic()
        await fault.kill(stack)
        down_at = time.monotonic()
        for kind, (outcome, reason) in fault.must_see.items():
            await traffic.wait_for(kind, outcome, since=down_at)
            if reason is not None:
                seen = {s.reasons for s in traffic.sent if s.kind == kind and s.outcome == outcome}
                assert (reason,) in seen, seen
        # A steady stream while it is down, not just the first answers.
        await traffic.wait_answered(8 * len(KINDS), since=down_at)
        if fault.ready_status is not None:
            # Fallbacks show once traffic met the fault (the registry cache
            # after its TTL): wait for the state, the dependency staying down.
            status, body = await stack.wait_readiness(
                lambda status, body: (
                    status == fault.ready_status
                    and body["readiness"] == fault.readiness
                    and fault.unavailable <= set(body.get("unavailable", ()))
                    and fault.degraded <= set(body["degraded"])
                )
            )
            if status == 503:
                assert body["type"] == problem_type("dependency-unavailable")
            # The operator's view agrees: each check readiness names reads
            # degraded on /metrics.
            samples = await scrape(stack.client)
            for dependency in fault.unavailable | fault.degraded:
                assert value(samples, "nops_gateway_degraded", dependency=dependency) == 1.0, (
                    dependency
                )

        restore_at = time.monotonic()
        await fault.restore(stack)
        restored_at = time.monotonic()
        await stack.wait_ready()
        for kind in KINDS:
            await traffic.wait_for(kind, OK, since=restored_at)
        recovered_at = time.monotonic()
        # Past recovery, every kind is served again.
        for kind in KINDS:
            await traffic.wait_for(kind, OK, since=recovered_at)
        await traffic.stop()

        _check_outcomes(traffic.sent, fault, killed_at, down_at, restore_at, recovered_at)
        await _check_audit(stack, spools=fault.spools)


def _check_outcomes(
    sent: list[Sent],
    fault: Fault,
    killed_at: float,
    down_at: float,
    restore_at: float,
    recovered_at: float,
) -> None:
    """Each request's outcome is one its window allows."""
    windows: dict[str, int] = defaultdict(int)
    for s in sent:
        allowed = fault.during[s.kind] | {OK}
        if s.ended < killed_at or s.started >= recovered_at:
            window, allowed = "healthy", frozenset({OK})
        elif s.started >= down_at and s.ended < restore_at:
            window, allowed = "down", fault.during[s.kind]
        else:
            window = "transition"
        windows[window] += 1
        assert s.outcome in allowed, (window, s)
    assert windows["healthy"], windows
    assert windows["down"], windows


async def _check_audit(stack: Stack, *, spools: bool) -> None:
    """After the spool drains: every answered request has its record; the chain verifies."""
    recorder = stack.client.app[AUDIT]
    assert recorder is not None
    log = recorder.log
    await asyncio.wait_for(log.wait_drained(), _WAIT_S)
    if spools:
        # A batch whose COMMIT landed as the connection broke is spooled too,
        # and skipped by the drain (the store already holds the same records).
        assert 0 < log.stats.drained <= log.stats.spooled
    else:
        assert log.stats.spooled == 0
    await stack.client.close()  # writes the summaries and a final checkpoint
    dsn = stack.postgres.dsn
    report = await verify_postgres(dsn, stack.chain_id, keys=trusted_keys(stack.audit_dir))
    assert report.intact, report.damage
    assert report.checkpoints >= 1
    records = await _audit_records(dsn, stack.chain_id)
    by_request: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_request[record["request_id"]].append(record)
    for s in stack.traffic.sent:
        if s.code in ANONYMOUS_CODES:
            continue  # counted in a summary record, by design
        mine = by_request.get(s.request_id)
        assert mine, f"no audit record for {s}"
        last = mine[-1]
        if s.code is None:
            assert [r["outcome"] for r in mine] == ["allow"], mine
        else:
            assert (last["status"], last["code"]) == s.outcome, (mine, s)
        if s.decision_id is not None:
            assert last["decision_id"] == s.decision_id, (mine, s)
