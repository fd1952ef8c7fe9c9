"""Shared fixtures: a real OPA, a real upstream, and gateways built on them."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.client import sign_request, signing_middleware
from gateway.config import Config, parse_config
from gateway.echo import create_echo_app
from gateway.server import GatewayRunner
from tests.jwtissuer import FakeIssuer
from tests.registrykit import T0, RegistryFactory, fresh_database, start_registry
from tests.secretscan import register_secret
from tests.services import PostgresService, RedisService

# The bus's fixtures (tenant, bus, bus_http, make_bus, raw_redis, ...).
# The run-wide secrets check over every log line (tests/secretscan.py).
pytest_plugins = ("tests.busfixtures", "tests.secretscan")

ROOT = Path(__file__).resolve().parents[1]
TOOLS_BIN = Path(os.environ.get("TOOLS_BIN", ROOT / ".tools" / "bin"))
OPA_BINARY = TOOLS_BIN / "opa"
POLICY_DIR = ROOT / "policies" / "rego"
#: The policy input of an anonymous GET on the shipped ``echo`` route (allowed).
ECHO_GET_INPUT: Final[dict[str, Any]] = {
    "version": 1,
    "request": {"method": "GET", "path": "/echo/x", "route": "echo", "query": {}},
    "tenant": {"id": None, "tier": None},
    "subject": {"sub": None, "scopes": [], "roles": [], "agent_id": None},
    "signature": {"keyid": None, "alg": None, "created": None},
    "target": {"kind": "upstream", "destination": "echo", "classification": None},
    "source": {"ip": "127.0.0.1"},
}
TEST_POLICY_DIR = ROOT / "tests" / "fixtures" / "rego"

# A client of a test gateway: its ``app`` is the gateway's web.Application.
GatewayClient = TestClient[web.Request, web.Application]
GatewayFactory = Callable[..., Awaitable[GatewayClient]]


class GatewayTestServer(TestServer):
    """A test server that runs the app the way ``gateway serve`` does."""

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        return GatewayRunner(self.app, **kwargs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    """Wait until the OPA at ``url`` answers /health; RuntimeError if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"OPA exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    process.terminate()
    raise RuntimeError("OPA did not become healthy")


class OpaProcess:
    """A real ``opa run --server`` the tests can stop and start again."""

    def __init__(self, *policy_dirs: Path) -> None:
        if not OPA_BINARY.is_file():
            pytest.fail(f"OPA not installed at {OPA_BINARY}: run scripts/tools")
        self.port = free_port()
        self.policy_dirs = policy_dirs
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                str(OPA_BINARY),
                "run",
                "--server",
                "--addr",
                f"127.0.0.1:{self.port}",
                "--skip-version-check",
                "--log-level",
                "error",
                *(str(d) for d in self.policy_dirs),
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            wait_healthy(self.url, self.process)
        except RuntimeError as exc:
            self.stop()
            pytest.fail(str(exc))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None


@pytest.fixture(scope="session")
def opa() -> Iterator[OpaProcess]:
    """One OPA for the session, with the real policies and broken test fixtures."""
    server = OpaProcess(POLICY_DIR, TEST_POLICY_DIR)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisService]:
    """A real Redis for the session; tests that stop it must start it again."""
    service = RedisService(tmp_path_factory.mktemp("redis"))
    service.start()
    yield service
    service.close()


@pytest.fixture
def redis_server(redis_service: RedisService) -> RedisService:
    """The session Redis, running (restarted if a previous test stopped it)."""
    redis_service.start()
    return redis_service


@pytest.fixture(scope="session")
def postgres_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresService]:
    """A real PostgreSQL for the session."""
    service = PostgresService(tmp_path_factory.mktemp("postgres"))
    service.start()
    yield service
    service.close()


@pytest.fixture
def postgres_server(postgres_service: PostgresService) -> PostgresService:
    """The session PostgreSQL, running (restarted if a previous test stopped it)."""
    postgres_service.start()
    return postgres_service


@pytest.fixture
async def upstream() -> AsyncIterator[TestServer]:
    """A real aiohttp upstream (gateway.echo) on a loopback port."""
    server = TestServer(create_echo_app(), host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


# Test tenants and their HMAC keys (32 bytes each, base64 in the config).
ACME_SECRET = bytes(range(1, 33))
ACME_OLD_SECRET = bytes(range(101, 133))
GLOBEX_SECRET = bytes(range(201, 233))
AGENT_A1_SECRET = bytes(range(51, 83))


def _b64(secret: bytes) -> str:
    return base64.b64encode(secret).decode("ascii")


TEST_TENANTS: list[dict[str, Any]] = [
    {
        "id": "acme",
        "tier": "professional",
        "keys": [
            {"keyid": "acme-k1", "secret": _b64(ACME_SECRET)},
            {"keyid": "acme-k0", "secret": _b64(ACME_OLD_SECRET)},
            {"keyid": "acme-agent-a1", "secret": _b64(AGENT_A1_SECRET), "agent_id": "a1"},
        ],
    },
    {
        "id": "globex",
        "tier": "free",
        "keys": [{"keyid": "globex-k1", "secret": _b64(GLOBEX_SECRET)}],
    },
]
TEST_SECRETS: dict[str, bytes] = {
    "acme-k1": ACME_SECRET,
    "acme-k0": ACME_OLD_SECRET,
    "globex-k1": GLOBEX_SECRET,
    "acme-agent-a1": AGENT_A1_SECRET,
}
for _keyid, _secret in TEST_SECRETS.items():
    register_secret(_secret, f"HMAC key {_keyid}")


class PinnedClock:
    """A wall clock that only moves when a test says so."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Signer:
    """Signs requests to a test gateway with one tenant key (gateway.client)."""

    client: TestClient[Any, Any]
    keyid: str = "acme-k1"
    secret: bytes | None = None
    clock: Callable[[], float] = time.time

    def sign(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        **options: Any,
    ) -> dict[str, str]:
        """The signature headers for ``method path`` with this body and headers."""
        secret = self.secret if self.secret is not None else TEST_SECRETS[self.keyid]
        return sign_request(
            method,
            self.client.make_url(path),
            headers,
            body,
            keyid=self.keyid,
            secret=secret,
            clock=self.clock,
            **options,
        )

    async def request(
        self,
        method: str,
        path: str,
        *,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        **options: Any,
    ) -> aiohttp.ClientResponse:
        """Sign and send one request."""
        signed = self.sign(method, path, data, headers, **options)
        return await self.client.request(
            method, path, data=data, headers={**(headers or {}), **signed}
        )


@pytest.fixture
async def jwt_issuer() -> AsyncIterator[FakeIssuer]:
    """A fake token issuer with one RS256 key, its JWKS served over real HTTP."""
    issuer = FakeIssuer()
    issuer.add_key("RS256")
    await issuer.start()
    yield issuer
    await issuer.close()


def gateway_config(opa_url: str, upstream_url: str, **sections: Any) -> Config:
    """A config with the three test routes pointing at ``upstream_url``.

    ``echo`` and ``readonly`` are anonymous (``auth = "none"``) and accept
    unsigned requests; ``locked`` keeps the default ``auth = "jwt"`` and
    requires a signature. Tenants ``acme`` and ``globex`` hold TEST_SECRETS.
    """
    table: dict[str, Any] = {
        "version": 1,
        "policy": {"url": opa_url, "timeout_s": 2.0},
        "logging": {"level": "DEBUG"},
        "routes": [
            {
                "name": "echo",
                "prefix": "/echo/",
                "upstream": upstream_url,
                "timeout_s": 1.0,
                "require_signature": False,
                "auth": "none",
            },
            {
                "name": "readonly",
                "prefix": "/readonly/",
                "upstream": upstream_url,
                "require_signature": False,
                "auth": "none",
            },
            {"name": "locked", "prefix": "/locked/", "upstream": upstream_url},
        ],
        "tenants": TEST_TENANTS,
    }
    for name, values in sections.items():
        if isinstance(values, list):  # arrays of tables: routes, tenants, api_keys
            table[name] = values
        else:
            table.setdefault(name, {}).update(values)
    return parse_config(table)


@pytest.fixture
async def make_gateway(
    opa: OpaProcess, upstream: TestServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[GatewayFactory]:
    """Build gateways against the session OPA and the test upstream.

    Each gateway gets its own audit directory unless ``audit`` names one.
    """
    clients: list[GatewayClient] = []
    upstream_url = str(upstream.make_url("")).rstrip("/")

    async def factory(
        *,
        clock: Callable[[], float] = time.time,
        sign_as: str | None = None,
        span_exporter: Any = None,
        **sections: Any,
    ) -> GatewayClient:
        """``sign_as`` (a keyid of TEST_SECRETS): the client signs every request with it.

        ``span_exporter`` turns tracing on into it. Metrics stay off unless
        ``metrics`` says otherwise (then use port 0: gateways run side by side).
        """
        audit = dict(sections.get("audit", {}))
        if "path" not in audit:
            audit_dir = tmp_path_factory.mktemp("audit")
            audit.setdefault("path", str(audit_dir / "audit.jsonl"))
            audit.setdefault("spool_path", str(audit_dir / "spool.jsonl"))
        sections = {**sections, "audit": audit}
        config = gateway_config(opa.url, upstream_url, **sections)
        middlewares: tuple[aiohttp.ClientMiddlewareType, ...] = ()
        if sign_as is not None:
            signer = signing_middleware(keyid=sign_as, secret=TEST_SECRETS[sign_as], clock=clock)
            middlewares = (signer,)
        client = TestClient(
            GatewayTestServer(
                create_app(config, clock=clock, span_exporter=span_exporter), host="127.0.0.1"
            ),
            middlewares=middlewares,
        )
        await client.start_server()
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.close()


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> GatewayClient:
    """A gateway with the default test config."""
    return await make_gateway()


# -- registry (issue #6) -----------------------------------------------------------------


@pytest.fixture
async def registry_dsn(postgres_server: PostgresService) -> AsyncIterator[str]:
    """A fresh, empty database on the session PostgreSQL, dropped after the test."""
    async with fresh_database(postgres_server.dsn) as dsn:
        yield dsn


@pytest.fixture
def clock() -> PinnedClock:
    """A pinned wall clock the test moves by hand, from 2026-11-23T00:00:00Z."""
    return PinnedClock(T0)


@pytest.fixture
async def make_registry(registry_dsn: str, clock: PinnedClock) -> AsyncIterator[RegistryFactory]:
    """Start registry services on the test database and the pinned clock."""
    clients: list[TestClient[Any, Any]] = []

    async def factory(**kwargs: Any) -> TestClient[Any, Any]:
        client = await start_registry(registry_dsn, clock, **kwargs)
        clients.append(client)
        return client

    yield factory
    for client in reversed(clients):
        await client.close()
