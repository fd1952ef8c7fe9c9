"""Run a local OPA server for a single-machine install.

When no OPA address is configured, the gateway starts ``opa run --server`` on
a free loopback port and restarts it with backoff if it ever exits. While it
is down, decisions fail closed (503).

From a policy directory, the gateway itself builds what OPA loads: it reads
the directory's files (``*_test.rego`` left out, as scripts/build-bundle
does), names their exact bytes with a revision (``sha256-<hex>`` over the
sorted paths and contents), builds an unsigned bundle with that revision from
a private snapshot of those bytes (``opa build --bundle --revision``), and
serves it to OPA from a loopback :class:`~gateway.policy.bundle_server.
BundleFileServer`. It checks the directory every ``watch_s`` and rebuilds on
any change, so an edited policy takes effect without a restart (within
``watch_s`` plus OPA's polling delay, 1-2 s). Every decision then carries the
revision of exactly the files that made it, which is what lets the decision
cache (gateway/policy/cache.py) serve repeats: OPA activates a bundle
atomically, so no answer can be labelled with a revision other than the one
of the policy that computed it. A directory that does not build (a syntax
error) is logged and OPA keeps the last good bundle, as ``--watch`` did.

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
import hashlib
import json
import logging
import os
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp

from gateway.policy.bundle_server import BUNDLE_RESOURCE, BundleFileServer

__all__ = ["LocalBundle", "LocalOpa", "LocalOpaError", "PolicySnapshot"]

_log = logging.getLogger("gateway.opa")

_START_TIMEOUT_S: Final = 15.0
#: Seconds between OPA's polls of a local bundle file (its plugin's minimum is 1).
_BUNDLE_POLL_S: Final = (1, 2)
_MAX_BACKOFF_S: Final = 5.0
#: Seconds between checks of a policy directory for changes.
_WATCH_S: Final = 0.5
_BUILD_TIMEOUT_S: Final = 30.0


class LocalOpaError(RuntimeError):
    """The local OPA could not be started."""


@dataclass(frozen=True, slots=True)
class LocalBundle:
    """A signed bundle file and what verifies it."""

    file: Path
    verification_key_file: Path
    key_id: str = "nops-bundle"
    signing_alg: str = "ES256"

    def opa_config(self, service_url: str) -> dict[str, Any]:
        """OPA configuration: one bundle polled from ``service_url``, verified on every load."""
        config = _dir_config(service_url)
        config["bundles"]["nops"]["signing"] = {"keyid": self.key_id}
        config["keys"] = {
            self.key_id: {
                "algorithm": self.signing_alg,
                "key": self.verification_key_file.read_text(),
            }
        }
        return config


@dataclass(frozen=True, slots=True)
class PolicySnapshot:
    """The files of a policy directory, read once, and the revision naming them."""

    files: tuple[tuple[str, bytes], ...]
    revision: str

    @classmethod
    def read(cls, directory: Path) -> PolicySnapshot:
        """Every file under ``directory`` but tests (as scripts/build-bundle bundles them)."""
        files = []
        for path in sorted(directory.rglob("*")):
            relative = path.relative_to(directory)
            if not path.is_file() or path.name.endswith("_test.rego"):
                continue
            if any(part.startswith(".") for part in relative.parts):
                continue  # editor swap files, .manifest: not policy
            files.append((relative.as_posix(), path.read_bytes()))
        digest = hashlib.sha256()
        for name, body in files:
            # Length-prefixed, so no two different file sets hash alike.
            digest.update(f"{len(name)}:{name}:{len(body)}:".encode())
            digest.update(body)
        return cls(files=tuple(files), revision="sha256-" + digest.hexdigest())

    def write(self, directory: Path) -> None:
        for name, body in self.files:
            target = directory / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(body)


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
        watch_s: float = _WATCH_S,
    ) -> None:
        self.binary = binary
        self.policy_dir = policy_dir
        self.bundle = bundle
        self.port = port or _free_port()
        self._start_timeout_s = start_timeout_s
        self._watch_s = watch_s
        self._config_dir: tempfile.TemporaryDirectory[str] | None = None
        self._bundle_server: BundleFileServer | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._stopping = False
        #: The revision of the policy directory's bundle last built ("" before).
        self.revision = ""
        #: Called as soon as OPA exits unexpectedly (before it is restarted).
        self.on_exit: list[Callable[[], None]] = []

    @property
    def _built_bundle(self) -> Path:
        """Where the bundle built from ``policy_dir`` is served from."""
        if self._config_dir is None:
            self._config_dir = tempfile.TemporaryDirectory(prefix="nops-opa-")
        return Path(self._config_dir.name) / "bundle.tar.gz"

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
            else:
                snapshot = await asyncio.to_thread(PolicySnapshot.read, self.policy_dir)
                await self._build(snapshot)
                self._bundle_server = BundleFileServer(self._built_bundle)
            await self._bundle_server.start()
            await self._spawn()
        except (LocalOpaError, OSError) as exc:
            await self._cleanup()
            if isinstance(exc, LocalOpaError):
                raise
            raise LocalOpaError(f"cannot read the policy directory: {exc}") from None
        self._monitor = asyncio.create_task(self._supervise(), name="opa-supervisor")
        if self.bundle is None:
            self._watcher = asyncio.create_task(self._watch(), name="opa-policy-watch")

    async def stop(self) -> None:
        self._stopping = True
        for task in (self._watcher, self._monitor):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
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
        """What OPA loads: the bundle (signed, or built from the directory) polled from us."""
        assert self._bundle_server is not None  # noqa: S101 - started before OPA
        if self._config_dir is None:
            self._config_dir = tempfile.TemporaryDirectory(prefix="nops-opa-")
        config = Path(self._config_dir.name) / "config.json"
        url = self._bundle_server.url
        opa_config = self.bundle.opa_config(url) if self.bundle is not None else _dir_config(url)
        config.write_text(json.dumps(opa_config))
        return ["--config-file", str(config)]

    async def _build(self, snapshot: PolicySnapshot) -> None:
        """Build ``snapshot`` into the served bundle, under its revision.

        Built from a private copy of the very bytes the revision names, so a
        file edited meanwhile can never be labelled with another content's
        revision; then renamed over the served file (never half a file).
        """
        target = self._built_bundle
        with tempfile.TemporaryDirectory(prefix="nops-policy-", dir=target.parent) as tmp:
            source = Path(tmp) / "src"
            await asyncio.to_thread(snapshot.write, source)
            built = Path(tmp) / "bundle.tar.gz"
            process = await asyncio.create_subprocess_exec(
                str(self.binary),
                "build",
                "--bundle",
                ".",
                "--revision",
                snapshot.revision,
                "-o",
                str(built),
                cwd=source,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                async with asyncio.timeout(_BUILD_TIMEOUT_S):
                    _, errors = await process.communicate()
            except TimeoutError:
                process.kill()
                await process.wait()
                raise LocalOpaError("opa build timed out") from None
            if process.returncode != 0:
                raise LocalOpaError(
                    "the policy directory does not build: "
                    + errors.decode(errors="replace").strip()[:2000]
                )
            os.replace(built, target)
        self.revision = snapshot.revision
        _log.info("policy bundle built", extra={"policy_revision": snapshot.revision})

    async def _watch(self) -> None:
        """Rebuild the bundle whenever the policy directory's contents change."""
        seen = self.revision
        while not self._stopping:
            await asyncio.sleep(self._watch_s)
            try:
                snapshot = await asyncio.to_thread(PolicySnapshot.read, self.policy_dir)
            except OSError as exc:
                _log.error("cannot read the policy directory", extra={"error": str(exc)})
                continue
            if snapshot.revision == seen:
                continue
            seen = snapshot.revision
            try:
                await self._build(snapshot)
            except LocalOpaError as exc:
                # OPA keeps serving the last good bundle; tried again on the next change.
                _log.error("policy change not loaded", extra={"error": str(exc)})

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
        # Ready means the bundle (verified, if signed) was activated.
        health = f"{self.url}/health?bundles"
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
            for callback in self.on_exit:
                callback()
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


def _dir_config(service_url: str) -> dict[str, Any]:
    """OPA configuration: the bundle built from the policy directory, polled from us
    (the signed bundle's configuration adds its verification to this)."""
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
            }
        },
    }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
