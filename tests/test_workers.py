"""`gateway serve --workers N`: shareable configs only, N processes, one port, a chain each."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.client import sign_request
from gateway.config import (
    AuditConfig,
    Config,
    ConfigError,
    DependenciesConfig,
    MetricsConfig,
    parse_config,
)
from gateway.workers import check_shareable, prepare_shared_state, worker_config
from tests.conftest import ROOT, TEST_SECRETS, TEST_TENANTS, OpaProcess, free_port
from tests.problems import assert_problem
from tests.services import RedisService

REDIS = {"redis_url": "redis://127.0.0.1:6379/0"}


def _config(**sections: Any) -> Any:
    return parse_config({"version": 1, **sections})


class TestShareable:
    @pytest.mark.parametrize(
        ("sections", "workers", "refused_key"),
        [
            ({}, 1, None),
            ({}, 2, "freshness.nonce_store"),
            ({"dependencies": REDIS}, 2, None),
            ({"dependencies": REDIS, "freshness": {"nonce_store": "memory"}}, 2,
             "freshness.nonce_store"),
            ({"dependencies": REDIS, "ratelimit": {"storage": "memory"}}, 2, "ratelimit.storage"),
            ({"dependencies": REDIS, "ratelimit": {"storage": "memory", "enabled": False}}, 2,
             None),
            ({"freshness": {"nonce_store": "memory"}, "ratelimit": {"storage": "memory"}}, 1,
             None),
            ({"dependencies": REDIS, "audit": {"chain_id": "c" * 121}}, 2, "audit.chain_id"),
            ({"dependencies": REDIS, "audit": {"chain_id": "c" * 120}}, 2, None),
            ({"dependencies": REDIS}, 0, "server.workers"),
        ],
    )  # fmt: skip
    def test_only_state_every_worker_shares_is_accepted(
        self, sections: dict[str, Any], workers: int, refused_key: str | None
    ) -> None:
        config = _config(**sections)
        if refused_key is None:
            check_shareable(config, workers)
            return
        with pytest.raises(ConfigError) as raised:
            check_shareable(config, workers)
        assert raised.value.key == refused_key

    def test_config_bounds_workers(self) -> None:
        for workers in (0, 65):
            with pytest.raises(ConfigError) as raised:
                _config(server={"workers": workers})
            assert raised.value.key == "server.workers"


class TestWorkerConfig:
    def test_each_worker_gets_its_own_chain_file_and_spool(self, tmp_path: Path) -> None:
        config = _config(
            audit={"path": str(tmp_path / "audit.jsonl"), "spool_path": str(tmp_path / "sp.jsonl")}
        )
        prepare_shared_state(config)
        base = (tmp_path / "chain-id").read_text().strip()
        assert (tmp_path / "audit-signing-key.pem").is_file()
        first, second = worker_config(config, 1), worker_config(config, 2)
        assert (first.audit.chain_id, second.audit.chain_id) == (f"{base}-w1", f"{base}-w2")
        assert first.audit.path == str(tmp_path / "audit-w1.jsonl")
        assert second.audit.spool_path == str(tmp_path / "sp-w2.jsonl")
        # A restarted worker continues its chain.
        assert worker_config(config, 2).audit.chain_id == second.audit.chain_id

    def test_a_configured_chain_id_is_the_base(self, tmp_path: Path) -> None:
        config = _config(audit={"chain_id": "edge-1", "path": str(tmp_path / "a.jsonl")})
        assert worker_config(config, 3).audit.chain_id == "edge-1-w3"
        assert not (tmp_path / "chain-id").exists()

    def test_audit_off_is_left_alone(self) -> None:
        config = _config(audit={"enabled": False})
        assert worker_config(config, 2) is config


class TestMetricsListener:
    @pytest.mark.parametrize(
        ("metrics", "index", "port"),
        [
            (MetricsConfig(enabled=True, port=9090), 1, 9090),
            (MetricsConfig(enabled=True, port=9090), 3, 9092),
            (MetricsConfig(enabled=True, port=0), 3, 0),  # any free port: left alone
            (MetricsConfig(enabled=False, port=9090), 3, 9090),
        ],
    )
    def test_each_worker_binds_its_own_metrics_port(
        self, metrics: MetricsConfig, index: int, port: int
    ) -> None:
        config = Config(audit=AuditConfig(enabled=False), metrics=metrics)
        assert worker_config(config, index).metrics.port == port

    def test_metrics_ports_must_fit(self) -> None:
        config = Config(
            dependencies=DependenciesConfig(redis_url=REDIS["redis_url"]),
            metrics=MetricsConfig(enabled=True, port=65535),
        )
        check_shareable(config, 1)
        with pytest.raises(ConfigError) as raised:
            check_shareable(config, 2)
        assert raised.value.key == "metrics.port"


def test_cli_refuses_unshareable_config(tmp_path: Path) -> None:
    """Memory-only replay and rate limits: a config error, exit 2, nothing started."""
    config = tmp_path / "gateway.toml"
    config.write_text("version = 1\n")
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--workers", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "config error: freshness.nonce_store:" in result.stderr
    assert "replay" in result.stderr


def test_supervisor_refuses_a_port_in_use(tmp_path: Path) -> None:
    """Another listener on the port: one log line, exit 1, no worker joins it (SO_REUSEPORT)."""
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'version = 1\n[dependencies]\nredis_url = "redis://127.0.0.1:1/0"\n'
        f'[audit]\npath = "{tmp_path / "audit.jsonl"}"\n'
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        argv = ["--port", str(taken.getsockname()[1]), "--workers", "2"]
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config), *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert [line["msg"] for line in lines if line["level"] == "error"] == ["address in use"]
    assert not (tmp_path / "audit-w1.jsonl").exists()


def _two_free_ports() -> int:
    """A port P with P + 1 free too (worker 2's metrics listener)."""
    for _ in range(50):
        base = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
        return base
    raise AssertionError("no two consecutive free ports")


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Served:
    def __init__(self, process: subprocess.Popen[bytes], port: int, audit_dir: Path) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}"
        self.audit_dir = audit_dir
        self.metrics_port = 0

    async def pinned_sessions(self) -> dict[int, aiohttp.ClientSession]:
        """One keep-alive session (one connection) per worker index, found by asking /_readyz."""
        sessions: dict[int, aiohttp.ClientSession] = {}
        spare: list[aiohttp.ClientSession] = []
        for _ in range(60):
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
            async with session.get(self.url + "/_readyz") as response:
                assert response.status == 200
                worker = (await response.json())["worker"]
            if worker in sessions:
                spare.append(session)
            else:
                sessions[worker] = session
            if len(sessions) == 2:
                break
        for session in spare:
            await session.close()
        return sessions


@pytest.fixture
async def served(
    tmp_path: Path, opa: OpaProcess, upstream: TestServer, redis_server: RedisService
) -> AsyncIterator[Served]:
    upstream_url = str(upstream.make_url("")).rstrip("/")
    audit_dir = tmp_path / "audit"
    tenants = "\n".join(
        f'[[tenants]]\nid = "{t["id"]}"\ntier = "{t["tier"]}"\n'
        + "".join(f'[[tenants.keys]]\nkeyid = "{k["keyid"]}"\nsecret = "{k["secret"]}"\n'
                  for k in t["keys"] if "agent_id" not in k)
        for t in TEST_TENANTS
    )  # fmt: skip
    metrics_port = _two_free_ports()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"""version = 1
[server]
shutdown_timeout_s = 5
[policy]
url = "{opa.url}"
[dependencies]
redis_url = "{redis_server.url}"
[audit]
path = "{audit_dir / "audit.jsonl"}"
spool_path = "{audit_dir / "spool.jsonl"}"
checkpoint_every = 2
[metrics]
enabled = true
port = {metrics_port}
[[routes]]
name = "echo"
prefix = "/echo/"
upstream = "{upstream_url}"
auth = "none"
require_signature = false
{tenants}"""
    )
    port = free_port()
    process = _spawn(config, port)
    running = Served(process, port, audit_dir)
    running.metrics_port = metrics_port
    # Ready once both workers have answered, each on a new connection (the
    # kernel picks the listening socket per connection).
    seen: set[int] = set()
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(600):
            assert process.poll() is None, "the supervisor exited"
            try:
                async with session.get(running.url + "/_readyz") as response:
                    if response.status == 200:
                        seen.add((await response.json())["worker"])
            except aiohttp.ClientError:
                pass
            if seen == {1, 2}:
                break
            await asyncio.sleep(0.05)
    yield running
    for pid in _children(process.pid):
        os.kill(pid, signal.SIGKILL)
    if process.poll() is None:
        process.kill()
        process.wait()


def _spawn(config: Path, port: int) -> subprocess.Popen[bytes]:
    argv = ["serve", "--config", str(config), "--port", str(port), "--workers", "2"]
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", *argv], cwd=ROOT, stderr=subprocess.DEVNULL
    )


def _verify(log: Path) -> dict[str, Any]:
    """``audit verify --json`` of ``log``; the report (fails the test if not intact)."""
    result = subprocess.run(
        [sys.executable, "-m", "audit", "verify", str(log), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def _signed(url: str, nonce: str) -> dict[str, str]:
    return sign_request("GET", url, keyid="acme-k1", secret=TEST_SECRETS["acme-k1"], nonce=nonce)


class TestServeWorkers:
    async def test_two_processes_share_the_port_and_the_replay_store(self, served: Served) -> None:
        """Both workers answer on one port; a nonce used at one is a replay at the other;
        SIGTERM stops all; each worker's audit chain verifies."""
        workers = _children(served.process.pid)
        assert len(workers) == 2
        sessions = await served.pinned_sessions()
        try:
            assert sorted(sessions) == [1, 2], "the kernel never spread connections"
            for worker, session in sessions.items():
                url = f"{served.url}/echo/w{worker}"
                response = await session.get(url, headers=_signed(url, f"n-{worker}"))
                assert response.status == 200
            # The nonce worker 1 accepted, signed anew for another path, at worker 2.
            url = f"{served.url}/echo/again"
            replay = await sessions[2].get(url, headers=_signed(url, "n-1"))
            await assert_problem(replay, 409, "replayed-nonce", ["nonce_reused"])
            # Each worker's metrics listener on its own port: metrics.port + index - 1.
            async with aiohttp.ClientSession() as session:
                for offset in (0, 1):
                    url = f"http://127.0.0.1:{served.metrics_port + offset}/metrics"
                    async with session.get(url) as response:
                        assert response.status == 200
                        assert "nops_" in await response.text()
        finally:
            for session in sessions.values():
                await session.close()

        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(timeout=30) == 0
        assert not any(_alive(pid) for pid in workers)

        for worker in (1, 2):
            log = served.audit_dir / f"audit-w{worker}.jsonl"
            report = _verify(log)
            records = [json.loads(line) for line in log.read_text().splitlines()]
            assert {r["chain_id"] for r in records} == {report["chain_id"]}
            assert report["chain_id"].endswith(f"-w{worker}")
            assert any(r["outcome"] == "allow" for r in records)
        replayed = [
            json.loads(line)
            for line in (served.audit_dir / "audit-w2.jsonl").read_text().splitlines()
        ]
        assert any(r.get("counts", {}).get("tenant:acme|replayed-nonce") for r in replayed)

    async def test_a_dead_worker_stops_the_rest(self, served: Served) -> None:
        """A worker that dies takes the others down and the supervisor exits 1."""
        first, second = sorted(_children(served.process.pid))
        os.kill(first, signal.SIGKILL)
        assert served.process.wait(timeout=30) == 1
        assert not _alive(second)
