"""The gateway's full pipeline against a bare aiohttp proxy, with wrk only.

Superseded by ``python -m bench.run`` (``make bench``), which needs no wrk and
also measures latency at fixed loads, stage CPU and scaling; kept for
comparing with earlier wrk-only figures.

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

from bench import signed
from bench.harness import ROOT, LoadResult, free_port, median, rss_mb, run_wrk, stack, wait_http

PATH = "/echo/bench/ping"
#: The same upstream behind all four authentication stages.
SIGNED_PATH = "/locked/bench/ping"
TARGETS = ("bare", "gateway", "gateway_auth")


def _config(path: Path, opa_port: int, upstream_port: int, identity: str) -> None:
    upstream = f"http://127.0.0.1:{upstream_port}"
    path.write_text(
        f"""version = 1
[server]
host = "127.0.0.1"
[policy]
url = "http://127.0.0.1:{opa_port}"
[logging]
level = "INFO"
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
{identity}"""
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
        workdir = Path(tmp)
        jwks, token = signed.identity_files(workdir)
        config = workdir / "gateway.toml"
        _config(config, ports["opa"], ports["upstream"], signed.config_toml(jwks))
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

        runs: dict[str, list[LoadResult]] = {name: [] for name in TARGETS}
        gateway_pids = {"proxy": gateway.pid, "opa": opa.pid, "upstream": upstream.pid}
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
                    watch=gateway_pids,
                )
            )
            # Enough pre-signed requests for 3x the anonymous rate: each is sent once.
            count = max(5000, int(runs["gateway"][-1].rps * args.duration * 3))
            script, data = signed.write_requests(
                workdir, port=ports["gateway"], path=SIGNED_PATH, token=token, count=count
            )
            runs["gateway_auth"].append(
                run_wrk(
                    f"http://127.0.0.1:{ports['gateway']}{SIGNED_PATH}",
                    duration_s=args.duration,
                    connections=args.connections,
                    script=script,
                    script_args=[str(data)],
                    watch=gateway_pids,
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
    bare = out["bare"]
    for name in ("gateway", "gateway_auth"):
        row = out[name]
        row["throughput_ratio"] = round(row["rps"] / bare["rps"], 3)
        row["added_p50_ms"] = round(row["p50_ms"] - bare["p50_ms"], 3)
        row["added_p99_ms"] = round(row["p99_ms"] - bare["p99_ms"], 3)
        row["added_cpu_us"] = round(
            row["cpu_us_per_request"]["proxy"] - bare["cpu_us_per_request"]["proxy"], 1
        )
    out["auth_stages_cpu_us"] = round(
        out["gateway_auth"]["cpu_us_per_request"]["proxy"]
        - out["gateway"]["cpu_us_per_request"]["proxy"],
        1,
    )
    out["errors"] = sum(r.errors for rs in runs.values() for r in rs)
    return out


def _print(summary: dict[str, Any]) -> None:
    print(f"{'':13} {'req/s':>8} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7}   CPU µs/request")
    for name in TARGETS:
        row = summary[name]
        cpu = ", ".join(f"{k} {v}" for k, v in row["cpu_us_per_request"].items())
        ratio = row.get("throughput_ratio", 1.0)
        print(
            f"{name:13} {row['rps']:8.0f} {ratio:6.2f} {row['p50_ms']:7.2f} "
            f"{row['p99_ms']:7.2f}   {cpu}"
        )
    print(
        "gateway = intake, decision (OPA), route; gateway_auth adds signature, freshness, "
        "ratelimit and identity (RS256 JWT)"
    )
    print(
        f"added gateway CPU per request over the bare proxy: "
        f"{summary['gateway']['added_cpu_us']:.0f} µs without auth, "
        f"{summary['gateway_auth']['added_cpu_us']:.0f} µs with; "
        f"the four auth stages: {summary['auth_stages_cpu_us']:.0f} µs"
    )
    print(
        f"gateway start-up {summary['gateway_startup_s']:.2f} s, "
        f"RSS idle {summary['gateway_rss_idle_mb']:.0f} MB, "
        f"loaded {summary['gateway_rss_loaded_mb']:.0f} MB; "
        f"errors {summary['errors']} (medians of {summary['rounds']} rounds)"
    )


if __name__ == "__main__":
    sys.exit(main())
