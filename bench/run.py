"""The gateway's full pipeline against a bare aiohttp proxy, in one command.

    make bench       (= python -m bench.run)
    python -m bench.run [--quick] [--reps 3] [--workers 1] [--generator auto|python|wrk]
                        [--audit-store postgres|file] [--no-scaling] [--out FILE]
                        [--decision-cache on|off] [--cache-key-exclude PATHS]
                        [--policy-engine opa|embedded]

Starts, on loopback: a private Redis, a durable PostgreSQL (audit store; or
the file store), a real OPA as deployed (deploy/opa/config.yaml: it polls
policies/rego as a signed bundle, built by scripts/build-bundle with a
content revision, from gateway.policy.bundle_server; so the gateway's
decision cache can serve repeats, unless ``--decision-cache off``; with
``--cache-key-exclude``, default signature.created, left out of the cache
key and of the policy input; with ``--policy-engine embedded`` the gateway
evaluates the same signed bundle in-process instead, compiled to wasm), a
real aiohttp upstream
(gateway.echo), the bare aiohttp reverse proxy (bench.bare_proxy, uvloop,
keep-alive, ``--workers`` processes on one port) and the gateway
(``gateway serve --workers N``) with the full pipeline on ``/locked/``
(signature, replay, rate limit, RS256 JWT, OPA decision, durable audit,
proxy). Every request to it is pre-signed with its own nonce. Then, with the
same load generator for both and alternating targets, ``--reps`` times:

1. start-up: process start -> first 200 from ``/_readyz``;
2. max throughput (closed loop, ``--connections``): bare, gateway without
   authentication (``/echo/``), gateway full; the ratio gateway/bare;
3. latency at fixed offered loads (open loop; 100, 1000 req/s and 70% of the
   gateway's measured saturation): p50/p99 of bare and gateway and what the
   gateway adds (gateway minus bare at the same offered load);
4. per-stage CPU µs per request: a separate single gateway process
   (bench.stages) driven one request at a time;
5. RSS idle and loaded (peak under load), of all gateway processes;
6. scaling: max throughput of bare and gateway with 1 and 2 processes.

Before step 1 and after step 3, bench.fsync_probe measures the durability
floor: one append + fsync on the audit store's disk and one PostgreSQL
commit (synchronous_commit on), p50/p99 of 300 each, one at a time.

Medians over the repetitions are printed and written to
bench/results/latest.json (schema in bench/RESULTS.md). The load generator
is bench.loadgen (Python, open loop without coordinated omission); with
``--generator wrk`` (or ``auto`` and wrk on PATH) wrk drives the
max-throughput runs; fixed-rate runs always use bench.loadgen (wrk has no
fixed rate).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench import fsync_probe, loadgen, signed
from bench.harness import OPA, ROOT, cpu_seconds, free_port, median, rss_mb, run_wrk, wait_http

SCHEMA = "nops-bench/1"
FULL_PATH = "/locked/bench/ping"
NOAUTH_PATH = "/echo/bench/ping"
STAGE_WARMUP = 200


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


@dataclass
class Group:
    """Processes that make up one target (a supervisor and its workers, or N bare proxies)."""

    processes: list[subprocess.Popen[bytes]]
    port: int

    def pids(self) -> list[int]:
        pids = [p.pid for p in self.processes]
        for process in self.processes:
            pids += _children(process.pid)
        return pids

    def cpu(self) -> float:
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                total += cpu_seconds(pid)
        return total

    def rss(self) -> float:
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                total += rss_mb(pid)
        return total

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@dataclass
class Services:
    workdir: Path
    redis_url: str
    opa_url: str
    upstream_port: int
    pg_dsn: str
    jwks: Path
    token: str
    others: dict[str, int] = field(default_factory=dict)  # name -> pid, for CPU accounting
    #: The gateway config's [policy.cache] table.
    policy_cache: str = "enabled = true"
    #: The gateway config's [policy] lines: an OPA address, or the embedded engine.
    policy: str = ""


def _spawn(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _signed_bundle(workdir: Path) -> tuple[Path, Path]:
    """policies/rego as the signed bundle production runs (its revision names its contents)."""
    bundle = workdir / "bundle.tar.gz"
    keys = workdir / "bundle-keys"
    keys.mkdir()
    private, public = keys / "private.pem", keys / "public.pem"
    key = ec.generate_private_key(ec.SECP256R1())
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    subprocess.run(
        [str(ROOT / "scripts" / "build-bundle"), "-o", str(bundle), "--signing-key", str(private)],
        check=True, capture_output=True, cwd=ROOT,
    )  # fmt: skip
    return bundle, public


def _policy_toml(settings: Settings, opa_url: str, bundle: Path, public: Path) -> str:
    if settings.policy_engine == "embedded":
        return (
            f'engine = "embedded"\nopa_binary = "{OPA}"\n'
            f'bundle_file = "{bundle}"\nverification_key_file = "{public}"'
        )
    return f'url = "{opa_url}"'


def _policy_cache_toml(settings: Settings) -> str:
    if settings.decision_cache == "off":
        return "enabled = false"
    return f"enabled = true\nkey_exclude = {json.dumps(list(settings.cache_key_exclude))}"


@contextlib.contextmanager
def services(workdir: Path, settings: Settings) -> Iterator[Services]:
    ports = {name: free_port() for name in ("redis", "opa", "upstream", "bundles")}
    started: list[subprocess.Popen[bytes]] = []
    pg: Any = None
    try:
        redis = _spawn([str(ROOT / "scripts" / "redis"), str(ports["redis"]), str(workdir)])
        bundle, public = _signed_bundle(workdir)
        bundles = _spawn(
            [sys.executable, "-m", "gateway.policy.bundle_server", "--file", str(bundle),
             "--port", str(ports["bundles"])]
        )  # fmt: skip
        started.append(bundles)
        wait_http(f"http://127.0.0.1:{ports['bundles']}/health")
        opa_args = ["--skip-version-check", "--log-level", "error"]
        opa_args += ["--config-file", "deploy/opa/config.yaml"]
        opa_args += ["--set", f"services.bundles.url=http://127.0.0.1:{ports['bundles']}"]
        opa_args += ["--set-file", f"keys.nops-bundle.key={public}"]
        opa = _spawn(
            [str(OPA), "run", "--server", "--addr", f"127.0.0.1:{ports['opa']}", *opa_args]
        )
        upstream = _spawn([sys.executable, "-m", "gateway.echo", "--port", str(ports["upstream"])])
        started += [redis, opa, upstream]
        dsn = ""
        if settings.audit_store == "postgres":
            from registry.devdb import PostgresService

            # A kept data directory makes the cluster durable (fsync on).
            pg = PostgresService(workdir, data_dir=workdir / "pg")
            pg.start()
            dsn = pg.dsn
        # Ready once the signed bundle verified and was activated.
        wait_http(f"http://127.0.0.1:{ports['opa']}/health?bundles")
        wait_http(f"http://127.0.0.1:{ports['upstream']}/ping")
        jwks, token = signed.identity_files(workdir)
        yield Services(
            workdir=workdir,
            redis_url=f"redis://127.0.0.1:{ports['redis']}/0",
            opa_url=f"http://127.0.0.1:{ports['opa']}",
            upstream_port=ports["upstream"],
            pg_dsn=dsn,
            jwks=jwks,
            token=token,
            others={"opa": opa.pid, "redis": redis.pid, "upstream": upstream.pid},
            policy_cache=_policy_cache_toml(settings),
            policy=_policy_toml(settings, f"http://127.0.0.1:{ports['opa']}", bundle, public),
        )
    finally:
        for process in started:
            if process.poll() is None:
                process.terminate()
        for process in started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        if pg is not None:
            pg.close()


def write_config(svc: Services, name: str) -> Path:
    """A gateway config with its own audit directory (a file store is locked by one gateway)."""
    upstream = f"http://127.0.0.1:{svc.upstream_port}"
    audit_dir = svc.workdir / f"audit-{name}"
    store = f'store = "postgres"\ndsn = "{svc.pg_dsn}"' if svc.pg_dsn else 'store = "file"'
    path = svc.workdir / f"gateway-{name}.toml"
    path.write_text(
        f"""version = 1
[server]
host = "127.0.0.1"
shutdown_timeout_s = 5
[policy]
{svc.policy}
[policy.cache]
{svc.policy_cache}
[dependencies]
redis_url = "{svc.redis_url}"
[logging]
level = "INFO"
[audit]
{store}
path = "{audit_dir / "audit.jsonl"}"
spool_path = "{audit_dir / "spool.jsonl"}"
[ratelimit]
# Never refuses: the bench measures the cost of taking a quota, not of 429s.
anonymous = "1000000000/minute"
[[routes]]
name = "echo"
prefix = "/echo/"
upstream = "{upstream}"
auth = "none"
require_signature = false
[[routes]]
name = "locked"
prefix = "/locked/"
upstream = "{upstream}"
auth = "jwt"
require_signature = true
{signed.config_toml(svc.jwks)}"""
    )
    return path


def start_gateway(
    config: Path, workers: int, argv0: list[str] | None = None
) -> tuple[Group, float]:
    """``gateway serve --workers N``; the group and seconds from spawn to /_readyz 200."""
    port = free_port()
    command = argv0 or [sys.executable, "-m", "gateway"]
    started = time.monotonic()
    process = _spawn(
        [*command, "serve", "--config", str(config), "--port", str(port), "--workers", str(workers)]
    )
    group = Group([process], port)
    try:
        wait_http(f"http://127.0.0.1:{port}/_readyz", timeout_s=60)
    except RuntimeError:
        group.stop()
        raise
    startup = time.monotonic() - started
    if workers > 1:
        _wait_workers(port, workers)
    return group, startup


def _wait_workers(port: int, workers: int, timeout_s: float = 60.0) -> None:
    """Until every worker has answered /_readyz (one new connection per ask)."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(seen) < workers and time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, KeyError):
            url = f"http://127.0.0.1:{port}/_readyz"
            with urllib.request.urlopen(url, timeout=2) as response:
                seen.add(int(json.loads(response.read())["worker"]))
        time.sleep(0.02)
    if len(seen) < workers:
        raise RuntimeError(f"only workers {sorted(seen)} of {workers} answered")


def start_bare(svc: Services, processes: int) -> Group:
    port = free_port()
    argv = [sys.executable, "-m", "bench.bare_proxy", "--port", str(port)]
    argv += ["--upstream", f"http://127.0.0.1:{svc.upstream_port}", "--reuse-port"]
    group = Group([_spawn(argv) for _ in range(processes)], port)
    wait_http(f"http://127.0.0.1:{port}/ping")
    time.sleep(0.3 * processes)
    return group


class PeakRss:
    """Samples a group's RSS every 0.2 s while in use; ``peak`` is the largest seen."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self.group.rss())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Settings:
    reps: int
    workers: int
    duration_s: float
    load_duration_s: float
    warmup_s: float
    connections: int
    open_connections: int
    client_procs: int
    generator: str
    audit_store: str
    scaling: bool
    loads: list[float]
    decision_cache: str = "on"
    cache_key_exclude: tuple[str, ...] = ("signature.created",)
    policy_engine: str = "opa"


def _unsigned(port: int, path: str) -> list[bytes]:
    return [f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()]


def _signed(svc: Services, port: int, count: int) -> list[bytes]:
    return signed.raw_requests(port=port, path=FULL_PATH, token=svc.token, count=count)


def _signer(svc: Services, port: int, fixed: int = 0) -> Callable[[int], list[bytes]]:
    """Makes ``fixed`` (or as many as asked) freshly signed requests for ``port``."""

    def make(count: int) -> list[bytes]:
        return _signed(svc, port, fixed or count)

    return make


def _constant(requests: list[bytes]) -> Callable[[int], list[bytes]]:
    return lambda _count: requests


def closed(
    settings: Settings,
    group: Group,
    requests: Callable[[int], list[bytes]],
    *,
    svc: Services,
    expected_rps: float,
    signed_wrk: bool,
) -> dict[str, Any]:
    """One max-throughput run of ``group``; CPU µs per request of it and of the services."""
    before = {"proxy": group.cpu()} | {n: cpu_seconds(p) for n, p in svc.others.items()}
    count = int(max(2000.0, expected_rps * settings.duration_s * 1.5))
    if settings.generator == "wrk":
        url = f"http://127.0.0.1:{group.port}{FULL_PATH if signed_wrk else NOAUTH_PATH}"
        script: tuple[Path, Path] | None = None
        if signed_wrk:
            script = signed.write_requests(
                svc.workdir, port=group.port, path=FULL_PATH, token=svc.token, count=count
            )
        result = run_wrk(
            url,
            duration_s=int(settings.duration_s),
            connections=settings.connections,
            script=script[0] if script else None,
            script_args=[str(script[1])] if script else (),
        )
        row: dict[str, Any] = {
            "rps": result.rps,
            "p50_ms": result.p50_ms,
            "p99_ms": result.p99_ms,
            "errors": result.errors,
            "requests": result.requests,
            "client_cpu_us": None,
        }
    else:
        run = loadgen.closed_loop(
            group.port,
            requests(count),
            connections=settings.connections,
            duration_s=settings.duration_s,
            processes=settings.client_procs,
        )
        row = {
            "rps": round(run.rps, 1),
            "p50_ms": round(loadgen.percentile(run.latencies_ms, 50), 3),
            "p99_ms": round(loadgen.percentile(run.latencies_ms, 99), 3),
            "errors": run.errors,
            "requests": run.completed,
            "client_cpu_us": round(run.client_cpu_s / max(run.completed, 1) * 1e6, 1),
        }
    after = {"proxy": group.cpu()} | {n: cpu_seconds(p) for n, p in svc.others.items()}
    done = max(int(row["requests"]), 1)
    row["cpu_us_per_request"] = {
        name: round((after[name] - before[name]) / done * 1e6, 1) for name in before
    }
    return row


def opened(settings: Settings, port: int, requests: list[bytes], rate: float) -> dict[str, Any]:
    run = loadgen.open_loop(
        port,
        requests,
        rate=rate,
        duration_s=settings.load_duration_s,
        warmup_s=settings.warmup_s,
        connections=settings.open_connections,
        processes=settings.client_procs,
    )
    return {
        "achieved_rps": round(run.rps, 1),
        "p50_ms": round(loadgen.percentile(run.latencies_ms, 50), 3),
        "p99_ms": round(loadgen.percentile(run.latencies_ms, 99), 3),
        "errors": run.errors,
        "requests": run.completed,
    }


def stage_profile(settings: Settings, svc: Services) -> dict[str, float]:
    """CPU µs per request of each pipeline stage, one request at a time (bench.stages)."""
    out = svc.workdir / f"stages-{time.monotonic_ns()}.json"
    config = write_config(svc, f"stages-{time.monotonic_ns()}")
    argv0 = [sys.executable, "-m", "bench.stages", str(out)]
    os.environ["BENCH_STAGE_SKIP"] = str(STAGE_WARMUP)
    group, _ = start_gateway(config, 1, argv0)
    try:
        port = group.port
        loadgen.open_loop(
            port, _signed(svc, port, STAGE_WARMUP), rate=200, duration_s=1, warmup_s=0
        )
        before = group.cpu()
        run = loadgen.closed_loop(
            port, _signed(svc, port, int(1500 * settings.duration_s)), connections=1,
            duration_s=settings.duration_s,
        )  # fmt: skip
        process_cpu = group.cpu() - before
    finally:
        group.stop()
    totals: dict[str, list[float]] = json.loads(out.read_text())
    done = max(run.completed, 1)
    stages = {name: round(cpu / done * 1e6, 1) for name, (cpu, _) in totals.items()}
    stages["outside_stages"] = round(process_cpu / done * 1e6 - sum(stages.values()), 1)
    stages["total"] = round(process_cpu / done * 1e6, 1)
    stages["requests"] = run.completed
    stages["errors"] = run.errors
    return stages


def _med(rows: list[dict[str, Any]], key: str) -> float:
    return round(median([float(r[key]) for r in rows]), 3)


def _med_or_none(rows: list[dict[str, Any]], key: str) -> float | None:
    """The median, or None (JSON null) when no row has the figure (wrk: no client CPU)."""
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    return round(median(values), 3) if values else None


def _med_nested(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
    return {name: round(median([r[key][name] for r in rows]), 1) for name in rows[0][key]}


def scaling_runs(settings: Settings, svc: Services, raw: list[Any]) -> dict[str, Any]:
    """Max throughput of bare and gateway with 1 and 2 (or --workers) processes.

    All four stacks are up together and each repetition runs them back to back
    (bare 1, bare N, gateway 1, gateway N), so a change in the machine's load
    hits both process counts; the scaling factors are medians of per-repetition
    ratios.
    """
    counts = sorted({1, settings.workers if settings.workers > 1 else 2})
    low, high = counts
    print(f"bench: scaling over {counts} processes ...", file=sys.stderr)
    stacks: dict[int, tuple[Group, Group]] = {}
    try:
        for count in counts:
            gateway, _ = start_gateway(write_config(svc, f"scale-{count}"), count)
            stacks[count] = (gateway, start_bare(svc, count))
        for _ in range(settings.reps):
            row: dict[str, dict[str, Any]] = {str(c): {} for c in counts}
            for count in counts:
                gateway, bare = stacks[count]
                row[str(count)]["bare"] = closed(
                    settings, bare, _signer(svc, gateway.port, 2000),
                    svc=svc, expected_rps=0, signed_wrk=True,
                )  # fmt: skip
            for count in counts:
                gateway, _ = stacks[count]
                row[str(count)]["gateway"] = closed(
                    settings, gateway, _signer(svc, gateway.port),
                    svc=svc, expected_rps=row[str(count)]["bare"]["rps"], signed_wrk=True,
                )  # fmt: skip
            raw.append(row)
    finally:
        for gateway, bare in stacks.values():
            gateway.stop()
            bare.stop()

    def rps(count: int, target: str) -> float:
        return _med([r[str(count)][target] for r in raw], "rps")

    def factor(target: str) -> float:
        ratios = [r[str(high)][target]["rps"] / r[str(low)][target]["rps"] for r in raw]
        return round(median(ratios), 3)

    return {
        "processes": counts,
        "bare_rps": {str(c): rps(c, "bare") for c in counts},
        "gateway_rps": {str(c): rps(c, "gateway") for c in counts},
        "bare_scaling": factor("bare"),
        "gateway_scaling": factor("gateway"),
        "errors": sum(r[str(c)][t]["errors"] for r in raw for c in counts for t in r[str(c)]),
    }


def _no_nan(value: Any) -> Any:
    """``value`` with NaN (a percentile of nothing) as None: the file stays valid JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


def _closed_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "rps": _med(rows, "rps"),
        "p50_ms": _med(rows, "p50_ms"),
        "p99_ms": _med(rows, "p99_ms"),
        "errors": sum(r["errors"] for r in rows),
        "client_cpu_us": _med_or_none(rows, "client_cpu_us"),
        "cpu_us_per_request": _med_nested(rows, "cpu_us_per_request"),
    }


def run(settings: Settings, out: Path) -> dict[str, Any]:
    load_start = os.getloadavg()
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_start": [round(v, 2) for v in load_start],
        },
        "settings": settings.__dict__,
    }
    raw: dict[str, Any] = {"max": [], "latency": [], "stages": [], "scaling": []}
    with (
        tempfile.TemporaryDirectory(prefix="nops-bench-") as tmp,
        services(Path(tmp), settings) as svc,
    ):
        workers = settings.workers
        # 0. the durability floor of the audit store's disk (and PostgreSQL), idle.
        print("bench: durability floor (fsync, PostgreSQL commit) ...", file=sys.stderr)
        floor = fsync_probe.probe(svc.workdir, svc.pg_dsn or None)
        config = write_config(svc, f"main-{workers}")
        # 1. start-up, reps times; the last gateway stays up.
        startups: list[float] = []
        gateway: Group | None = None
        for rep in range(settings.reps):
            gateway, startup = start_gateway(config, workers)
            startups.append(round(startup, 3))
            if rep < settings.reps - 1:
                gateway.stop()
        assert gateway is not None
        bare = start_bare(svc, workers)
        time.sleep(1.0)
        idle_rss = gateway.rss()
        # 2. max throughput, alternating targets.
        print(f"bench: max throughput, {settings.reps} x 3 targets ...", file=sys.stderr)
        with PeakRss(gateway) as peak:
            for _ in range(settings.reps):
                row: dict[str, Any] = {}
                row["bare"] = closed(
                    settings, bare, _signer(svc, gateway.port, 2000),
                    svc=svc, expected_rps=0, signed_wrk=True,
                )  # fmt: skip
                row["gateway_noauth"] = closed(
                    settings, gateway, _constant(_unsigned(gateway.port, NOAUTH_PATH)),
                    svc=svc, expected_rps=0, signed_wrk=False,
                )  # fmt: skip
                row["gateway"] = closed(
                    settings, gateway, _signer(svc, gateway.port),
                    svc=svc, expected_rps=row["bare"]["rps"], signed_wrk=True,
                )  # fmt: skip
                raw["max"].append(row)
        loaded_rss = peak.peak
        targets = ("bare", "gateway_noauth", "gateway")
        maxima: dict[str, Any] = {
            name: _closed_summary([r[name] for r in raw["max"]]) for name in targets
        }
        maxima["ratio_gateway_bare"] = round(maxima["gateway"]["rps"] / maxima["bare"]["rps"], 3)
        maxima["ratio_noauth_bare"] = round(
            maxima["gateway_noauth"]["rps"] / maxima["bare"]["rps"], 3
        )
        results["max_throughput"] = maxima
        # 3. latency at fixed offered loads.
        saturation = maxima["gateway"]["rps"]
        loads = sorted({*settings.loads, round(0.7 * saturation)})
        print(f"bench: latency at {loads} req/s ...", file=sys.stderr)
        latency = []
        for rate in loads:
            reps = []
            for _ in range(settings.reps):
                count = int(rate * (settings.load_duration_s + settings.warmup_s)) + 100
                requests = _signed(svc, gateway.port, count)
                bare_row = opened(settings, bare.port, requests, rate)
                gateway_row = opened(settings, gateway.port, requests, rate)
                reps.append({"bare": bare_row, "gateway": gateway_row})
            raw["latency"].append({"offered_rps": rate, "reps": reps})
            entry: dict[str, Any] = {"offered_rps": rate, "above_saturation": rate > saturation}
            for name in ("bare", "gateway"):
                rows = [r[name] for r in reps]
                entry[name] = {
                    key: _med(rows, key) for key in ("achieved_rps", "p50_ms", "p99_ms")
                } | {"errors": sum(r["errors"] for r in rows)}
            for q in ("p50", "p99"):
                entry[f"added_{q}_ms"] = round(
                    median([r["gateway"][f"{q}_ms"] - r["bare"][f"{q}_ms"] for r in reps]), 3
                )
            latency.append(entry)
        results["latency"] = latency
        gateway.stop()
        bare.stop()
        # The floor again, after the load (the disk's latency drifts with the machine's).
        floor["after_load"] = fsync_probe.probe(svc.workdir, svc.pg_dsn or None)
        floor["store"] = settings.audit_store
        results["durability_floor"] = floor
        # 4. per-stage CPU.
        print("bench: per-stage CPU ...", file=sys.stderr)
        for _ in range(settings.reps):
            raw["stages"].append(stage_profile(settings, svc))
        results["stages_cpu_us"] = {
            name: round(median([r[name] for r in raw["stages"]]), 1) for name in raw["stages"][0]
        }
        results["rss_mb"] = {
            "gateway_idle": round(idle_rss, 1),
            "gateway_loaded_peak": round(loaded_rss, 1),
            "processes": workers + (1 if workers > 1 else 0),
        }
        results["startup_s"] = round(median(startups), 3)
        results["startup_s_runs"] = startups
        # 6. scaling 1 -> 2 processes.
        if settings.scaling:
            results["scaling"] = scaling_runs(settings, svc, raw["scaling"])
    results["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    results["runs"] = raw
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_no_nan(results), indent=2, allow_nan=False) + "\n")
    return results


def report(results: dict[str, Any]) -> None:
    s = results["settings"]
    m = results["max_throughput"]
    print(
        f"NOPS gateway vs bare aiohttp proxy: {s['workers']} process(es) each, generator "
        f"{s['generator']}, audit store {s['audit_store']}, policy engine "
        f"{s.get('policy_engine', 'opa')}, decision cache "
        f"{s['decision_cache']} (key without {','.join(s['cache_key_exclude']) or '-'}), "
        f"medians of {s['reps']} rep(s); "
        f"load average {results['machine']['loadavg_start'][0]} -> "
        f"{results['machine']['loadavg_end'][0]} on {results['machine']['cpus']} CPUs"
    )
    print(
        f"\n{'max throughput':16} {'req/s':>8} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7}  CPU µs/req"
    )
    for name in ("bare", "gateway_noauth", "gateway"):
        row = m[name]
        ratio = row["rps"] / m["bare"]["rps"]
        cpu = ", ".join(f"{k} {v:.0f}" for k, v in row["cpu_us_per_request"].items())
        print(
            f"{name:16} {row['rps']:8.0f} {ratio:6.2f} {row['p50_ms']:7.2f} {row['p99_ms']:7.2f}"
            f"  {cpu}; errors {row['errors']}"
        )
    print(f"gateway (full pipeline) / bare = {m['ratio_gateway_bare']:.2f}")
    print(f"\n{'offered req/s':>13} {'bare p50':>9} {'p99':>7} {'gw p50':>8} {'p99':>7}"
          f" {'added p50':>10} {'added p99':>10}  (ms, open loop)")  # fmt: skip
    for entry in results["latency"]:
        b, g = entry["bare"], entry["gateway"]
        note = "  above saturation" if entry["above_saturation"] else ""
        print(
            f"{entry['offered_rps']:13.0f} {b['p50_ms']:9.2f} {b['p99_ms']:7.2f} "
            f"{g['p50_ms']:8.2f} {g['p99_ms']:7.2f} {entry['added_p50_ms']:10.2f} "
            f"{entry['added_p99_ms']:10.2f}{note}; errors {b['errors']}/{g['errors']}"
        )
    floor = results.get("durability_floor")
    if floor:
        key = "postgres_commit" if floor["store"] == "postgres" else "file_fsync"
        what = "PostgreSQL commit" if key == "postgres_commit" else "file append + fsync"
        print(
            f"durability floor: one {what} (the audit store's durable write) on this disk, "
            f"p50 {floor[key]['p50_ms']:.2f} / p99 {floor[key]['p99_ms']:.2f} ms before the "
            f"runs, p50 {floor['after_load'][key]['p50_ms']:.2f} / p99 "
            f"{floor['after_load'][key]['p99_ms']:.2f} ms after; every request waits for "
            "one, under load up to two"
        )
        print("  " + fsync_probe.describe(floor).replace("\n", "\n  "))
    stages = results["stages_cpu_us"]
    parts = ", ".join(
        f"{k} {v:.0f}" for k, v in stages.items() if k not in ("total", "requests", "errors")
    )
    print(f"\nCPU µs per request by stage (one at a time): {parts}; total {stages['total']:.0f}")
    rss = results["rss_mb"]
    print(
        f"RSS of the gateway's {rss['processes']} process(es): idle {rss['gateway_idle']:.0f} MB, "
        f"peak under load {rss['gateway_loaded_peak']:.0f} MB; start-up to /_readyz "
        f"{results['startup_s']:.2f} s (runs {results['startup_s_runs']})"
    )
    if "scaling" in results:
        sc = results["scaling"]
        print(
            "scaling, max req/s by processes: bare "
            + ", ".join(f"{k}: {v:.0f}" for k, v in sc["bare_rps"].items())
            + f" (x{sc['bare_scaling']:.2f}); gateway "
            + ", ".join(f"{k}: {v:.0f}" for k, v in sc["gateway_rps"].items())
            + f" (x{sc['gateway_scaling']:.2f})"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions (medians are reported)")
    parser.add_argument("--quick", action="store_true", help="1 repetition, shorter runs")
    parser.add_argument(
        "--workers", type=int, default=1, help="processes of gateway and bare proxy"
    )
    parser.add_argument(
        "--duration", type=float, default=5.0, help="seconds per max-throughput run"
    )
    parser.add_argument(
        "--load-duration", type=float, default=5.0, help="measured s per fixed load"
    )
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured s before each load")
    parser.add_argument("--connections", type=int, default=32, help="closed-loop connections")
    parser.add_argument("--open-connections", type=int, default=64, help="open-loop connections")
    parser.add_argument("--client-procs", type=int, default=1, help="load generator processes")
    parser.add_argument(
        "--loads", default="100,1000", help="fixed offered loads, req/s (+70%% of saturation)"
    )
    parser.add_argument("--generator", choices=("auto", "python", "wrk"), default="auto")
    parser.add_argument("--audit-store", choices=("postgres", "file"), default="postgres")
    parser.add_argument("--no-scaling", action="store_true", help="skip the 1 -> 2 process runs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    parser.add_argument(
        "--decision-cache",
        choices=("on", "off"),
        default="on",
        help="the gateway's decision cache (policy.cache.enabled)",
    )
    parser.add_argument(
        "--cache-key-exclude",
        default="signature.created",
        help="comma-separated input paths left out of the cache key (and of the policy input)",
    )
    parser.add_argument(
        "--policy-engine",
        choices=("opa", "embedded"),
        default="opa",
        help="the gateway's policy.engine: OPA over loopback, or in-process wasm",
    )
    args = parser.parse_args(argv)  # fmt: skip
    generator = args.generator
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "python"
    elif generator == "wrk" and not shutil.which("wrk"):
        parser.error("wrk is not on PATH (use --generator python)")
    quick = args.quick
    settings = Settings(
        reps=1 if quick else args.reps,
        workers=args.workers,
        duration_s=3.0 if quick else args.duration,
        load_duration_s=3.0 if quick else args.load_duration,
        warmup_s=0.5 if quick else args.warmup,
        connections=args.connections,
        open_connections=args.open_connections,
        client_procs=args.client_procs,
        generator=generator,
        audit_store=args.audit_store,
        scaling=not args.no_scaling,
        loads=[float(x) for x in args.loads.split(",") if x],
        decision_cache=args.decision_cache,
        cache_key_exclude=tuple(x for x in args.cache_key_exclude.split(",") if x),
        policy_engine=args.policy_engine,
    )
    results = run(settings, args.out)
    report(results)
    print(f"\nwritten to {args.out}")
    errors = results["max_throughput"]["gateway"]["errors"] + sum(
        e["gateway"]["errors"] for e in results["latency"] if not e["above_saturation"]
    )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
