"""The README run command starts the registry too: register an agent and reach it, for real."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.apikeys import hash_secret
from gateway.client import signing_middleware
from registry.devdb import main as devdb
from tests.agentkit import create_agent_app
from tests.conftest import ROOT, free_port
from tests.secretscan import register_secret

SECRET = "run-" + "s" * 40
SIGNING_KEY = b"k" * 32
register_secret(SECRET, "API key secret (scripts/run)")
register_secret(SIGNING_KEY, "HMAC key acme-run")
KEY = {"Authorization": f"ApiKey demo.{SECRET}"}


@pytest.fixture
def run_dir() -> Iterator[Path]:
    # Not tmp_path: under root the PostgreSQL user must traverse the parents.
    path = Path(tempfile.mkdtemp(prefix="nops-run-"))
    yield path
    devdb(["stop", str(path / "postgres")])
    shutil.rmtree(path, ignore_errors=True)


def _config(path: Path, gateway: int, echo: int, registry: int) -> Path:
    shipped = (ROOT / "config" / "gateway.toml").read_text()
    text = (
        shipped.replace("port = 8080", f"port = {gateway}")
        .replace("port = 9090", "port = 0")  # the metrics listener: never a fixed port in tests
        .replace("127.0.0.1:8081", f"127.0.0.1:{echo}")
        .replace("127.0.0.1:8083", f"127.0.0.1:{registry}")
        .replace('bundle_dir = "policies/rego"', f'bundle_dir = "{ROOT / "policies" / "rego"}"')
        .replace('opa_binary = ".tools/bin/opa"', f'opa_binary = "{ROOT / ".tools/bin/opa"}"')
    )
    text += f'\n[[api_keys]]\nid = "demo"\ntenant = "acme"\nhash = "{hash_secret(SECRET)}"\n'
    # The shipped routes require signed requests: give acme a signing key.
    text += (
        '\n[[tenants]]\nid = "acme"\n\n[[tenants.keys]]\nkeyid = "acme-run"\n'
        f'secret = "{base64.b64encode(SIGNING_KEY).decode()}"\n'
    )
    config = path / "gateway.toml"
    config.write_text(text)
    return config


class RunScript:
    """scripts/run in its own process group, stopped like Ctrl-C."""

    def __init__(self, run_dir: Path) -> None:
        self.gateway_port, self.echo_port, self.registry_port = (
            free_port(),
            free_port(),
            free_port(),
        )
        self.run_dir = run_dir
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        config = _config(self.run_dir, self.gateway_port, self.echo_port, self.registry_port)
        env = {
            **os.environ,
            "NOPS_GATEWAY_CONFIG": str(config),
            "NOPS_ECHO_PORT": str(self.echo_port),
            "NOPS_REGISTRY_PORT": str(self.registry_port),
            "NOPS_RUN_DIR": str(self.run_dir),
        }
        self.process = subprocess.Popen(
            [str(ROOT / "scripts" / "run")],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # so SIGINT reaches the whole group, as Ctrl-C does
        )

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture
def run_script(run_dir: Path) -> Iterator[RunScript]:
    script = RunScript(run_dir)
    script.start()
    yield script
    script.stop()


class TestRunCommand:
    async def test_run_starts_registry_and_routes_to_agents(
        self, run_script: RunScript, run_dir: Path
    ) -> None:
        """scripts/run: the registry answers through the gateway, and agents get traffic."""
        agent = TestServer(create_agent_app("demo-agent"), host="127.0.0.1")
        await agent.start_server()
        base = f"http://127.0.0.1:{run_script.gateway_port}"
        try:
            signer = signing_middleware(keyid="acme-run", secret=SIGNING_KEY)
            async with aiohttp.ClientSession(middlewares=(signer,)) as session:
                deadline = time.monotonic() + 60
                while True:
                    assert run_script.alive, "scripts/run exited early"
                    try:
                        async with session.get(f"{base}/registry/agents", headers=KEY) as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    assert time.monotonic() < deadline, "the gateway and registry did not start"
                    await asyncio.sleep(0.2)
                body = {"id": "demo", "endpoint_url": str(agent.make_url("")).rstrip("/")}
                async with session.post(f"{base}/registry/agents", json=body, headers=KEY) as r:
                    assert r.status == 201
                async with session.post(f"{base}/registry/agents/demo/heartbeat", headers=KEY) as r:
                    assert r.status == 200
                async with session.get(f"{base}/agents/demo/hello", headers=KEY) as r:
                    assert r.status == 200
                    assert (await r.json())["agent"] == "demo-agent"
                async with session.get(f"{base}/echo/x") as r:
                    assert r.status == 200
            # The registry's events flow through the bus that scripts/run started
            # (read directly from the bus, as the gateway would forward for acme).
            watch = "http://127.0.0.1:8082/topics/agents/subscriptions/run-test/messages"
            async with aiohttp.ClientSession() as plain:
                types: list[str] = []
                deadline = time.monotonic() + 20
                while "agent.heartbeat" not in types and time.monotonic() < deadline:
                    async with plain.get(
                        f"{watch}?consumer=c&max=10&wait=1", headers={"X-Nops-Tenant": "acme"}
                    ) as r:
                        assert r.status == 200
                        types += [m["envelope"]["type"] for m in (await r.json())["messages"]]
                assert types[:2] == ["agent.registered", "agent.heartbeat"]
        finally:
            await agent.close()
        run_script.stop()
        assert devdb(["dsn", str(run_dir / "postgres")]) == 1  # PostgreSQL was stopped too
