"""The audit log's cost, in one run: both stores, then the gateway with audit on and off.

    python -m bench.audit [--duration 3] [--concurrency 1 16 128] [--dsn DSN]
                          [--dir .run/bench/audit] [--gateway-rounds 3] [--no-gateway]

1. Stores: appends/s and p50/p99 latency of ``AuditLog.append`` (which
   returns only once the record is durable) at each concurrency, for the file
   store (fsync per group commit, on the disk under ``--dir``, not a tmpfs)
   and for PostgreSQL (one transaction per group commit). Without ``--dsn`` a
   private PostgreSQL is started with ``fsync = on`` and ``synchronous_commit
   = on``, so both stores pay for real durability. Also: records per durable
   write (the group-commit factor), the process CPU per append (every
   thread, user and system) and the file/PostgreSQL throughput ratio.
2. Gateway: the same gateway config served twice, audit on (file store) and
   off, driven alternately by wrk (bench.harness); medians of the rounds and
   the on/off throughput ratio.

Results are printed and written to bench/results/audit.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from audit import AuditLog, Entry
from audit.setup import AuditSettings, open_audit_log
from bench.harness import ROOT, LoadResult, free_port, median, run_wrk, stack, wait_http

_ENTRY = Entry(
    outcome="allow",
    stage="audit",
    request_id="0" * 32,
    decision_id="00000000-0000-4000-8000-000000000000",
    tenant="acme",
    subject="svc-42",
    reasons=("allowed",),
    policy_revision="bench",
    input_digest="0" * 64,
)


async def _measure(log: AuditLog, concurrency: int, duration_s: float) -> dict[str, float]:
    latencies: list[float] = []
    deadline = time.monotonic() + duration_s

    async def worker() -> None:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            await log.append(_ENTRY)
            latencies.append(time.perf_counter() - started)

    syncs = log.store.syncs
    started = time.perf_counter()
    cpu = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu = time.process_time() - cpu
    elapsed = time.perf_counter() - started
    latencies.sort()
    writes = max(log.store.syncs - syncs, 1)
    return {
        "appends_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1e3, 3),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3, 3),
        "records_per_write": round(len(latencies) / writes, 1),
        # Process CPU (every thread, user + system) per durable append.
        "cpu_us_per_append": round(cpu / max(len(latencies), 1) * 1e6, 1),
        "appends": len(latencies),
    }


async def _store_run(
    store: str, directory: Path, dsn: str, concurrency: int, duration_s: float
) -> dict[str, float]:
    run_dir = directory / f"{store}-{concurrency}-{uuid.uuid4().hex[:8]}"
    settings = AuditSettings(
        store="postgres" if store == "postgres" else "file",
        path=run_dir / "audit.jsonl",
        spool_path=run_dir / "spool.jsonl",
        dsn=dsn,
        chain_id=f"bench-{uuid.uuid4().hex[:12]}",
    )
    log = await open_audit_log(settings)
    try:
        await _measure(log, concurrency, min(0.5, duration_s))  # warm-up
        return await _measure(log, concurrency, duration_s)
    finally:
        await log.close()
        shutil.rmtree(run_dir, ignore_errors=True)


def _durable_postgres(workdir: Path) -> Any:
    """A private PostgreSQL with fsync and synchronous commit on (the test one has them off)."""
    import asyncpg

    from tests.services import PostgresService

    service = PostgresService(workdir)
    service.start()

    async def configure() -> dict[str, str]:
        conn = await asyncpg.connect(service.dsn)
        try:
            for setting in ("fsync", "synchronous_commit", "full_page_writes"):
                await conn.execute(f"ALTER SYSTEM SET {setting} = on")
            await conn.execute("SELECT pg_reload_conf()")
            await asyncio.sleep(0.5)
            return {
                name: await conn.fetchval(f"SHOW {name}")
                for name in ("fsync", "synchronous_commit", "full_page_writes")
            }
        finally:
            await conn.close()

    settings = asyncio.run(configure())
    if set(settings.values()) != {"on"}:
        service.close()
        sys.exit(f"bench: could not make PostgreSQL durable: {settings}")
    return service


def _stores(args: argparse.Namespace) -> dict[str, Any]:
    directory: Path = args.dir
    directory.mkdir(parents=True, exist_ok=True)
    service = None
    dsn = args.dsn
    pg_dir = tempfile.mkdtemp(prefix="bench-audit-pg-")
    try:
        if not dsn:
            service = _durable_postgres(Path(pg_dir))
            dsn = service.dsn
        results: dict[str, dict[str, Any]] = {"file": {}, "postgres": {}}
        for store in results:
            for concurrency in args.concurrency:
                results[store][str(concurrency)] = asyncio.run(
                    _store_run(store, directory, dsn, concurrency, args.duration)
                )
    finally:
        if service is not None:
            service.close()
        shutil.rmtree(pg_dir, ignore_errors=True)
    ratios = {
        c: round(
            results["file"][c]["appends_per_s"]
            / max(results["postgres"][c]["appends_per_s"], 1e-9),
            2,
        )
        for c in results["file"]
    }
    return {"stores": results, "file_vs_postgres_throughput": ratios}


def _gateway_config(path: Path, opa_port: int, upstream_port: int, audit: Path | None) -> None:
    audit_section = (
        f'[audit]\npath = "{audit / "audit.jsonl"}"\nspool_path = "{audit / "spool.jsonl"}"\n'
        if audit is not None
        else "[audit]\nenabled = false\n"
    )
    path.write_text(
        f"""version = 1
[server]
host = "127.0.0.1"
[policy]
url = "http://127.0.0.1:{opa_port}"
[logging]
level = "WARNING"
access_log = false
[ratelimit]
# Never refuses: the bench measures the audit log, not 429s.
anonymous = "1000000000/minute"
{audit_section}
[[routes]]
name = "echo"
prefix = "/echo/"
upstream = "http://127.0.0.1:{upstream_port}"
auth = "none"
require_signature = false
"""
    )


def _gateway(args: argparse.Namespace) -> dict[str, Any]:
    path = "/echo/bench/ping"
    ports = {name: free_port() for name in ("opa", "upstream", "on", "off")}
    audit_dir = args.dir / f"gateway-{uuid.uuid4().hex[:8]}"
    runs: dict[str, list[LoadResult]] = {"audit_on": [], "audit_off": []}
    with stack() as procs, tempfile.TemporaryDirectory() as tmp:
        opa = procs.opa(ports["opa"], "policies/rego")
        upstream = procs.spawn(
            [sys.executable, "-m", "gateway.echo", "--port", str(ports["upstream"])]
        )
        wait_http(f"http://127.0.0.1:{ports['opa']}/health")
        wait_http(f"http://127.0.0.1:{ports['upstream']}{path}")
        gateways = {}
        for name, audit in (("audit_on", audit_dir), ("audit_off", None)):
            config = Path(tmp) / f"{name}.toml"
            _gateway_config(config, ports["opa"], ports["upstream"], audit)
            port = ports["on" if audit else "off"]
            gateways[name] = (
                port,
                procs.spawn(
                    [
                        sys.executable,
                        *("-m", "gateway", "serve", "--config", str(config)),
                        *("--port", str(port)),
                    ]
                ),
            )
            wait_http(f"http://127.0.0.1:{port}/health")
        for round_ in range(args.gateway_rounds):
            # Alternate which configuration goes first, so neither always runs warm.
            order = list(gateways.items())
            for name, (port, process) in order if round_ % 2 == 0 else order[::-1]:
                runs[name].append(
                    run_wrk(
                        f"http://127.0.0.1:{port}{path}",
                        duration_s=args.gateway_duration,
                        connections=args.connections,
                        watch={"gateway": process.pid, "opa": opa.pid, "upstream": upstream.pid},
                    )
                )
    shutil.rmtree(audit_dir, ignore_errors=True)
    out: dict[str, Any] = {
        name: {
            "rps": round(median([r.rps for r in results]), 1),
            "p50_ms": round(median([r.p50_ms for r in results]), 3),
            "p99_ms": round(median([r.p99_ms for r in results]), 3),
            "gateway_cpu_us_per_request": round(
                median([r.cpu_us_per_request["gateway"] for r in results]), 1
            ),
            "errors": sum(r.errors for r in results),
        }
        for name, results in runs.items()
    }
    out["throughput_ratio_on_vs_off"] = round(
        out["audit_on"]["rps"] / max(out["audit_off"]["rps"], 1e-9), 3
    )
    out["added_p99_ms"] = round(out["audit_on"]["p99_ms"] - out["audit_off"]["p99_ms"], 3)
    out["added_cpu_us_per_request"] = round(
        out["audit_on"]["gateway_cpu_us_per_request"]
        - out["audit_off"]["gateway_cpu_us_per_request"],
        1,
    )
    out.update(
        rounds=args.gateway_rounds, duration_s=args.gateway_duration, connections=args.connections
    )
    return out


def _print(summary: dict[str, Any]) -> None:
    print(
        f"{'store':10} {'conc':>5} {'appends/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'rec/write':>10}"
        f" {'CPU µs':>7}"
    )
    for store, rows in summary["stores"].items():
        for concurrency, row in rows.items():
            print(
                f"{store:10} {concurrency:>5} {row['appends_per_s']:11.0f} {row['p50_ms']:8.2f} "
                f"{row['p99_ms']:8.2f} {row['records_per_write']:10.1f} "
                f"{row['cpu_us_per_append']:7.0f}"
            )
    ratios = ", ".join(f"c={c}: {r:.2f}" for c, r in summary["file_vs_postgres_throughput"].items())
    print(f"file/PostgreSQL throughput ratio: {ratios}")
    gateway = summary.get("gateway")
    if gateway:
        for name in ("audit_on", "audit_off"):
            row = gateway[name]
            print(
                f"gateway {name:9} {row['rps']:9.0f} req/s  p50 {row['p50_ms']:.2f} ms  "
                f"p99 {row['p99_ms']:.2f} ms  {row['gateway_cpu_us_per_request']:.0f} CPU µs/req"
            )
        print(
            f"gateway audit on/off throughput ratio {gateway['throughput_ratio_on_vs_off']:.3f}; "
            f"added p99 {gateway['added_p99_ms']:.2f} ms; "
            f"added CPU {gateway['added_cpu_us_per_request']:.0f} µs/request "
            f"(medians of {gateway['rounds']} rounds, {gateway['connections']} connections)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.audit")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per store run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--dsn", default="", help="a PostgreSQL to use (default: a private one)")
    parser.add_argument("--dir", type=Path, default=ROOT / ".run" / "bench" / "audit")
    parser.add_argument("--no-gateway", dest="gateway", action="store_false")
    parser.add_argument("--gateway-rounds", type=int, default=3)
    parser.add_argument("--gateway-duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "audit.json")
    args = parser.parse_args(argv)
    summary = _stores(args)
    if args.gateway:
        summary["gateway"] = _gateway(args)
    summary["duration_s"] = args.duration
    _print(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    errors = summary.get("gateway", {})
    return 1 if any(errors.get(n, {}).get("errors") for n in ("audit_on", "audit_off")) else 0


if __name__ == "__main__":
    sys.exit(main())
