"""bench.loadgen: response framing (the generator counts answers by it) and percentiles."""

from __future__ import annotations

import socketserver
import threading
import time

import pytest

from bench.loadgen import LoadRun, _Connection, open_loop, percentile

CL = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = (
    b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"4\r\nwiki\r\n5;ext=1\r\npedia\r\n0\r\n\r\n"
)
EMPTY = b"HTTP/1.1 204 No Content\r\nServer: x\r\n\r\n"


def _feed(pieces: list[bytes]) -> list[int]:
    statuses: list[int] = []
    conn = _Connection(lambda _conn, status: statuses.append(status))
    for piece in pieces:
        conn.data_received(piece)
    return statuses


class TestFraming:
    @pytest.mark.parametrize(
        ("stream", "expected"),
        [
            (CL, [200]),
            (CHUNKED, [201]),
            (EMPTY, [204]),
            (CL + CHUNKED + EMPTY + CL, [200, 201, 204, 200]),
            (CL[:-1], []),  # body incomplete
            (CHUNKED[:-2], []),  # last chunk's CRLF missing
            (CL.replace(b"200 OK", b"503 Service Unavailable"), [503]),
        ],
    )
    def test_responses_are_counted_once_complete(self, stream: bytes, expected: list[int]) -> None:
        assert _feed([stream]) == expected

    @pytest.mark.parametrize("size", [1, 2, 3, 7, 16])
    def test_any_split_into_packets_gives_the_same_answers(self, size: int) -> None:
        stream = CL + CHUNKED + EMPTY
        pieces = [stream[i : i + size] for i in range(0, len(stream), size)]
        assert _feed(pieces) == [200, 201, 204]

    def test_a_connection_lost_mid_request_counts_as_status_0(self) -> None:
        statuses: list[int] = []
        conn = _Connection(lambda _conn, status: statuses.append(status))
        conn.busy = True
        conn.connection_lost(None)
        assert statuses == [0]


class TestPercentile:
    @pytest.mark.parametrize(
        ("q", "expected"), [(50, 50.0), (99, 99.0), (100, 100.0), (1, 1.0), (0.5, 1.0)]
    )
    def test_nearest_rank(self, q: float, expected: float) -> None:
        values = [float(v) for v in range(100, 0, -1)]
        assert percentile(values, q) == expected

    def test_merge_adds_counts_and_latencies(self) -> None:
        one = LoadRun(
            sent=2,
            completed=2,
            errors=1,
            elapsed_s=1.0,
            latencies_ms=[1.0, 2.0],
            statuses={200: 1, 500: 1},
        )
        two = LoadRun(sent=1, completed=1, elapsed_s=2.0, latencies_ms=[3.0], statuses={200: 1})
        one.merge(two)
        assert (one.completed, one.errors, one.elapsed_s) == (3, 1, 2.0)
        assert one.statuses == {200: 2, 500: 1}
        assert sorted(one.latencies_ms) == [1.0, 2.0, 3.0]


class _StallOnce(socketserver.BaseRequestHandler):
    """Keep-alive HTTP/1.1: answers each GET; the very first answer comes after STALL_S."""

    stalled = threading.Event()

    def handle(self) -> None:
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                data = self.request.recv(65536)
                if not data:
                    return
                buffer += data
            _, buffer = buffer.split(b"\r\n\r\n", 1)
            if not self.stalled.is_set():
                self.stalled.set()
                time.sleep(STALL_S)
            self.request.sendall(CL)


STALL_S = 0.5


def test_open_loop_charges_a_stall_to_every_request_it_delayed() -> None:
    """No coordinated omission: requests scheduled during a stall wait, and that counts.

    One connection, 100 req/s: the first answer takes STALL_S, so request i,
    scheduled 10*i ms after the first, cannot be answered before the stall
    ends, and its latency, taken from its scheduled time, is at least
    STALL_S - 10*i ms (a lower bound: a slower machine only adds to it). A
    closed-loop client would report all but the first as fast.
    """
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _StallOnce)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        run = open_loop(port, [request], rate=100, duration_s=1.0, warmup_s=0, connections=1)
    finally:
        server.shutdown()
        server.server_close()
    assert run.completed == 100
    assert run.statuses == {200: 100}
    # One connection: answers arrive in the order requests were scheduled.
    for index, latency_ms in enumerate(run.latencies_ms[:45]):
        assert latency_ms >= STALL_S * 1000 - 10 * index - 1, index
