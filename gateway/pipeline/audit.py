"""The ``audit`` stage: append the decision to the hash-chained audit log.

Not implemented yet (issue #5): wired in its place in the pipeline and
passes every request through unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from gateway.context import RequestContext

if TYPE_CHECKING:
    from gateway.pipeline import PipelineDeps

__all__ = ["Audit", "build"]


class Audit:
    name = "audit"

    async def run(self, ctx: RequestContext) -> web.StreamResponse | None:
        return None


def build(deps: PipelineDeps) -> Audit:
    return Audit()
