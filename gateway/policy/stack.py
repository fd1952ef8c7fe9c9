"""Assemble the policy engine the decision stage talks to, from config.

    ShadowEngine (if policy.shadow.enabled)      never changes the answer
     └── CachingEngine (if policy.cache.enabled)  same input + revision, same answer
          └── OpaEngine | EmbeddedEngine          the enforcing engine

The shadow wrapper sits outside the cache so that cache hits are compared
with the candidate too. The admin plane reads the parts through
:class:`PolicyStack` (status, cache stats and flush, disagreement counts).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final, Protocol

from aiohttp import web

from gateway.config import PolicyConfig
from gateway.metrics import Metrics
from gateway.policy.cache import CachingEngine
from gateway.policy.engine import PolicyEngine
from gateway.policy.opa import OpaEngine
from gateway.policy.shadow import ShadowEngine

__all__ = ["POLICY_STACK", "EnforcingEngine", "PolicyStack", "open_policy_stack"]

_log = logging.getLogger("gateway.policy")


class EnforcingEngine(PolicyEngine, Protocol):
    """The engine whose answer is enforced: an OPA server, or the embedded engine."""

    #: Where it runs, for the admin plane ("in-process" for the embedded engine).
    url: str

    async def revision(self) -> str:
        """The bundle revisions in force, ``name=revision`` pairs ("" when none)."""
        ...

    async def data(self, path: str) -> Any:
        """The document at ``data/<path>`` (None when undefined)."""
        ...


@dataclass(frozen=True, slots=True)
class PolicyStack:
    #: What the decision stage asks.
    engine: PolicyEngine
    #: The enforcing engine (revision, health, data), OPA or embedded.
    opa: EnforcingEngine
    cache: CachingEngine | None = None
    shadow: ShadowEngine | None = None


#: The application's policy stack (set while the app runs).
POLICY_STACK: Final = web.AppKey("policy_stack", PolicyStack)


@contextlib.asynccontextmanager
async def open_policy_stack(
    config: PolicyConfig,
    url: str,
    metrics: Metrics,
    *,
    enforcing: EnforcingEngine | None = None,
    supervised: bool = False,
) -> AsyncIterator[PolicyStack]:
    """Build and start the engines for ``config`` against the OPA at ``url``.

    ``enforcing``, when given (the started embedded engine), decides instead
    of an OPA at ``url``; the stack closes it. ``supervised``: ``url`` is the
    gateway's own local OPA, which always serves a bundle (``require_bundle``).
    """
    opa: EnforcingEngine
    if enforcing is None:
        opa_server = OpaEngine(
            url,
            decision_path=config.decision_path,
            timeout_s=config.timeout_s,
            require_bundle=config.require_bundle or supervised,
        )
        await opa_server.start()
        opa = opa_server
    else:
        opa = enforcing
    engine: PolicyEngine = opa
    cache: CachingEngine | None = None
    shadow: ShadowEngine | None = None
    try:
        if config.cache.enabled:
            cache = CachingEngine(
                opa,
                config.cache,
                scope=config.decision_path,
                revision_probe=opa.revision,
                metrics=metrics,
            )
            engine = cache
        if config.shadow.enabled:
            candidate = OpaEngine(
                config.shadow.url or url,
                decision_path=config.shadow.decision_path,
                timeout_s=config.shadow.timeout_s,
            )
            await candidate.start()
            shadow = ShadowEngine(
                engine,
                candidate,
                sample_rate=config.shadow.sample_rate,
                timeout_s=config.shadow.timeout_s,
                metrics=metrics,
            )
            engine = shadow
        _log.info(
            "policy engine ready",
            extra={
                "engine": config.engine,
                "opa_url": opa.url,
                "decision_path": config.decision_path,
                "cache": config.cache.enabled,
                "shadow_path": config.shadow.decision_path if config.shadow.enabled else None,
            },
        )
        yield PolicyStack(engine=engine, opa=opa, cache=cache, shadow=shadow)
    finally:
        # Each wrapper closes what it wraps.
        await engine.close()
