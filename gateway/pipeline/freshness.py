"""The ``freshness`` stage: ``created`` within the skew, the nonce claimed once.

Not implemented yet (issue #3): wired in its place in the pipeline and
passes every request through unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from gateway.context import RequestContext

if TYPE_CHECKING:
    from gateway.pipeline import PipelineDeps

__all__ = ["Freshness", "build"]


class Freshness:
    name = "freshness"

    async def run(self, ctx: RequestContext) -> web.StreamResponse | None:
        return None


def build(deps: PipelineDeps) -> Freshness:
    return Freshness()
