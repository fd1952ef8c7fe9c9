"""``gateway serve`` with CPU time measured around each pipeline stage (bench only).

    python -m bench.stages OUT.json serve --config FILE --port P

Wraps every stage the pipeline is built with in a timer that adds up
``time.process_time()`` (this process's CPU, all threads: an executor's
fsync counts) spent between the stage's start and end, and counts its runs.
On exit (SIGTERM) the totals go to OUT.json as ``{"stage": [cpu_s, runs]}``.
The first ``BENCH_STAGE_SKIP`` requests (a warm-up) are not counted.

The figures are exact only when requests do not overlap: while a stage
awaits, another request's work would be charged to it. bench.run therefore
drives this process with one connection, one request at a time. Nothing in
gateway/ knows about this module; the gateway proper is measured without it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

import gateway.pipeline as pipeline_module
from gateway.context import RequestContext

_TOTALS: dict[str, list[float]] = {}
_SKIP = int(os.environ.get("BENCH_STAGE_SKIP", "0"))
_seen = 0


class _Timed:
    """A stage that adds its CPU time to _TOTALS; everything else delegated."""

    def __init__(self, stage: Any) -> None:
        self._stage = stage
        self.name: str = stage.name
        _TOTALS.setdefault(self.name, [0.0, 0])

    async def run(self, ctx: RequestContext) -> web.StreamResponse | None:
        global _seen
        if self.name == pipeline_module.STAGE_ORDER[0]:
            _seen += 1
        started = time.process_time()
        try:
            result: web.StreamResponse | None = await self._stage.run(ctx)
            return result
        finally:
            if _seen > _SKIP:
                totals = _TOTALS[self.name]
                totals[0] += time.process_time() - started
                totals[1] += 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stage, name)


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    original = pipeline_module.Pipeline.__init__

    def timed_init(self: pipeline_module.Pipeline, stages: Any) -> None:
        original(self, [_Timed(stage) for stage in stages])

    pipeline_module.Pipeline.__init__ = timed_init  # type: ignore[method-assign]
    from gateway.cli import main as gateway_main

    try:
        return gateway_main(argv[1:])
    finally:
        out.write_text(json.dumps(_TOTALS))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
