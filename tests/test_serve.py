"""`gateway serve` as a real process: JSON logs, no secrets, graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import ROOT, OpaProcess, free_port
from tests.secretscan import observe_output, register_secret

SECRETS = ("hunter2-redis-pass", "bearer-token-s3cret", "query-s3cret", "cookie-s3cret")
for _secret in SECRETS:
    register_secret(_secret, "gateway serve secret")


class GatewayProcess:
    def __init__(self, config: Path, port: int) -> None:
        self.config = config
        self.port = port
        self.process: asyncio.subprocess.Process | None = None
        self.url = f"http://127.0.0.1:{port}"

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--config",
            str(self.config),
            "--port",
            str(self.port),
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
            env={
                **os.environ,
                "NOPS_GATEWAY__DEPENDENCIES__REDIS_URL": "redis://:hunter2-redis-pass@127.0.0.1:1/0",
            },
        )
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.get(self.url + "/health") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
        raise AssertionError("gateway did not start")

    async def stop(self) -> tuple[int, list[dict[str, Any]]]:
        assert self.process is not None
        assert self.process.stderr is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(self.process.communicate(), timeout=20)
        observe_output(stderr, "gateway subprocess stderr")
        lines = [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]
        return self.process.returncode or 0, lines


@pytest.fixture
async def served(
    tmp_path: Path, opa: OpaProcess, upstream: TestServer
) -> AsyncIterator[GatewayProcess]:
    upstream_url = str(upstream.make_url("")).rstrip("/")
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"""version = 1
[server]
shutdown_timeout_s = 10
[policy]
url = "{opa.url}"
[audit]
path = "{tmp_path / "audit" / "audit.jsonl"}"
spool_path = "{tmp_path / "audit" / "spool.jsonl"}"
[[routes]]
name = "echo"
prefix = "/echo/"
upstream = "{upstream_url}"
auth = "none"
require_signature = false
"""
    )
    process = GatewayProcess(config, free_port())
    await process.start()
    yield process
    if process.process is not None and process.process.returncode is None:
        process.process.kill()
        await process.process.wait()


class TestServe:
    async def test_in_flight_requests_finish_on_sigterm(self, served: GatewayProcess) -> None:
        """SIGTERM: the slow in-flight request completes, then the process exits 0."""
        async with aiohttp.ClientSession() as session:
            slow = asyncio.create_task(session.get(served.url + "/echo/slow/3"))
            # Time for the request to reach the gateway on a loaded machine.
            await asyncio.sleep(1.0)
            assert served.process is not None
            served.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            served.process.send_signal(signal.SIGTERM)  # a second one must not cut it off
            response = await slow
            assert response.status == 200
            assert (await response.json())["path"] == "/echo/slow/3"
        status, lines = await served.stop()
        assert status == 0
        messages = [line["msg"] for line in lines]
        assert "shutting down" in messages
        assert messages[-1] == "stopped"

    async def test_logs_are_json_with_request_ids_and_no_secrets(
        self, served: GatewayProcess
    ) -> None:
        """Every log line is JSON; the request line has the id; no secret appears."""
        async with aiohttp.ClientSession() as session:
            response = await session.get(
                served.url + "/echo/x?token=query-s3cret",
                headers={
                    "Authorization": "Bearer bearer-token-s3cret",
                    "Cookie": "session=cookie-s3cret",
                },
            )
            request_id = response.headers["X-Request-Id"]
            assert response.status == 200
            # Redis is unreachable: degraded (rate limits in memory), still serving.
            ready = await session.get(served.url + "/_readyz")
            assert ready.status == 200
            assert "redis" in (await ready.json())["degraded"]
        _, lines = await served.stop()
        request_lines = [line for line in lines if line["msg"] == "request"]
        proxied = next(line for line in request_lines if line["path"] == "/echo/x")
        assert proxied["request_id"] == request_id
        assert proxied["status"] == 200
        assert proxied["route"] == "echo"
        assert proxied["stage"] == "route"
        assert len(proxied["decision_id"]) == 36
        text = json.dumps(lines)
        for secret in SECRETS:
            assert secret not in text


class TestRunCommandConfig:
    def test_run_script_uses_the_shipped_config(self) -> None:
        """scripts/run serves config/gateway.toml, which check-config accepts."""
        script = (ROOT / "scripts" / "run").read_text()
        assert "config/gateway.toml" in script
        assert (ROOT / "config" / "gateway.toml").is_file()
