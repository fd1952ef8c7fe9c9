"""The gateway's full pipeline against a bare aiohttp proxy, in one run.

    python -m bench.pipeline [--duration 8] [--rounds 3] [--connections 32]

Starts a real upstream (gateway.echo), a real OPA, the bare proxy
(bench.bare_proxy) and the gateway (``gateway serve``), then drives bare
proxy and gateway alternately with the same wrk settings, ``--rounds``
times, and prints medians: throughput and its ratio, latency p50/p99 and
what the gateway adds, and CPU µs per request of each process (the number
that the machine's noise moves least). Results also go to
bench/results/pipeline.json.
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


def _config(path: Path, opa_port: int, upstream_port: int) -> None:
    path.write_text(
        f"""version = 1
[server]
host = "127.0.0.1"
[policy]
url = "http://127.0.0.1:{opa_port}"
[logging]
level = "INFO"
[[routes]]
name = "echo"
prefix = "/echo/"
upstream = "http://127.0.0.1:{upstream_port}"
auth = "none"
require_signature = false
"""
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline")
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pipeline.json")
    args = parser.parse_args(argv)

    ports = {name: free_port() for name in ("opa", "upstream", "bare", "gateway")}
    with stack() as procs, tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "gateway.toml"
        _config(config, ports["opa"], ports["upstream"])
        opa = procs.opa(ports["opa"], "policies/rego")
        upstream = procs.spawn(
            [sys.executable, "-m", "gateway.echo", "--port", str(ports["upstream"])]
        )
        bare = procs.spawn(
            [
                sys.executable,
                "-m",
                "bench.bare_proxy",
                "--port",
                str(ports["bare"]),
                "--upstream",
                f"http://127.0.0.1:{ports['upstream']}",
            ]
        )
        wait_http(f"http://127.0.0.1:{ports['opa']}/health")
        wait_http(f"http://127.0.0.1:{ports['upstream']}{PATH}")
        gateway = procs.spawn(
            [
                sys.executable,
                "-m",
                "gateway",
                "serve",
                "--config",
                str(config),
                "--port",
                str(ports["gateway"]),
            ]
        )
        startup_s = wait_http(f"http://127.0.0.1:{ports['gateway']}/health")
        wait_http(f"http://127.0.0.1:{ports['bare']}{PATH}")
        idle_rss = rss_mb(gateway.pid)

        runs: dict[str, list[LoadResult]] = {"bare": [], "gateway": []}
        for _ in range(args.rounds):
            runs["bare"].append(
                run_wrk(
                    f"http://127.0.0.1:{ports['bare']}{PATH}",
                    duration_s=args.duration,
                    connections=args.connections,
                    watch={"proxy": bare.pid, "upstream": upstream.pid},
                )
            )
            runs["gateway"].append(
                run_wrk(
                    f"http://127.0.0.1:{ports['gateway']}{PATH}",
                    duration_s=args.duration,
                    connections=args.connections,
                    watch={"proxy": gateway.pid, "opa": opa.pid, "upstream": upstream.pid},
                )
            )
        loaded_rss = rss_mb(gateway.pid)

    summary = _summarise(runs)
    summary.update(
        {
            "gateway_startup_s": round(startup_s, 3),
            "gateway_rss_idle_mb": round(idle_rss, 1),
            "gateway_rss_loaded_mb": round(loaded_rss, 1),
            "rounds": args.rounds,
            "duration_s": args.duration,
            "connections": args.connections,
        }
    )
    _print(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if summary["errors"] else 0


def _summarise(runs: dict[str, list[LoadResult]]) -> dict[str, Any]:
    def med(name: str, attr: str) -> float:
        return round(median([getattr(r, attr) for r in runs[name]]), 3)

    def cpu(name: str, process: str) -> float:
        return round(median([r.cpu_us_per_request[process] for r in runs[name]]), 1)

    out: dict[str, Any] = {
        name: {
            "rps": med(name, "rps"),
            "p50_ms": med(name, "p50_ms"),
            "p99_ms": med(name, "p99_ms"),
            "cpu_us_per_request": {p: cpu(name, p) for p in runs[name][0].cpu_us_per_request},
        }
        for name in runs
    }
    out["throughput_ratio"] = round(out["gateway"]["rps"] / out["bare"]["rps"], 3)
    out["added_p50_ms"] = round(out["gateway"]["p50_ms"] - out["bare"]["p50_ms"], 3)
    out["added_p99_ms"] = round(out["gateway"]["p99_ms"] - out["bare"]["p99_ms"], 3)
    out["added_cpu_us_per_request"] = round(
        out["gateway"]["cpu_us_per_request"]["proxy"] - out["bare"]["cpu_us_per_request"]["proxy"],
        1,
    )
    out["errors"] = sum(r.errors for rs in runs.values() for r in rs)
    return out


def _print(summary: dict[str, Any]) -> None:
    print(f"{'':10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}   CPU µs/request")
    for name in ("bare", "gateway"):
        row = summary[name]
        cpu = ", ".join(f"{k} {v}" for k, v in row["cpu_us_per_request"].items())
        print(f"{name:10} {row['rps']:9.0f} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f}   {cpu}")
    print(
        f"gateway/bare throughput ratio {summary['throughput_ratio']:.2f}; "
        f"added p50 {summary['added_p50_ms']:.2f} ms, p99 {summary['added_p99_ms']:.2f} ms; "
        f"added proxy CPU {summary['added_cpu_us_per_request']:.0f} µs/request"
    )
    print(
        f"gateway start-up {summary['gateway_startup_s']:.2f} s, "
        f"RSS idle {summary['gateway_rss_idle_mb']:.0f} MB, "
        f"loaded {summary['gateway_rss_loaded_mb']:.0f} MB; "
        f"errors {summary['errors']} (medians of {summary['rounds']} rounds)"
    )


if __name__ == "__main__":
    sys.exit(main())
