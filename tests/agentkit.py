"""Real aiohttp agents for the routing tests: in-process, or as processes that can be killed.

``python -m tests.agentkit --name a1 --port 9001`` serves the same app as
:func:`create_agent_app`: every path answers JSON naming the agent, with the
method, path, query, headers and body size it received;
``.../slow/{seconds}`` waits first; ``.../status/{code}`` answers that status,
and ``.../fail-if/{name}/{code}`` and ``.../slow-if/{name}/{seconds}`` do
so only when the agent is ``name``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import orjson
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]


def create_agent_app(name: str) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        parts = request.match_info["tail"].split("/")
        if len(parts) >= 2 and parts[-2] == "slow":
            await asyncio.sleep(float(parts[-1]))
        if len(parts) >= 3 and parts[-3] == "slow-if" and parts[-2] == name:
            await asyncio.sleep(float(parts[-1]))
        status = int(parts[-1]) if len(parts) >= 2 and parts[-2] == "status" else 200
        if len(parts) >= 3 and parts[-3] == "fail-if" and parts[-2] == name:
            status = int(parts[-1])
        body = await request.read()
        payload = {
            "agent": name,
            "method": request.method,
            "path": request.path,
            "raw_path": request.raw_path,
            "query": dict(request.query),
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "body_bytes": len(body),
        }
        return web.Response(
            status=status, body=orjson.dumps(payload), content_type="application/json"
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


class AgentProcess:
    """An agent in its own process, so a test can kill it like a crash (SIGKILL)."""

    def __init__(self, name: str, port: int) -> None:
        self.name = name
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.agentkit", "--name", self.name, "--port", str(self.port)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"agent {self.name} did not start") from None
                time.sleep(0.05)
            else:
                return

    def kill(self) -> None:
        """SIGKILL: the agent dies without closing anything gracefully."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.agentkit")
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    web.run_app(
        create_agent_app(args.name), host="127.0.0.1", port=args.port, print=None, access_log=None
    )


if __name__ == "__main__":
    main()
