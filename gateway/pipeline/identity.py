"""The ``identity`` stage: JWT (JWKS, iss, aud, exp, nbf, scopes) bound to the signer's tenant.

Not implemented yet (issue #3): wired in its place in the pipeline and
passes every request through unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from gateway.context import RequestContext

if TYPE_CHECKING:
    from gateway.pipeline import PipelineDeps

__all__ = ["Identity", "build"]


class Identity:
    name = "identity"

    async def run(self, ctx: RequestContext) -> web.StreamResponse | None:
        return None


def build(deps: PipelineDeps) -> Identity:
    return Identity()
