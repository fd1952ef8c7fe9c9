"""Run a local OPA server for a single-machine install.

When no OPA address is configured, the gateway starts ``opa run --server`` on
a free loopback port, loaded from the policy directory with ``--watch`` (a
changed policy takes effect without a restart), and restarts it with backoff
if it ever exits. While it is down, decisions fail closed (503).

Given a :class:`LocalBundle`, it loads that signed bundle file instead, with
``--bundle --verification-key``: OPA refuses to start on a bundle whose
signature does not verify, and (watching the file) refuses a replacement that
does not verify while it keeps serving the last good one. Decisions then carry
the bundle's revision.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import aiohttp

__all__ = ["LocalBundle", "LocalOpa", "LocalOpaError"]

_log = logging.getLogger("gateway.opa")

_START_TIMEOUT_S: Final = 15.0
_MAX_BACKOFF_S: Final = 5.0


class LocalOpaError(RuntimeError):
    """The local OPA could not be started."""


@dataclass(frozen=True, slots=True)
class LocalBundle:
    """A signed bundle file and what verifies it."""

    file: Path
    verification_key_file: Path
    key_id: str = "nops-bundle"
    signing_alg: str = "ES256"

    def args(self) -> list[str]:
        return [
            "--bundle",
            "--verification-key",
            str(self.verification_key_file),
            "--verification-key-id",
            self.key_id,
            "--signing-alg",
            self.signing_alg,
            str(self.file),
        ]


class LocalOpa:
    """A supervised ``opa run --server`` child process."""

    def __init__(
        self,
        binary: Path,
        policy_dir: Path,
        *,
        port: int | None = None,
        bundle: LocalBundle | None = None,
    ) -> None:
        self.binary = binary
        self.policy_dir = policy_dir
        self.bundle = bundle
        self.port = port or _free_port()
        self._process: asyncio.subprocess.Process | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        if not self.binary.is_file():
            raise LocalOpaError(
                f"OPA binary not found at {self.binary}; run scripts/tools or set policy.url"
            )
        if self.bundle is not None:
            for path in (self.bundle.file, self.bundle.verification_key_file):
                if not path.is_file():
                    raise LocalOpaError(f"bundle file not found: {path}")
        elif not self.policy_dir.is_dir():
            raise LocalOpaError(f"policy directory not found: {self.policy_dir}")
        await self._spawn()
        self._monitor = asyncio.create_task(self._supervise(), name="opa-supervisor")

    async def stop(self) -> None:
        self._stopping = True
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        await self._terminate()

    async def _spawn(self) -> None:
        self._process = await asyncio.create_subprocess_exec(
            str(self.binary),
            "run",
            "--server",
            "--addr",
            f"127.0.0.1:{self.port}",
            "--watch",
            "--skip-version-check",
            "--log-level",
            "error",
            *(self.bundle.args() if self.bundle is not None else [str(self.policy_dir)]),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
        )
        await self._wait_healthy()
        _log.info("local OPA started", extra={"opa_pid": self._process.pid, "opa_url": self.url})

    async def _wait_healthy(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _START_TIMEOUT_S
        async with aiohttp.ClientSession() as session:
            while loop.time() < deadline:
                if self._process is not None and self._process.returncode is not None:
                    raise LocalOpaError(f"OPA exited with status {self._process.returncode}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(
                        f"{self.url}/health", timeout=aiohttp.ClientTimeout(total=1)
                    ) as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.05)
        await self._terminate()
        raise LocalOpaError(f"OPA did not become healthy within {_START_TIMEOUT_S:.0f} s")

    async def _supervise(self) -> None:
        backoff = 0.1
        while not self._stopping:
            assert self._process is not None  # noqa: S101 - set by start()
            status = await self._process.wait()
            if self._stopping:
                return
            _log.error("local OPA exited; restarting", extra={"exit_status": status})
            await asyncio.sleep(backoff)
            try:
                await self._spawn()
                backoff = 0.1
            except LocalOpaError:
                backoff = min(backoff * 2, _MAX_BACKOFF_S)

    async def _terminate(self) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout=5)
        except TimeoutError:
            process.kill()
            await process.wait()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
