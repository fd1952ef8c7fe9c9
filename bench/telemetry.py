"""What metrics and tracing cost: one gateway with telemetry off, metrics on, both on.

    python -m bench.telemetry [--duration 5] [--rounds 3] [--connections 32]

Starts a real upstream (gateway.echo), a real OPA and four ``gateway serve``
processes that differ only in ``[metrics]`` and ``[tracing]`` (the traced
ones export over OTLP/HTTP to the echo upstream, which answers 200: the
exporter's encoding and sending count in the gateway's CPU; one samples
every trace, one 10 %). Drives them alternately with the same wrk
settings and prints medians: start-up seconds, idle RSS, throughput, p99 and
the gateway process's CPU µs per request, each also as a ratio to "off".
Results also go to bench/results/telemetry.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import ROOT, LoadResult, free_port, median, rss_mb, run_wrk, stack, wait_http

PATH = "/echo/bench/ping"
_METRICS = "[metrics]\nenabled = true\nport = 0\n"
_TRACING = '[tracing]\nexporter = "otlp"\nendpoint = "{sink}"\nsample_ratio = {ratio}\n'
#: Extra config per variant; {sink} is an OTLP/HTTP endpoint (the echo upstream answers 200).
VARIANTS: dict[str, str] = {
    "off": "",
    "metrics": _METRICS,
    "metrics_tracing": _METRICS + _TRACING.replace("{ratio}", "1.0"),
    "metrics_tracing_10pct": _METRICS + _TRACING.replace("{ratio}", "0.1"),
}


def _config(path: Path, opa_port: int, upstream_port: int, extra: str) -> None:
    path.write_text(
        f"""version = 1
[server]
host = "127.0.0.1"
[policy]
url = "http://127.0.0.1:{opa_port}"
[ratelimit]
anonymous = "1000000000/minute"
[[routes]]
name = "echo"
prefix = "/echo/"
upstream = "http://127.0.0.1:{upstream_port}"
auth = "none"
require_signature = false
{extra}"""
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.telemetry")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "telemetry.json")
    args = parser.parse_args(argv)

    opa_port, upstream_port = free_port(), free_port()
    ports = {name: free_port() for name in VARIANTS}
    startup: dict[str, float] = {}
    idle_rss: dict[str, float] = {}
    runs: dict[str, list[LoadResult]] = {name: [] for name in VARIANTS}
    with stack() as procs, tempfile.TemporaryDirectory() as tmp:
        procs.opa(opa_port, "policies/rego")
        upstream = procs.spawn([sys.executable, "-m", "gateway.echo", "--port", str(upstream_port)])
        wait_http(f"http://127.0.0.1:{opa_port}/health")
        wait_http(f"http://127.0.0.1:{upstream_port}{PATH}")
        pids: dict[str, int] = {}
        for name, extra in VARIANTS.items():
            config = Path(tmp) / f"{name}.toml"
            sink = f"http://127.0.0.1:{upstream_port}/v1/traces"
            _config(config, opa_port, upstream_port, extra.replace("{sink}", sink))
            audit = Path(tmp) / name
            process = procs.spawn(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "serve",
                    "--config",
                    str(config),
                    "--port",
                    str(ports[name]),
                ],
                env={
                    "NOPS_GATEWAY__AUDIT__PATH": str(audit / "audit.jsonl"),
                    "NOPS_GATEWAY__AUDIT__SPOOL_PATH": str(audit / "spool.jsonl"),
                },
            )
            startup[name] = wait_http(f"http://127.0.0.1:{ports[name]}/health")
            idle_rss[name] = rss_mb(process.pid)
            pids[name] = process.pid
        for _ in range(args.rounds):
            for name in VARIANTS:
                runs[name].append(
                    run_wrk(
                        f"http://127.0.0.1:{ports[name]}{PATH}",
                        duration_s=args.duration,
                        connections=args.connections,
                        watch={"proxy": pids[name], "upstream": upstream.pid},
                    )
                )

    summary: dict[str, Any] = {"rounds": args.rounds, "duration_s": args.duration}
    base_rps = median([r.rps for r in runs["off"]])
    base_cpu = median([r.cpu_us_per_request["proxy"] for r in runs["off"]])
    for name in VARIANTS:
        rps = median([r.rps for r in runs[name]])
        cpu = median([r.cpu_us_per_request["proxy"] for r in runs[name]])
        summary[name] = {
            "startup_s": round(startup[name], 3),
            "rss_idle_mb": round(idle_rss[name], 1),
            "rps": round(rps),
            "rps_ratio_to_off": round(rps / base_rps, 3),
            "p99_ms": round(median([r.p99_ms for r in runs[name]]), 2),
            "cpu_us_per_request": round(cpu, 1),
            "cpu_ratio_to_off": round(cpu / base_cpu, 3),
            "errors": sum(r.errors for r in runs[name]),
        }
    print(json.dumps(summary, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
