"""The bus service under load, with raw Redis XADD as the baseline, in one run.

    python -m bench.bus [--rates 500,1000,2000] [--duration 10] [--bus-procs 1]

Starts a private Redis (scripts/redis) and ``--bus-procs`` bus processes
(``python -m bus serve --reuse-port`` on one port), then measures, in order:

1. **baseline**: raw ``XADD MAXLEN ~`` of a complete envelope from this
   process (redis-py asyncio, ``--inflight`` commands in flight);
2. **publish throughput**: closed-loop HTTP publishes, ``--inflight`` in
   flight, for ``--burst`` seconds (leaving a backlog);
3. **consume throughput**: ``--consumers`` consumers draining that backlog
   (``max=--batch``, ack after each batch);
4. **latency at offered load**, for each of ``--rates``: an open loop for
   ``--duration`` s (after ``--warmup`` s): each publish is sent at its
   scheduled time whatever the earlier ones did, and carries that time;
   ``--consumers`` long-polling consumers record receive time minus
   scheduled time, so client-side queueing counts against the bus (no
   coordinated omission). Design target: p95 <= 25 ms, p99 <= 60 ms.

CPU µs per message of the bus and Redis processes come from /proc, and the
bus's RSS is taken idle, after the unconsumed backlog and at the end
(messages live in Redis, not in the service). The load generator is a
minimal keep-alive HTTP/1.1 client, so that it leaves the machine's cores
to the processes it measures. Results go to bench/results/bus.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from redis.asyncio import Redis

from bench.harness import ROOT, cpu_seconds, free_port, rss_mb, stack, wait_http
from bus.envelope import complete
from bus.streams import stream_key

TENANT = "bench"
PAD = "x" * 200  # a ~400-byte envelope


class Http:
    """Just enough HTTP/1.1 for the bus API: keep-alive, Content-Length bodies."""

    def __init__(self, port: int, limit: int) -> None:
        self._port = port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._slots = asyncio.Semaphore(limit)
        self._all: list[asyncio.StreamWriter] = []

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        async with self._slots:
            reader, writer = self._idle.pop() if self._idle else await self._open()
            try:
                head = (
                    f"{method} {path} HTTP/1.1\r\nHost: bench\r\nX-Nops-Tenant: {TENANT}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                )
                writer.write(head.encode() + body)
                answer = await reader.readuntil(b"\r\n\r\n")
                status = int(answer[9:12])
                length = 0
                for line in answer.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                payload = await reader.readexactly(length)
            except BaseException:
                writer.close()
                raise
            self._idle.append((reader, writer))
            return status, payload

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self._port)
        self._all.append(writer)
        return reader, writer

    async def close(self) -> None:
        for writer in self._all:
            writer.close()


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def _body(seq: int, sent_at: float) -> bytes:
    return orjson.dumps({"type": "bench.tick", "payload": {"seq": seq, "t": sent_at, "pad": PAD}})


async def _baseline_xadd(redis_url: str, seconds: float, inflight: int) -> dict[str, Any]:
    """Raw XADD of a complete envelope, as the bus stores it, closed loop."""
    envelope = complete(
        {"type": "bench.tick", "payload": {"seq": 0, "t": 0.0, "pad": PAD}},
        tenant=TENANT,
        clock=time.time,
    ).to_json()
    client = Redis.from_url(redis_url, max_connections=inflight)
    stream = stream_key(TENANT, "baseline")
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await client.xadd(stream, {b"e": envelope}, maxlen=100_000, approximate=True)
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    elapsed = time.perf_counter() - started
    await client.delete(stream)
    await client.aclose()
    return {
        "xadd_per_s": round(len(latencies) / elapsed),
        "p50_ms": round(_percentile(latencies, 50), 3),
        "p99_ms": round(_percentile(latencies, 99), 3),
        "inflight": inflight,
    }


async def _publish_burst(http: Http, seconds: float, inflight: int) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            status, _ = await http.request("POST", "/topics/burst/messages", _body(0, 0.0))
            errors += status != 201
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    elapsed = time.perf_counter() - started
    return {
        "published": len(latencies),
        "publish_per_s": round(len(latencies) / elapsed),
        "p50_ms": round(_percentile(latencies, 50), 3),
        "p99_ms": round(_percentile(latencies, 99), 3),
        "errors": errors,
        "inflight": inflight,
    }


async def _consumer(
    port: int,
    topic: str,
    name: str,
    batch: int,
    wait_s: float,
    on_message: Callable[[dict[str, Any], float], None],
    stop: asyncio.Event,
) -> None:
    """One consumer on its own connection: long-poll, hand over, ack the batch."""
    http = Http(port, 1)
    poll = f"/topics/{topic}/subscriptions/bench/messages?consumer={name}&max={batch}&wait={wait_s}"
    ack = f"/topics/{topic}/subscriptions/bench/ack"
    try:
        while not stop.is_set():
            status, body = await http.request("GET", poll)
            now = time.time()
            messages = orjson.loads(body)["messages"] if status == 200 else []
            for message in messages:
                on_message(message, now)
            if messages:
                await http.request("POST", ack, orjson.dumps({"ids": [m["id"] for m in messages]}))
    finally:
        await http.close()


async def _drain(port: int, expected: int, consumers: int, batch: int) -> dict[str, Any]:
    stop = asyncio.Event()
    seen = 0

    def count(message: dict[str, Any], now: float) -> None:
        nonlocal seen
        seen += 1
        if seen >= expected:
            stop.set()

    started = time.perf_counter()
    tasks = [
        asyncio.create_task(_consumer(port, "burst", f"d{n}", batch, 0.5, count, stop))
        for n in range(consumers)
    ]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=120)
    elapsed = time.perf_counter() - started
    stop.set()
    await asyncio.gather(*tasks)
    return {"consumed": seen, "consume_per_s": round(seen / elapsed), "batch": batch}


async def _open_loop(
    port: int, rate: float, duration: float, warmup: float, consumers: int, batch: int
) -> dict[str, Any]:
    topic = f"load-{int(rate)}"
    total = int(rate * (warmup + duration))
    first_measured = int(rate * warmup)
    latencies: dict[int, float] = {}
    publish_ms: list[float] = []
    errors = measured_errors = 0
    expected_total = total
    stop, everything = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    http = Http(port, 512)

    def record(message: dict[str, Any], now: float) -> None:
        payload = message["envelope"]["payload"]
        latencies.setdefault(payload["seq"], (now - payload["t"]) * 1000)
        if len(latencies) >= expected_total:
            everything.set()

    async def send(seq: int, wall: float, at: float) -> None:
        nonlocal errors, measured_errors
        try:
            status, _ = await http.request("POST", f"/topics/{topic}/messages", _body(seq, wall))
            failed = status != 201
        except (OSError, asyncio.IncompleteReadError):
            failed = True
        errors += failed
        measured_errors += failed and seq >= first_measured
        if seq >= first_measured:
            publish_ms.append((loop.time() - at) * 1000)

    pollers = [
        asyncio.create_task(_consumer(port, topic, f"c{n}", batch, 1.0, record, stop))
        for n in range(consumers)
    ]
    await asyncio.sleep(0.5)  # consumers are waiting before the first publish
    start_loop, start_wall = loop.time() + 0.05, time.time() + 0.05
    sends: set[asyncio.Task[None]] = set()
    for seq in range(total):
        offset = seq / rate
        delay = start_loop + offset - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(send(seq, start_wall + offset, start_loop + offset))
        sends.add(task)
        task.add_done_callback(sends.discard)
    offered_elapsed = loop.time() - start_loop
    await asyncio.gather(*sends)
    expected_total = total - errors  # a failed publish is never delivered
    if len(latencies) >= expected_total:
        everything.set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(everything.wait(), timeout=15)
    stop.set()
    await asyncio.gather(*pollers)
    await http.close()
    measured = [v for k, v in latencies.items() if k >= first_measured]
    expected = total - first_measured
    return {
        "offered_per_s": rate,
        "scheduled_per_s": round(total / offered_elapsed),
        "messages": expected,
        "delivered": len(measured),
        "lost": expected - len(measured) - measured_errors,
        "publish_errors": measured_errors,
        "e2e_p50_ms": round(_percentile(measured, 50), 2),
        "e2e_p95_ms": round(_percentile(measured, 95), 2),
        "e2e_p99_ms": round(_percentile(measured, 99), 2),
        "e2e_max_ms": round(max(measured, default=float("nan")), 2),
        "publish_p50_ms": round(_percentile(publish_ms, 50), 2),
        "publish_p99_ms": round(_percentile(publish_ms, 99), 2),
        "meets_target": _percentile(measured, 95) <= 25 and _percentile(measured, 99) <= 60,
    }


async def _run(
    args: argparse.Namespace, port: int, redis_url: str, pids: dict[str, list[int]]
) -> dict[str, Any]:
    def cpu(name: str) -> float:
        return sum(cpu_seconds(pid) for pid in pids[name])

    def bus_rss() -> float:
        return round(sum(rss_mb(pid) for pid in pids["bus"]), 1)

    results: dict[str, Any] = {"rss_mb": {"bus_idle": bus_rss()}}
    results["baseline"] = await _baseline_xadd(redis_url, args.burst, args.inflight)
    http = Http(port, args.inflight)
    results["publish"] = await _publish_burst(http, args.burst, args.inflight)
    await http.close()
    results["rss_mb"]["bus_after_backlog"] = bus_rss()
    results["consume"] = await _drain(
        port, results["publish"]["published"], args.consumers, args.batch
    )
    results["load"] = []
    for rate in args.rates:
        before = {name: cpu(name) for name in pids}
        client_before = time.process_time()
        run = await _open_loop(port, rate, args.duration, args.warmup, args.consumers, args.batch)
        messages = rate * (args.duration + args.warmup)
        run["cpu_us_per_message"] = {
            name: round((cpu(name) - before[name]) / messages * 1e6, 1) for name in pids
        }
        run["cpu_us_per_message"]["bench_client"] = round(
            (time.process_time() - client_before) / messages * 1e6, 1
        )
        results["load"].append(run)
    results["rss_mb"]["bus_end"] = bus_rss()
    results["settings"] = {
        k: getattr(args, k)
        for k in ("duration", "warmup", "burst", "inflight", "consumers", "batch", "bus_procs")
    }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bus")
    parser.add_argument(
        "--rates",
        type=lambda text: [float(r) for r in text.split(",")],
        default=[500.0, 1000.0, 2000.0],
        help="offered msg/s, comma-separated (open loop)",
    )
    parser.add_argument("--duration", type=float, default=10, help="measured seconds per rate")
    parser.add_argument("--warmup", type=float, default=2, help="unmeasured seconds first")
    parser.add_argument("--burst", type=float, default=3, help="seconds of closed-loop runs")
    parser.add_argument("--inflight", type=int, default=32, help="closed-loop concurrency")
    parser.add_argument("--consumers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=100, help="max messages per consume")
    parser.add_argument("--bus-procs", type=int, default=1, help="bus processes on one port")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bus.json")
    args = parser.parse_args(argv)

    ports = {"redis": free_port(), "bus": free_port()}
    redis_url = f"redis://127.0.0.1:{ports['redis']}/0"
    with stack() as procs, tempfile.TemporaryDirectory() as tmp:
        redis = procs.spawn([str(ROOT / "scripts" / "redis"), str(ports["redis"]), tmp])
        buses = [
            procs.spawn(
                [
                    sys.executable,
                    "-m",
                    "bus",
                    "serve",
                    "--port",
                    str(ports["bus"]),
                    "--reuse-port",
                    "--redis-url",
                    redis_url,
                    "--log-level",
                    "WARNING",
                    "--max-batch",
                    str(max(args.batch, 100)),
                ]
            )
            for _ in range(args.bus_procs)
        ]
        wait_http(f"http://127.0.0.1:{ports['bus']}/_readyz")
        time.sleep(0.5 * args.bus_procs)  # every process listening
        pids = {"bus": [b.pid for b in buses], "redis": [redis.pid]}
        results = _loop().run_until_complete(_run(args, ports["bus"], redis_url, pids))
    _print(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if any(run["lost"] for run in results["load"]) else 0


def _loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def _print(results: dict[str, Any]) -> None:
    base, pub, con = results["baseline"], results["publish"], results["consume"]
    procs = results["settings"]["bus_procs"]
    print(f"{'closed loop':36} {'msg/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    print(
        f"{'raw Redis XADD (baseline)':36} {base['xadd_per_s']:8d} "
        f"{base['p50_ms']:8.2f} {base['p99_ms']:8.2f}"
    )
    print(
        f"{f'bus publish ({procs} process(es))':36} {pub['publish_per_s']:8d} "
        f"{pub['p50_ms']:8.2f} {pub['p99_ms']:8.2f}"
    )
    print(f"{'bus consume + ack (drain)':36} {con['consume_per_s']:8d}")
    print(
        f"publish / raw XADD = {pub['publish_per_s'] / base['xadd_per_s']:.2f} "
        f"(both {base['inflight']} in flight)"
    )
    print()
    print(
        f"{'open loop':10} {'sched/s':>8} {'e2e p50':>8} {'p95':>8} {'p99':>8} {'max':>8} "
        f"{'pub p99':>8} {'lost':>5} {'err':>5}  target  CPU µs/msg"
    )
    for run in results["load"]:
        cpu = ", ".join(f"{k} {v:.0f}" for k, v in run["cpu_us_per_message"].items())
        print(
            f"{run['offered_per_s']:6.0f}/s   {run['scheduled_per_s']:8d} "
            f"{run['e2e_p50_ms']:8.2f} {run['e2e_p95_ms']:8.2f} {run['e2e_p99_ms']:8.2f} "
            f"{run['e2e_max_ms']:8.1f} {run['publish_p99_ms']:8.2f} {run['lost']:5d} "
            f"{run['publish_errors']:5d}  {'met' if run['meets_target'] else 'MISSED':6}  {cpu}"
        )
    rss = results["rss_mb"]
    print(
        f"(e2e = scheduled publish time -> consumer received, ms; target p95 <= 25, p99 <= 60)\n"
        f"bus RSS MB: idle {rss['bus_idle']}, after {pub['published']} unconsumed "
        f"{rss['bus_after_backlog']}, at the end {rss['bus_end']}"
    )


if __name__ == "__main__":
    sys.exit(main())
