"""Processes and measurements shared by the benchmarks.

Everything runs on this machine, on loopback: a real upstream, the bare
proxy, the gateway and a real OPA, each its own process, driven by ``wrk``.
CPU time per request is read from ``/proc/<pid>/stat`` around each run:
unlike wall-clock figures it barely moves with the machine's noise.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPA = Path(os.environ.get("TOOLS_BIN", ROOT / ".tools" / "bin")) / "opa"
_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Stack:
    """Child processes, all stopped on exit."""

    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(
        self, argv: Sequence[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            list(argv),
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.processes.append(process)
        return process

    def opa(self, port: int, *paths: str) -> subprocess.Popen[bytes]:
        return self.spawn(
            [
                str(OPA),
                "run",
                "--server",
                "--addr",
                f"127.0.0.1:{port}",
                "--skip-version-check",
                "--log-level",
                "error",
                *paths,
            ]
        )

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            if process.poll() is None:
                process.kill()


@contextlib.contextmanager
def stack() -> Iterator[Stack]:
    running = Stack()
    try:
        yield running
    finally:
        running.close()


def wait_http(url: str, timeout_s: float = 30.0) -> float:
    """Seconds until ``url`` answers 2xx."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - loopback
                if response.status < 300:
                    return time.monotonic() - started
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{url} did not come up")


@dataclass(frozen=True)
class LoadResult:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us_per_request: dict[str, float]


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if match is None:
        raise ValueError(text)
    return float(match.group(1)) * _UNITS[match.group(2)]


def run_wrk(
    url: str,
    *,
    duration_s: int,
    connections: int,
    threads: int = 1,
    script: Path | None = None,
    script_args: Sequence[str] = (),
    watch: dict[str, int] | None = None,
) -> LoadResult:
    """Drive ``url`` with wrk; CPU seconds of the ``watch`` pids per request."""
    wrk = shutil.which("wrk")
    if wrk is None:
        sys.exit("bench: wrk not found (Debian: apt-get install wrk)")
    argv = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", "--latency"]
    if script is not None:
        argv += ["-s", str(script)]
    before = {name: cpu_seconds(pid) for name, pid in (watch or {}).items()}
    extra = ["--", *script_args] if script_args else []
    output = subprocess.run([*argv, url, *extra], check=True, capture_output=True, text=True).stdout
    after = {name: cpu_seconds(pid) for name, pid in (watch or {}).items()}
    requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", output).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", output).group(1))  # type: ignore[union-attr]
    errors_match = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: .*", output)
    errors = int(errors_match.group(1)) if errors_match else 0
    if socket_errors:
        errors += sum(int(n) for n in re.findall(r"\d+", socket_errors.group(0)))
    cpu = {name: (after[name] - before[name]) / max(requests, 1) * 1e6 for name in before}
    return LoadResult(requests, rps, p50, p99, errors, cpu)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)
