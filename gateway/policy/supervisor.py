"""Run a local OPA server for a single-machine install.

When no OPA address is configured, the gateway starts ``opa run --server`` on
a free loopback port, loaded from the policy directory with ``--watch`` (a
changed policy takes effect without a restart), and restarts it with backoff
if it ever exits. While it is down, decisions fail closed (503).

Given a :class:`LocalBundle`, it loads that signed bundle file instead,
through OPA's bundle plugin polling it from a loopback
:class:`~gateway.policy.bundle_server.BundleFileServer`, with the signature
verified on every download: a bundle that does not verify is never activated
(OPA keeps serving the last good one, or, at start, never becomes ready).
Decisions then carry the bundle's revision. ``opa run --watch --bundle
--verification-key`` is deliberately not used: OPA 1.22 verifies the
signature only at start and activates an unverified replacement on a watch
reload; and a ``file://`` resource is read only once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import aiohttp

from gateway.policy.bundle_server import BUNDLE_RESOURCE, BundleFileServer

__all__ = ["LocalBundle", "LocalOpa", "LocalOpaError"]

_log = logging.getLogger("gateway.opa")

_START_TIMEOUT_S: Final = 15.0
#: Seconds between OPA's polls of a local bundle file (its plugin's minimum is 1).
_BUNDLE_POLL_S: Final = (1, 2)
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

    def opa_config(self, service_url: str) -> dict[str, object]:
        """OPA configuration: one bundle polled from ``service_url``, verified on every load."""
        return {
            "services": {"local": {"url": service_url}},
            "bundles": {
                "nops": {
                    "service": "local",
                    "resource": BUNDLE_RESOURCE,
                    "polling": {
                        "min_delay_seconds": _BUNDLE_POLL_S[0],
                        "max_delay_seconds": _BUNDLE_POLL_S[1],
                    },
                    "signing": {"keyid": self.key_id},
                }
            },
            "keys": {
                self.key_id: {
                    "algorithm": self.signing_alg,
                    "key": self.verification_key_file.read_text(),
                }
            },
        }


class LocalOpa:
    """A supervised ``opa run --server`` child process."""

    def __init__(
        self,
        binary: Path,
        policy_dir: Path,
        *,
        port: int | None = None,
        bundle: LocalBundle | None = None,
        start_timeout_s: float = _START_TIMEOUT_S,
    ) -> None:
        self.binary = binary
        self.policy_dir = policy_dir
        self.bundle = bundle
        self.port = port or _free_port()
        self._start_timeout_s = start_timeout_s
        self._config_dir: tempfile.TemporaryDirectory[str] | None = None
        self._bundle_server: BundleFileServer | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The running OPA's process id (a restart gives a new one), or None."""
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

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
        try:
            if self.bundle is not None:
                self._bundle_server = BundleFileServer(self.bundle.file)
                await self._bundle_server.start()
            await self._spawn()
        except LocalOpaError:
            await self._cleanup()
            raise
        self._monitor = asyncio.create_task(self._supervise(), name="opa-supervisor")

    async def stop(self) -> None:
        self._stopping = True
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        await self._terminate()
        await self._cleanup()

    async def _cleanup(self) -> None:
        if self._bundle_server is not None:
            await self._bundle_server.stop()
            self._bundle_server = None
        if self._config_dir is not None:
            self._config_dir.cleanup()
            self._config_dir = None

    def _source_args(self) -> list[str]:
        """What OPA loads: the watched directory, or the signed bundle's config."""
        if self.bundle is None or self._bundle_server is None:
            return ["--watch", str(self.policy_dir)]
        if self._config_dir is None:
            self._config_dir = tempfile.TemporaryDirectory(prefix="nops-opa-")
        config = Path(self._config_dir.name) / "config.json"
        config.write_text(json.dumps(self.bundle.opa_config(self._bundle_server.url)))
        return ["--config-file", str(config)]

    async def _spawn(self) -> None:
        self._process = await asyncio.create_subprocess_exec(
            str(self.binary),
            "run",
            "--server",
            "--addr",
            f"127.0.0.1:{self.port}",
            "--skip-version-check",
            "--log-level",
            "error",
            *self._source_args(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
        )
        await self._wait_healthy()
        _log.info("local OPA started", extra={"opa_pid": self._process.pid, "opa_url": self.url})

    async def _wait_healthy(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._start_timeout_s
        # With a bundle, ready means the bundle verified and was activated.
        health = f"{self.url}/health" + ("?bundles" if self.bundle is not None else "")
        async with aiohttp.ClientSession() as session:
            while loop.time() < deadline:
                if self._process is not None and self._process.returncode is not None:
                    raise LocalOpaError(f"OPA exited with status {self._process.returncode}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(
                        health, timeout=aiohttp.ClientTimeout(total=1)
                    ) as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.05)
        await self._terminate()
        what = "activate a verified bundle" if self.bundle is not None else "become healthy"
        raise LocalOpaError(f"OPA did not {what} within {self._start_timeout_s:g} s")

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
