"""``python -m bus serve`` and ``scripts/redis`` as real processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ROOT, free_port
from tests.secretscan import observe_output, register_secret
from tests.services import RedisService

PASSWORD = "hunter2-bus-redis-pass"
register_secret(PASSWORD, "bus Redis password")


class BusProcess:
    def __init__(self, redis_url: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.redis_url = redis_url
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bus",
            "serve",
            "--port",
            str(self.port),
            "--shutdown-timeout",
            "5",
            cwd=ROOT,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "NOPS_BUS__REDIS_URL": self.redis_url},
        )
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.get(self.url + "/health") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
        raise AssertionError("bus did not start")

    async def stop(self) -> tuple[int, list[dict[str, Any]]]:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(self.process.communicate(), timeout=20)
        observe_output(stderr, "bus subprocess stderr")
        lines = [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]
        return self.process.returncode or 0, lines


@pytest.fixture
async def served_bus(redis_server: RedisService) -> AsyncIterator[BusProcess]:
    process = BusProcess(redis_server.url)
    await process.start()
    yield process
    if process.process is not None and process.process.returncode is None:
        await process.stop()


class TestServe:
    async def test_serves_publishes_and_stops_on_sigterm(self, served_bus: BusProcess) -> None:
        """The service is ready, takes a message, logs JSON lines and exits 0 on SIGTERM."""
        async with aiohttp.ClientSession() as session:
            async with session.get(served_bus.url + "/_readyz") as ready:
                assert ready.status == 200
            async with session.post(
                served_bus.url + "/topics/t/messages",
                json={"type": "x", "payload": 1},
                headers={"X-Nops-Tenant": "proc"},
            ) as published:
                assert published.status == 201
        code, lines = await served_bus.stop()
        assert code == 0
        access = [line for line in lines if line["logger"] == "bus.access"]
        assert [(line["path"], line["status"]) for line in access] == [
            ("/health", 200),
            ("/_readyz", 200),
            ("/topics/t/messages", 201),
        ]
        assert access[-1]["tenant"] == "proc"

    async def test_unreachable_redis_is_not_ready_and_password_stays_out_of_logs(self) -> None:
        """A Redis URL's password is never logged; /_readyz says 503 while Redis is away."""
        process = BusProcess(f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0")
        await process.start()
        async with (
            aiohttp.ClientSession() as session,
            session.get(process.url + "/_readyz") as ready,
        ):
            assert ready.status == 503
            assert PASSWORD not in await ready.text()
        code, lines = await process.stop()
        assert code == 0
        assert PASSWORD not in json.dumps(lines)
        [start] = [line for line in lines if line["msg"] == "starting"]
        assert start["redis"].startswith("redis://[redacted]@127.0.0.1:")

    def test_bad_config_exits_2_naming_the_key(self) -> None:
        """A bad flag value is reported by key before anything starts."""
        result = subprocess.run(
            [sys.executable, "-m", "bus", "serve", "--max-batch", "0"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 2
        assert "config error: max_batch" in result.stderr


class TestRedisScript:
    def test_scripts_redis_serves_on_the_given_port(self, tmp_path: Path) -> None:
        """scripts/redis runs a private redis-server that answers PING, and stops on SIGTERM."""
        port = free_port()
        process = subprocess.Popen(
            [str(ROOT / "scripts" / "redis"), str(port), str(tmp_path / "redis")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                        sock.sendall(b"PING\r\n")
                        assert sock.recv(64).startswith(b"+PONG")
                        break
                except OSError:
                    assert time.monotonic() < deadline, "scripts/redis did not answer"
                    time.sleep(0.05)
        finally:
            process.terminate()
            assert process.wait(timeout=10) == 0
