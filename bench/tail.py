"""Where the added p99 goes: the client's latency against the gateway's own view.

One gateway (the `bench.run` stack: Redis, OPA on the signed bundle, audit in
PostgreSQL) driven open loop at one rate on the full-pipeline route. Prints

* the client's p50/p99 (the load generator, after its warm-up),
* the gateway's own ``duration_ms`` (edge middleware to the log line) over the
  same window, so the difference is time before or after the pipeline
  (accept, parse, write),
* each stage's share of slow requests, from the stage histograms on
  ``/metrics`` (a stage that awaits Redis, PostgreSQL or the upstream also
  counts the time the event loop spends on other requests meanwhile),
* when the slow requests happened (0.1 s bins): spread out is queueing,
  bunched is a stall.

    python -m bench.tail [--rate 1000] [--duration 10]

A measurement aid, not a test: the numbers move with the machine's load.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import urllib.request
from datetime import datetime
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench import loadgen
from bench import run as bench_run
from bench.harness import ROOT, free_port, wait_http

_ROUTE = "locked"  # bench.run's full-pipeline route


def _settings() -> bench_run.Settings:
    return bench_run.Settings(
        reps=1, workers=1, duration_s=5, load_duration_s=10, warmup_s=2, connections=32,
        open_connections=64, client_procs=1, generator="python", audit_store="postgres",
        scaling=False, loads=[],
    )  # fmt: skip


def _durations(log: Path, since: datetime) -> list[tuple[float, float]]:
    """(seconds since ``since``, duration_ms) of each full-pipeline request logged."""
    rows = []
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("msg") != "request" or entry.get("route") != _ROUTE:
            continue
        at = datetime.fromisoformat(entry["ts"].replace("Z", "+00:00"))
        rows.append(((at - since).total_seconds(), float(entry["duration_ms"])))
    return rows


def _stage_tails(metrics: str, threshold_s: float) -> dict[str, float]:
    """Per stage: the share of its observations above ``threshold_s`` (bucket bound)."""
    buckets: dict[str, dict[float, float]] = collections.defaultdict(dict)
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == "nops_gateway_stage_duration_seconds_bucket":
                bound = float(sample.labels["le"])  # "+Inf" parses as inf
                buckets[sample.labels["stage"]][bound] = sample.value
    shares = {}
    for stage, counts in sorted(buckets.items()):
        total = counts[float("inf")]
        below = max((c for b, c in counts.items() if b <= threshold_s), default=0.0)
        shares[stage] = (total - below) / total if total else 0.0
    return shares


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="offered req/s")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    args = parser.parse_args(argv)
    settings = _settings()
    with (
        tempfile.TemporaryDirectory(prefix="nops-tail-") as tmp,
        bench_run.services(Path(tmp), settings) as svc,
    ):
        config = bench_run.write_config(svc, "tail")
        metrics_port, port = free_port(), free_port()
        config.write_text(
            config.read_text().replace(
                "[logging]",
                f'[metrics]\nenabled = true\nhost = "127.0.0.1"\nport = {metrics_port}\n[logging]',
                1,
            )
        )
        log = Path(tmp) / "gateway.log"
        with log.open("wb") as out:
            gateway = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(config),
                 "--port", str(port)],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
            try:
                wait_http(f"http://127.0.0.1:{port}/_readyz", timeout_s=60)
                total_s = args.duration + settings.warmup_s
                requests = bench_run._signed(svc, port, int(args.rate * total_s) + 100)
                started = datetime.now().astimezone()
                run = loadgen.open_loop(
                    port, requests, rate=args.rate, duration_s=args.duration,
                    warmup_s=settings.warmup_s, connections=settings.open_connections,
                    processes=1,
                )  # fmt: skip
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as r:
                    metrics = r.read().decode()
            finally:
                gateway.terminate()
                gateway.wait(timeout=30)
        rows = [(t, d) for t, d in _durations(log, started) if t >= settings.warmup_s]
    client = run.latencies_ms
    server = [d for _, d in rows]
    if not client or not server:
        print("no requests measured", file=sys.stderr)
        return 1
    p99 = loadgen.percentile(server, 99)
    print(f"offered {args.rate:g} req/s for {args.duration:g} s (after {settings.warmup_s:g} s)")
    print(
        f"client  p50 {loadgen.percentile(client, 50):7.2f}  p99 "
        f"{loadgen.percentile(client, 99):7.2f}  max {max(client):7.2f} ms"
        f"  ({len(client)} requests)"
    )
    print(
        f"gateway p50 {loadgen.percentile(server, 50):7.2f}  p99 {p99:7.2f}  "
        f"max {max(server):7.2f} ms  (duration_ms, edge to log line)"
    )
    shares = _stage_tails(metrics, 0.005)
    print(
        "share of each stage's observations over 5 ms (whole run): "
        + ", ".join(f"{s} {v:.1%}" for s, v in shares.items())
    )
    bins = collections.Counter(round(t, 1) for t, d in rows if d > p99)
    print(
        f"requests over the gateway p99, by 0.1 s bin: {len(bins)} bins; the fullest: "
        + ", ".join(f"{t:.1f} s: {n}" for t, n in bins.most_common(5))
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
