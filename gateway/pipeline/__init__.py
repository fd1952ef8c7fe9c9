"""The request pipeline: one ordered list of stages, built once at start-up.

Each stage is a small object with one async method, ``run(ctx)``. It either
enriches the :class:`~gateway.context.RequestContext` and returns None, or
ends the request: by raising a :class:`~gateway.errors.GatewayError` (a typed
denial) or, for the last stage only, by returning the response. No stage
knows about the next; the order below is the only place it is written.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import aiohttp
from aiohttp import web
from redis.asyncio import Redis

from gateway.auditing import AuditRecorder
from gateway.config import Config
from gateway.context import RequestContext
from gateway.errors import InternalError
from gateway.metrics import Metrics
from gateway.pipeline import (
    audit,
    decision,
    freshness,
    identity,
    intake,
    ratelimit,
    route,
    signature,
)
from gateway.policy.engine import PolicyEngine
from gateway.proxy import ReverseProxy

__all__ = ["STAGE_ORDER", "Pipeline", "PipelineDeps", "Stage", "build_pipeline"]


class Stage(Protocol):
    name: str

    async def run(self, ctx: RequestContext) -> web.StreamResponse | None: ...


@dataclass(frozen=True, slots=True)
class PipelineDeps:
    """What stages may be built from; resources are owned by the app."""

    config: Config
    engine: PolicyEngine
    proxy: ReverseProxy
    metrics: Metrics
    #: Shared state for a cluster; None on a single node without Redis.
    redis: Redis | None = None
    #: Wall-clock seconds (time.time); tests pin it.
    clock: Callable[[], float] = time.time
    #: The audit log's recorder; None when audit.enabled is false.
    audit: AuditRecorder | None = None
    #: For the gateway's own outbound calls (JWKS); not the proxy's pool.
    http: aiohttp.ClientSession | None = None


StageFactory = Callable[[PipelineDeps], Stage]

# The order is deliberate (see DESIGN.md): cheap checks first; replay state
# only after the signature proved the caller; the rate limit protects the
# JWT and policy work; nothing reaches an upstream without a recorded decision.
_STAGES: Final[tuple[tuple[str, StageFactory], ...]] = (
    ("intake", intake.build),
    ("signature", signature.build),
    ("freshness", freshness.build),
    ("ratelimit", ratelimit.build),
    ("identity", identity.build),
    ("decision", decision.build),
    ("audit", audit.build),
    ("route", route.build),
)

STAGE_ORDER: Final[tuple[str, ...]] = tuple(name for name, _ in _STAGES)


class Pipeline:
    """Runs the stages in order until one answers or denies."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        names = tuple(stage.name for stage in stages)
        if names != STAGE_ORDER:
            raise ValueError(f"stages out of order: {names}")
        self.stages = tuple(stages)

    async def handle(self, ctx: RequestContext) -> web.StreamResponse:
        for stage in self.stages:
            ctx.stage = stage.name
            response = await stage.run(ctx)
            if response is not None:
                return response
        raise InternalError("the pipeline produced no response")

    async def close(self) -> None:
        """Release what stages hold (background tasks), last stage first."""
        for stage in reversed(self.stages):
            close = getattr(stage, "close", None)
            if close is not None:
                await close()


def build_pipeline(deps: PipelineDeps) -> Pipeline:
    return Pipeline([factory(deps) for _, factory in _STAGES])
