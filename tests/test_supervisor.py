"""The supervised local OPA (used when no policy.url is configured)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.policy.supervisor import LocalOpa, LocalOpaError
from tests.conftest import ECHO_GET_INPUT, OPA_BINARY, POLICY_DIR, GatewayFactory

DECISION = "/v1/data/nops/authz/decision"
INPUT = {"input": ECHO_GET_INPUT}


async def decision(opa: LocalOpa) -> dict[str, Any]:
    """OPA's decision for INPUT; {} while no bundle is active (no "result")."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(opa.url + DECISION, json=INPUT) as response,
    ):
        body = await response.json()
        result: dict[str, Any] = body.get("result", {})
        return result


async def decide(opa: LocalOpa) -> bool:
    """Whether OPA allows INPUT (False also while no bundle is active)."""
    return bool((await decision(opa)).get("allow", False))


class TestLocalOpa:
    async def test_starts_and_answers(self) -> None:
        """The supervised OPA serves the repository's policies."""
        opa = LocalOpa(OPA_BINARY, POLICY_DIR)
        await opa.start()
        try:
            assert await decide(opa) is True
        finally:
            await opa.stop()

    async def test_restarts_after_a_crash(self) -> None:
        """Killed OPA comes back on the same address."""
        opa = LocalOpa(OPA_BINARY, POLICY_DIR)
        await opa.start()
        try:
            assert opa._process is not None
            os.kill(opa._process.pid, signal.SIGKILL)
            for _ in range(200):
                await asyncio.sleep(0.05)
                try:
                    if await decide(opa):
                        break
                except aiohttp.ClientError:
                    continue
            assert await decide(opa) is True
        finally:
            await opa.stop()

    async def test_policy_change_applies_without_restart(self, tmp_path: Path) -> None:
        """Editing the route data rebuilds the bundle: the next decisions change."""
        policies = tmp_path / "rego"
        shutil.copytree(POLICY_DIR, policies)
        opa = LocalOpa(OPA_BINARY, policies)
        await opa.start()
        try:
            assert await decide(opa) is True
            routes = policies / "nops" / "routes" / "data.json"
            routes.write_text(routes.read_text().replace('"GET", "HEAD", "POST"', '"POST"', 1))
            for _ in range(100):
                if not await decide(opa):
                    break
                await asyncio.sleep(0.1)
            denied = await decision(opa)
            assert (denied["allow"], denied["reasons"]) == (False, ["method_not_allowed"])
        finally:
            await opa.stop()

    @pytest.mark.parametrize(
        ("binary", "policies", "message"),
        [
            pytest.param(Path("/nonexistent/opa"), POLICY_DIR, "binary not found", id="binary"),
            pytest.param(OPA_BINARY, Path("/nonexistent"), "directory not found", id="policies"),
        ],
    )
    async def test_start_failures_are_clear(
        self, binary: Path, policies: Path, message: str
    ) -> None:
        """A missing binary or policy directory is a clear start-up error."""
        with pytest.raises(LocalOpaError, match=message):
            await LocalOpa(binary, policies).start()

    async def test_gateway_without_policy_url_supervises_opa(
        self, make_gateway: GatewayFactory
    ) -> None:
        """policy.url empty: the gateway starts its own OPA and decides with it."""
        client = await make_gateway(
            policy={"url": "", "opa_binary": str(OPA_BINARY), "bundle_dir": str(POLICY_DIR)}
        )
        assert (await client.get("/echo/x")).status == 200
        assert (await client.get("/_readyz")).status == 200
