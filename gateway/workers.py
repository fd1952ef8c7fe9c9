"""Several gateway processes on one port: ``gateway serve --workers N``.

The main process becomes a small supervisor (docs/adr/0015-multi-worker.md):
it checks that the configuration can be shared, prepares what the workers
must agree on (the audit chain id and signing key), then starts ``N``
``gateway serve`` processes that each bind the port with ``SO_REUSEPORT``, so
the kernel spreads connections over them. It does not serve requests itself.

- SIGTERM or SIGINT is forwarded to every worker, which drains its in-flight
  requests (``server.shutdown_timeout_s``) and exits; the supervisor exits
  once they all have (SIGKILL after the grace period and a margin).
- If a worker exits on its own (a start-up failure, a crash), the supervisor
  stops the others and exits 1: restarting is the job of whatever runs the
  gateway (systemd, Kubernetes), which also sees a crash loop for what it is.
- Each worker learns its index (1..N) from ``NOPS_GATEWAY_WORKER`` and asks
  for SIGTERM if the supervisor dies (``PR_SET_PDEATHSIG``).

State that must be shared lives in Redis and the audit store. What would
silently split per process is refused (:func:`check_shareable`): the
in-memory nonce store (a replay sent to another worker would pass) and
in-memory rate limits (each worker would grant the full quota). Each worker
writes its own audit chain, ``<chain id>-w<index>``, to its own file
(``<stem>-w<index><suffix>``) and spool: two writers cannot append to one
hash chain, and one chain per worker keeps every chain verifiable on its own
with ``audit verify`` (the same data directory, hence the same signing key).
A metrics listener, when enabled, binds ``metrics.port + index - 1`` in worker
``index``.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from audit.checkpoint import load_or_create_signing_key
from audit.setup import resolve_chain_id
from gateway.config import Config, ConfigError, MetricsConfig

__all__ = [
    "WORKER_ENV",
    "check_shareable",
    "current_worker",
    "supervise",
    "worker_config",
]

#: Set by the supervisor in each worker's environment: its index, 1..N.
WORKER_ENV: Final = "NOPS_GATEWAY_WORKER"
#: Longest chain id a worker suffix can be appended to (audit chain ids: 128).
_MAX_BASE_CHAIN_ID: Final = 120
#: Seconds past server.shutdown_timeout_s before a worker that ignores SIGTERM is killed.
_KILL_MARGIN_S: Final = 5.0
_PR_SET_PDEATHSIG: Final = 1

_log = logging.getLogger("gateway.workers")


def current_worker() -> int | None:
    """This process's worker index under a supervisor, else None."""
    raw = os.environ.get(WORKER_ENV, "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else None


def check_shareable(config: Config, workers: int) -> None:
    """Raise ConfigError if ``workers`` processes could not share ``config``'s state."""
    if workers < 1:
        raise ConfigError("server.workers", "must be >= 1")
    if workers == 1:
        return
    redis = bool(config.dependencies.redis_url)
    if config.freshness.nonce_store == "memory" or (
        config.freshness.nonce_store == "auto" and not redis
    ):
        raise ConfigError(
            "freshness.nonce_store",
            f"--workers {workers} needs the nonce store in Redis (dependencies.redis_url): "
            "with one memory store per worker a replay sent to another worker would pass",
        )
    if config.ratelimit.enabled and (
        config.ratelimit.storage == "memory" or (config.ratelimit.storage == "auto" and not redis)
    ):
        raise ConfigError(
            "ratelimit.storage",
            f"--workers {workers} needs rate limits in Redis (dependencies.redis_url): "
            "with memory storage each worker would grant the whole quota",
        )
    metrics = _fixed_metrics_listener(config)
    if metrics is not None and metrics.port + workers - 1 > 65535:
        raise ConfigError("metrics.port", f"port + {workers} workers - 1 exceeds 65535")
    if config.audit.enabled and len(config.audit.chain_id) > _MAX_BASE_CHAIN_ID:
        raise ConfigError(
            "audit.chain_id",
            f"at most {_MAX_BASE_CHAIN_ID} characters with --workers "
            "(each worker appends -w<index>)",
        )


def _suffixed(path: str, index: int) -> str:
    p = Path(path)
    return str(p.with_name(f"{p.stem}-w{index}{p.suffix}"))


def worker_config(config: Config, index: int) -> Config:
    """``config`` as worker ``index`` runs it: its own audit chain, file and spool.

    The chain id is the instance's (configured, or generated once into the data
    directory) followed by ``-w<index>``, so a restarted worker continues its
    chain. The data directory, hence the signing key, stays shared.
    """
    config = _metrics_port(config, index)
    audit = config.audit
    if not audit.enabled:
        return config
    base = resolve_chain_id(audit.chain_id, Path(audit.path).parent)
    return dataclasses.replace(
        config,
        audit=dataclasses.replace(
            audit,
            chain_id=f"{base}-w{index}",
            path=_suffixed(audit.path, index),
            spool_path=_suffixed(audit.spool_path, index),
        ),
    )


def _fixed_metrics_listener(config: Config) -> MetricsConfig | None:
    """The ``[metrics]`` listener if it is enabled on a fixed port; else None."""
    metrics = config.metrics
    return metrics if metrics.enabled and metrics.port else None


def _metrics_port(config: Config, index: int) -> Config:
    """The metrics listener (``[metrics]``) of worker ``index`` on port + index - 1.

    N workers cannot all bind one metrics port, and one of them answering for
    all would report a fraction of the traffic: each worker gets its own port
    (9090, 9091, ...) and Prometheus scrapes each. Port 0 (any free port) is
    left alone.
    """
    metrics = _fixed_metrics_listener(config)
    if metrics is None:
        return config
    return dataclasses.replace(
        config, metrics=dataclasses.replace(metrics, port=metrics.port + index - 1)
    )


def prepare_shared_state(config: Config) -> None:
    """Create, once and before any worker starts, what the workers share on disk."""
    audit = config.audit
    if audit.enabled:
        data_dir = Path(audit.path).parent
        resolve_chain_id(audit.chain_id, data_dir)
        load_or_create_signing_key(audit.signing_key_file, data_dir)


def die_with_parent(parent: int) -> None:
    """Ask the kernel for SIGTERM when the supervisor dies (Linux); exit if it already has."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        sys.exit(1)


def _port_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound (without SO_REUSEPORT: nothing else listens)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def supervise(
    config: Config,
    *,
    workers: int,
    host: str,
    port: int,
    worker_argv: Sequence[str],
) -> int:
    """Run ``workers`` worker processes until a signal or a worker's exit; the exit code.

    ``worker_argv`` starts one worker (``gateway serve`` with the same config
    source, host and port); each gets ``NOPS_GATEWAY_WORKER=<index>``.
    """
    check_shareable(config, workers)
    if not _port_free(host, port):
        _log.error("address in use", extra={"host": host, "port": port})
        return 1
    try:
        prepare_shared_state(config)
    except (OSError, ValueError) as exc:  # the audit data directory: unwritable, a bad chain-id
        _log.error("audit data directory unusable", extra={"error": f"{type(exc).__name__}: {exc}"})
        return 1
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for index in range(1, workers + 1):
            env = {**os.environ, WORKER_ENV: str(index), "NOPS_GATEWAY_PARENT": str(os.getpid())}
            procs.append(subprocess.Popen(list(worker_argv), env=env))  # noqa: S603 - our own argv
        _log.info(
            "workers started",
            extra={"workers": workers, "pids": [p.pid for p in procs], "port": port},
        )
        died: subprocess.Popen[bytes] | None = None
        while died is None and not stop.wait(0.2):
            died = next((p for p in procs if p.poll() is not None), None)
        if died is not None:
            _log.error(
                "worker exited; stopping the others",
                extra={"pid": died.pid, "exit_code": died.returncode},
            )
        else:
            _log.info("stopping workers", extra={"signal": signal.Signals(received[0]).name})
        codes = _stop_all(procs, config.server.shutdown_timeout_s + _KILL_MARGIN_S)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if died is not None:
        return 1
    return 0 if all(code == 0 for code in codes) else 1


def _stop_all(procs: Sequence[subprocess.Popen[bytes]], grace_s: float) -> list[int]:
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    codes: list[int] = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            _log.error("worker ignored SIGTERM; killed", extra={"pid": proc.pid})
            proc.kill()
            codes.append(proc.wait())
    return codes
