"""The ``audit`` stage: append the allow decision to the hash-chained audit log.

The request goes on to the ``route`` stage only once its record is durable
(in the store, or in the local spool while the store is down). When neither
can take it the request ends here with 503 ``audit-unavailable``: nothing is
forwarded unrecorded. Denials are recorded at the HTTP edge
(:mod:`gateway.auditing`), whatever stage raised them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from gateway.context import RequestContext

if TYPE_CHECKING:
    from gateway.auditing import AuditRecorder
    from gateway.pipeline import PipelineDeps

__all__ = ["Audit", "build"]


class Audit:
    name = "audit"

    def __init__(self, recorder: AuditRecorder | None) -> None:
        self._recorder = recorder

    async def run(self, ctx: RequestContext) -> web.StreamResponse | None:
        if self._recorder is not None:
            await self._recorder.record_allow(ctx)
        return None


def build(deps: PipelineDeps) -> Audit:
    return Audit(deps.audit)
