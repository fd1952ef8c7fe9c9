"""The bus service under load, with raw Redis XADD as the baseline, in one run.

    python -m bench.bus [--rate 2000] [--duration 10] [--consumers 4] [--batch 100]

Starts a private Redis (scripts/redis) and the bus (``python -m bus serve``)
as their own processes, then measures, in this order:

1. **baseline**: raw ``XADD MAXLEN ~`` of the same envelope from this
   process (redis-py asyncio, ``--inflight`` commands in flight);
2. **publish throughput**: closed-loop HTTP publishes, ``--inflight`` in
   flight, for ``--burst`` seconds (this also leaves a backlog);
3. **consume throughput**: ``--consumers`` consumers draining that backlog
   (``max=--batch``, ack after each batch);
4. **latency at offered load**: an open loop at ``--rate`` msg/s for
   ``--duration`` seconds (after ``--warmup`` s): each publish is fired at
   its scheduled time whatever the earlier ones did, and carries that time;
   ``--consumers`` long-polling consumers record receive time minus
   scheduled time (so queueing in the client counts against the bus, no
   coordinated omission). Design target: p95 <= 25 ms, p99 <= 60 ms.

Also reported: CPU µs per message of the bus and Redis processes, and the
bus's RSS idle, after the unconsumed backlog and after the run (messages
live in Redis, not in the service). Results go to bench/results/bus.json.
The bench client, the bus and Redis share this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from redis.asyncio import Redis

from bench.harness import ROOT, cpu_seconds, free_port, rss_mb, stack, wait_http
from bus.envelope import complete
from bus.streams import stream_key

TENANT = "bench"
HEADERS = {"X-Nops-Tenant": TENANT, "Content-Type": "application/json"}


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
    return ordered[index]


def _body(seq: int, sent_at: float) -> bytes:
    return orjson.dumps(
        {"type": "bench.tick", "payload": {"seq": seq, "sent_at": sent_at, "pad": "x" * 200}}
    )


async def _baseline_xadd(redis_url: str, seconds: float, inflight: int) -> dict[str, Any]:
    """Raw XADD of a complete envelope, as the bus stores it, closed loop."""
    envelope = complete(
        {"type": "bench.tick", "payload": {"seq": 0, "sent_at": 0.0, "pad": "x" * 200}},
        tenant=TENANT,
        clock=time.time,
    ).to_json()
    client = Redis.from_url(redis_url, max_connections=inflight)
    stream = stream_key(TENANT, "baseline")
    count = 0
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await client.xadd(stream, {b"e": envelope}, maxlen=100_000, approximate=True)
            latencies.append((time.perf_counter() - started) * 1000)
            count += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    elapsed = time.perf_counter() - started
    await client.delete(stream)
    await client.aclose()
    return {
        "xadd_per_s": round(count / elapsed),
        "p50_ms": round(_percentile(latencies, 50), 3),
        "p99_ms": round(_percentile(latencies, 99), 3),
        "inflight": inflight,
    }


async def _publish_burst(
    session: aiohttp.ClientSession, url: str, seconds: float, inflight: int
) -> dict[str, Any]:
    count = errors = 0
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal count, errors
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            async with session.post(
                f"{url}/topics/burst/messages", data=_body(count, time.time()), headers=HEADERS
            ) as response:
                await response.read()
                if response.status != 201:
                    errors += 1
            latencies.append((time.perf_counter() - started) * 1000)
            count += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    elapsed = time.perf_counter() - started
    return {
        "published": count,
        "publish_per_s": round(count / elapsed),
        "p50_ms": round(_percentile(latencies, 50), 3),
        "p99_ms": round(_percentile(latencies, 99), 3),
        "errors": errors,
        "inflight": inflight,
    }


async def _consume_loop(
    session: aiohttp.ClientSession,
    url: str,
    topic: str,
    consumer: str,
    batch: int,
    on_message: Any,
    stop: asyncio.Event,
    wait_s: float,
) -> int:
    received = 0
    poll = f"{url}/topics/{topic}/subscriptions/bench/messages?consumer={consumer}&max={batch}"
    ack = f"{url}/topics/{topic}/subscriptions/bench/ack"
    while not stop.is_set():
        async with session.get(f"{poll}&wait={wait_s}", headers=HEADERS) as response:
            body = await response.read()
        now = time.time()
        messages = orjson.loads(body)["messages"] if response.status == 200 else []
        for message in messages:
            on_message(message, now)
        received += len(messages)
        if messages:
            async with session.post(
                ack, data=orjson.dumps({"ids": [m["id"] for m in messages]}), headers=HEADERS
            ) as acked:
                await acked.read()
    return received


async def _drain(
    session: aiohttp.ClientSession, url: str, expected: int, consumers: int, batch: int
) -> dict[str, Any]:
    stop = asyncio.Event()
    seen = 0

    def count(message: dict[str, Any], now: float) -> None:
        nonlocal seen
        seen += 1
        if seen >= expected:
            stop.set()

    started = time.perf_counter()
    tasks = [
        asyncio.create_task(
            _consume_loop(session, url, "burst", f"d{n}", batch, count, stop, wait_s=0.5)
        )
        for n in range(consumers)
    ]
    await asyncio.wait_for(stop.wait(), timeout=120)
    elapsed = time.perf_counter() - started
    await asyncio.gather(*tasks)
    return {"consumed": seen, "consume_per_s": round(seen / elapsed), "batch": batch}


async def _open_loop(
    session: aiohttp.ClientSession,
    url: str,
    *,
    rate: float,
    duration: float,
    warmup: float,
    consumers: int,
    batch: int,
) -> dict[str, Any]:
    total = int(rate * (warmup + duration))
    first_measured = int(rate * warmup)
    latencies: dict[int, float] = {}
    publish_ms: list[float] = []
    errors = 0
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    everything = asyncio.Event()
    expected_total = total

    def record(message: dict[str, Any], now: float) -> None:
        payload = message["envelope"]["payload"]
        latencies.setdefault(payload["seq"], (now - payload["sent_at"]) * 1000)
        if len(latencies) >= expected_total:
            everything.set()

    async def send(seq: int, scheduled_wall: float, scheduled_loop: float) -> None:
        nonlocal errors
        try:
            async with session.post(
                f"{url}/topics/load/messages", data=_body(seq, scheduled_wall), headers=HEADERS
            ) as response:
                await response.read()
                if response.status != 201:
                    errors += 1
        except aiohttp.ClientError:
            errors += 1
        if seq >= first_measured:
            publish_ms.append((loop.time() - scheduled_loop) * 1000)

    pollers = [
        asyncio.create_task(
            _consume_loop(session, url, "load", f"c{n}", batch, record, stop, wait_s=1.0)
        )
        for n in range(consumers)
    ]
    await asyncio.sleep(0.5)  # consumers are waiting before the first publish
    start_loop = loop.time() + 0.05
    start_wall = time.time() + 0.05
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
    expected_total = total - errors  # failed publishes are never delivered
    if len(latencies) >= expected_total:
        everything.set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(everything.wait(), timeout=15)
    stop.set()
    await asyncio.gather(*pollers)
    measured = [v for k, v in latencies.items() if k >= first_measured]
    expected = total - first_measured
    return {
        "offered_per_s": rate,
        "achieved_offer_per_s": round(total / offered_elapsed),
        "measured_messages": expected,
        "delivered": len(measured),
        "lost": expected - len(measured),
        "publish_errors": errors,
        "e2e_p50_ms": round(_percentile(measured, 50), 2),
        "e2e_p95_ms": round(_percentile(measured, 95), 2),
        "e2e_p99_ms": round(_percentile(measured, 99), 2),
        "e2e_max_ms": round(max(measured, default=float("nan")), 2),
        "e2e_mean_ms": round(statistics.fmean(measured), 2) if measured else None,
        "publish_p50_ms": round(_percentile(publish_ms, 50), 2),
        "publish_p99_ms": round(_percentile(publish_ms, 99), 2),
        "duration_s": duration,
        "warmup_s": warmup,
        "consumers": consumers,
        "batch": batch,
    }


async def _run(args: argparse.Namespace, bus_url: str, redis_url: str, pids: dict[str, int]) -> Any:
    results: dict[str, Any] = {"rss_mb": {"bus_idle": round(rss_mb(pids["bus"]), 1)}}
    results["baseline"] = await _baseline_xadd(redis_url, args.burst, args.inflight)
    connector = aiohttp.TCPConnector(limit=args.inflight + args.consumers * 2 + 256)
    async with aiohttp.ClientSession(connector=connector) as session:
        results["publish"] = await _publish_burst(session, bus_url, args.burst, args.inflight)
        results["rss_mb"]["bus_after_backlog"] = round(rss_mb(pids["bus"]), 1)
        results["consume"] = await _drain(
            session, bus_url, results["publish"]["published"], args.consumers, args.batch
        )
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        results["latency"] = await _open_loop(
            session,
            bus_url,
            rate=args.rate,
            duration=args.duration,
            warmup=args.warmup,
            consumers=args.consumers,
            batch=args.batch,
        )
        cpu_after = {name: cpu_seconds(pid) for name, pid in pids.items()}
    messages = args.rate * (args.duration + args.warmup)
    results["cpu_us_per_message"] = {
        name: round((cpu_after[name] - cpu_before[name]) / messages * 1e6, 1) for name in pids
    }
    results["rss_mb"]["bus_after_load"] = round(rss_mb(pids["bus"]), 1)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bus")
    parser.add_argument("--rate", type=float, default=2000, help="offered msg/s (open loop)")
    parser.add_argument("--duration", type=float, default=10, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2, help="unmeasured seconds first")
    parser.add_argument("--burst", type=float, default=3, help="seconds of closed-loop runs")
    parser.add_argument("--inflight", type=int, default=32, help="closed-loop concurrency")
    parser.add_argument("--consumers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=100, help="max messages per consume")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bus.json")
    args = parser.parse_args(argv)

    ports = {"redis": free_port(), "bus": free_port()}
    redis_url = f"redis://127.0.0.1:{ports['redis']}/0"
    bus_url = f"http://127.0.0.1:{ports['bus']}"
    with stack() as procs, tempfile.TemporaryDirectory() as tmp:
        redis = procs.spawn([str(ROOT / "scripts" / "redis"), str(ports["redis"]), tmp])
        bus = procs.spawn(
            [
                sys.executable,
                "-m",
                "bus",
                "serve",
                "--port",
                str(ports["bus"]),
                "--redis-url",
                redis_url,
                "--log-level",
                "WARNING",
                "--max-batch",
                str(max(args.batch, 100)),
            ]
        )
        wait_http(f"{bus_url}/_readyz")
        results = _loop().run_until_complete(
            _run(args, bus_url, redis_url, {"bus": bus.pid, "redis": redis.pid})
        )
    _print(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    latency = results["latency"]
    return 1 if latency["lost"] or latency["publish_errors"] else 0


def _loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def _print(results: dict[str, Any]) -> None:
    base, pub, con, lat = (
        results["baseline"],
        results["publish"],
        results["consume"],
        results["latency"],
    )
    print(f"{'':34} {'msg/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    print(
        f"{'raw Redis XADD (baseline)':34} {base['xadd_per_s']:8d} "
        f"{base['p50_ms']:8.2f} {base['p99_ms']:8.2f}"
    )
    print(
        f"{'bus publish, closed loop':34} {pub['publish_per_s']:8d} "
        f"{pub['p50_ms']:8.2f} {pub['p99_ms']:8.2f}"
    )
    print(f"{'bus consume + ack, drain':34} {con['consume_per_s']:8d}")
    print(
        f"publish/XADD throughput ratio {pub['publish_per_s'] / base['xadd_per_s']:.2f} "
        f"(both with {base['inflight']} in flight)"
    )
    print()
    print(
        f"open loop {lat['offered_per_s']:.0f} msg/s offered ({lat['achieved_offer_per_s']} "
        f"scheduled) for {lat['duration_s']:.0f} s, {lat['consumers']} consumers:"
    )
    print(
        f"  end-to-end (scheduled publish -> consumer) p50 {lat['e2e_p50_ms']:.2f} ms, "
        f"p95 {lat['e2e_p95_ms']:.2f} ms, p99 {lat['e2e_p99_ms']:.2f} ms, "
        f"max {lat['e2e_max_ms']:.2f} ms   (target p95 <= 25, p99 <= 60)"
    )
    print(
        f"  publish response p50 {lat['publish_p50_ms']:.2f} ms, "
        f"p99 {lat['publish_p99_ms']:.2f} ms; "
        f"delivered {lat['delivered']}/{lat['measured_messages']}, lost {lat['lost']}, "
        f"publish errors {lat['publish_errors']}"
    )
    cpu = ", ".join(f"{k} {v}" for k, v in results["cpu_us_per_message"].items())
    rss = results["rss_mb"]
    print(f"  CPU µs per message (publish + consume + ack): {cpu}")
    print(
        f"  bus RSS MB: idle {rss['bus_idle']}, after {pub['published']} unconsumed "
        f"{rss['bus_after_backlog']}, after the run {rss['bus_after_load']}"
    )


if __name__ == "__main__":
    sys.exit(main())
