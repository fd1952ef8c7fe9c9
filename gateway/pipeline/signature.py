"""The ``signature`` stage: RFC 9421 HMAC over method, target, digest, nonce.

Not implemented yet (issue #3): wired in its place in the pipeline and
passes every request through unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from gateway.context import RequestContext

if TYPE_CHECKING:
    from gateway.pipeline import PipelineDeps

__all__ = ["Signature", "build"]


class Signature:
    name = "signature"

    async def run(self, ctx: RequestContext) -> web.StreamResponse | None:
        return None


def build(deps: PipelineDeps) -> Signature:
    return Signature()
