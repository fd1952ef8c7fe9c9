"""A load generator in Python, for machines without wrk: closed loop and open loop.

Requests are raw HTTP/1.1 bytes built before the run (signed ones carry a
unique nonce each), so the generator only writes bytes and reads framing:
its own CPU cost stays small and is reported. Connections are keep-alive,
one request in flight each (no pipelining), on uvloop.

- **Closed loop** (:func:`closed_loop`): ``connections`` connections send
  their next request as soon as the previous answer arrives, for
  ``duration_s``: the server's maximum throughput at that concurrency.
- **Open loop** (:func:`open_loop`): request ``i`` is *scheduled* at
  ``start + i / rate`` whatever happened to the others; it waits for a free
  connection if all are busy, and its latency is measured **from its
  scheduled time** to the end of its answer. A server that stalls therefore
  gets charged for every request it delayed (no coordinated omission, as
  wrk2 and HdrHistogram's corrected mode). Requests in the first
  ``warmup_s`` are sent but not measured.

With ``processes > 1`` the work is split over that many forked processes
(each its own connections and share of the rate, interleaved) and merged.
"""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

__all__ = ["LoadRun", "closed_loop", "open_loop", "percentile"]


@dataclass
class LoadRun:
    """What one run measured; latencies in milliseconds."""

    sent: int = 0
    completed: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    client_cpu_s: float = 0.0

    @property
    def rps(self) -> float:
        return self.completed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def merge(self, other: LoadRun) -> None:
        self.sent += other.sent
        self.completed += other.completed
        self.errors += other.errors
        self.elapsed_s = max(self.elapsed_s, other.elapsed_s)
        self.latencies_ms.extend(other.latencies_ms)
        for status, count in other.statuses.items():
            self.statuses[status] = self.statuses.get(status, 0) + count
        self.client_cpu_s += other.client_cpu_s


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0 < q <= 100); NaN if empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * q // 100)))
    return ordered[int(rank) - 1]


class _Connection(asyncio.Protocol):
    """One keep-alive connection: write a request, parse one response's framing."""

    def __init__(self, on_response: Callable[[_Connection, int], None]) -> None:
        self._on_response = on_response
        self._buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.busy:  # the answer will never come: status 0
            self.busy = False
            self._on_response(self, 0)

    def send(self, request: bytes) -> None:
        if self.transport is None:
            self._on_response(self, 0)
            return
        self.busy = True
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:
            consumed = self._one_response()
            if consumed is None:
                return
            status, end = consumed
            del self._buffer[:end]
            self.busy = False
            self._on_response(self, status)

    def _one_response(self) -> tuple[int, int] | None:
        buffer = self._buffer
        head_end = buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return None
        head = bytes(buffer[:head_end]).lower()
        status = int(head[9:12])
        body_start = head_end + 4
        marker = head.find(b"\r\ncontent-length:")
        if marker >= 0:
            line_end = head.find(b"\r\n", marker + 2)
            length = int(head[marker + 17 : line_end if line_end >= 0 else len(head)])
            end = body_start + length
            return (status, end) if len(buffer) >= end else None
        if b"\r\ntransfer-encoding: chunked" in head:
            position = body_start
            while True:
                size_end = buffer.find(b"\r\n", position)
                if size_end < 0:
                    return None
                size = int(bytes(buffer[position:size_end]).split(b";")[0], 16)
                position = size_end + 2 + size + 2
                if len(buffer) < position:
                    return None
                if size == 0:
                    return status, position
        return status, body_start  # no body (204, 304)


async def _connect(
    port: int, count: int, on_response: Callable[[_Connection, int], None]
) -> list[_Connection]:
    loop = asyncio.get_running_loop()
    connections = []
    for _ in range(count):
        _, protocol = await loop.create_connection(
            lambda: _Connection(on_response), "127.0.0.1", port
        )
        connections.append(protocol)
    return connections


async def _closed(
    port: int, requests: Sequence[bytes], connections: int, duration_s: float, start_at: float
) -> LoadRun:
    run = LoadRun()
    next_index = 0
    sent_at: dict[int, float] = {}
    measuring = True
    done = asyncio.Event()
    pending = 0

    def send(conn: _Connection) -> None:
        nonlocal next_index, pending
        request = requests[next_index % len(requests)]
        next_index += 1
        sent_at[id(conn)] = time.perf_counter()
        run.sent += 1
        pending += 1
        conn.send(request)

    def on_response(conn: _Connection, status: int) -> None:
        nonlocal pending
        pending -= 1
        run.completed += 1
        run.statuses[status] = run.statuses.get(status, 0) + 1
        if not 200 <= status < 300:
            run.errors += 1
        run.latencies_ms.append((time.perf_counter() - sent_at[id(conn)]) * 1e3)
        if measuring and status:
            send(conn)
        elif pending == 0:
            done.set()

    conns = await _connect(port, connections, on_response)
    await asyncio.sleep(max(0.0, start_at - time.time()))
    cpu = time.process_time()
    started = time.perf_counter()
    for conn in conns:
        send(conn)
    await asyncio.sleep(duration_s)
    measuring = False
    run.elapsed_s = time.perf_counter() - started
    completed_in_time = run.completed
    if pending:
        try:
            await asyncio.wait_for(done.wait(), timeout=10)
        except TimeoutError:
            run.errors += pending
    run.completed = completed_in_time
    run.client_cpu_s = time.process_time() - cpu
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    return run


async def _open(
    port: int,
    requests: Sequence[bytes],
    connections: int,
    rate: float,
    duration_s: float,
    warmup_s: float,
    start_at: float,
    offset_s: float,
) -> LoadRun:
    run = LoadRun()
    total = int(rate * (warmup_s + duration_s))
    first_measured = int(rate * warmup_s)
    idle: collections.deque[_Connection] = collections.deque()
    waiting: collections.deque[tuple[int, float]] = collections.deque()
    in_flight: dict[int, tuple[int, float]] = {}
    finished = asyncio.Event()

    def dispatch() -> None:
        while idle and waiting:
            conn = idle.popleft()
            index, scheduled = waiting.popleft()
            in_flight[id(conn)] = (index, scheduled)
            run.sent += 1
            conn.send(requests[index % len(requests)])

    def on_response(conn: _Connection, status: int) -> None:
        index, scheduled = in_flight.pop(id(conn))
        if index >= first_measured:
            run.completed += 1
            run.statuses[status] = run.statuses.get(status, 0) + 1
            if not 200 <= status < 300:
                run.errors += 1
            run.latencies_ms.append((time.perf_counter() - scheduled) * 1e3)
        if status:
            idle.append(conn)
        dispatch()
        if not in_flight and not waiting and scheduled_all:
            finished.set()

    scheduled_all = False
    idle.extend(await _connect(port, connections, on_response))
    await asyncio.sleep(max(0.0, start_at - time.time()))
    cpu = time.process_time()
    start = time.perf_counter() + offset_s
    for index in range(total):
        due = start + index / rate
        delay = due - time.perf_counter()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        waiting.append((index, due))
        dispatch()
    scheduled_all = True
    run.elapsed_s = max(0.0, time.perf_counter() - start - warmup_s)
    if in_flight or waiting:
        try:
            await asyncio.wait_for(finished.wait(), timeout=30)
        except TimeoutError:
            run.errors += len(in_flight) + len(waiting)
    run.client_cpu_s = time.process_time() - cpu
    for conn in idle:
        if conn.transport is not None:
            conn.transport.close()
    return run


def _loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def _child(job: tuple[str, tuple[Any, ...]], queue: Any) -> None:
    kind, args = job
    loop = _loop()
    try:
        coro = _closed(*args) if kind == "closed" else _open(*args)
        queue.put(loop.run_until_complete(coro))
    finally:
        loop.close()


def _fan_out(jobs: list[tuple[str, tuple[Any, ...]]]) -> LoadRun:
    if len(jobs) == 1:
        loop = _loop()
        try:
            kind, args = jobs[0]
            coro = _closed(*args) if kind == "closed" else _open(*args)
            return loop.run_until_complete(coro)
        finally:
            loop.close()
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_child, args=(job, queue)) for job in jobs]
    for worker in workers:
        worker.start()
    merged = LoadRun()
    for _ in workers:
        merged.merge(queue.get(timeout=600))
    for worker in workers:
        worker.join()
    return merged


def _split(requests: Sequence[bytes], parts: int) -> list[Sequence[bytes]]:
    """Each process its own requests (unique nonces stay unique), or all when too few."""
    return [requests[n::parts] if len(requests) >= parts else requests for n in range(parts)]


def closed_loop(
    port: int,
    requests: Sequence[bytes],
    *,
    connections: int = 32,
    duration_s: float = 5.0,
    processes: int = 1,
) -> LoadRun:
    """Maximum throughput: ``connections`` busy connections for ``duration_s``."""
    processes = max(1, min(processes, connections, os.cpu_count() or 1))
    start_at = time.time() + 0.3
    share = _split(requests, processes)
    jobs = [
        ("closed", (port, share[n], connections // processes, duration_s, start_at))
        for n in range(processes)
    ]
    return _fan_out(jobs)


def open_loop(
    port: int,
    requests: Sequence[bytes],
    *,
    rate: float,
    duration_s: float = 5.0,
    warmup_s: float = 1.0,
    connections: int = 64,
    processes: int = 1,
) -> LoadRun:
    """Latency at an offered ``rate`` (req/s), measured from each scheduled send time."""
    processes = max(1, min(processes, connections))
    start_at = time.time() + 0.3
    share = _split(requests, processes)
    jobs = [
        (
            "open",
            (
                port,
                share[n],
                connections // processes,
                rate / processes,
                duration_s,
                warmup_s,
                start_at,
                n / rate,
            ),
        )
        for n in range(processes)
    ]
    return _fan_out(jobs)
