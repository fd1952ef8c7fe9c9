"""Shadow mode: a candidate policy evaluated beside the enforcing one.

:class:`ShadowEngine` returns the enforcing engine's decision, unchanged and
without waiting for anything else. For a sampled share of requests it then
asks the candidate engine the same question in a background task and
compares: a disagreement is logged (one line, with the decision id and both
answers) and counted per reason in
``Metrics.shadow_disagreements[(enforced_allow, shadow_allow, reason)]``.

The reasons counted are those on which the two answers differ (the
symmetric difference of their reason sets, less ``allowed``): the candidate's
new deny reasons when it would deny, the enforcing policy's deny reasons
when the candidate would allow. A candidate that fails, times out or answers
ill-typed is counted as ``error`` and never touches the request.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping
from typing import Any, Final

from gateway.metrics import Metrics
from gateway.policy.engine import Decision, PolicyEngine, PolicyEngineError
from gateway.policy.result import REASON_ILL_TYPED, REASON_UNDEFINED

__all__ = ["ALLOW_DIFFERS", "ShadowEngine", "disagreement_reasons"]

_log = logging.getLogger("gateway.policy.shadow")

#: Background comparisons allowed in flight; past it a sample is skipped, so
#: a slow candidate cannot pile up tasks and memory.
MAX_IN_FLIGHT: Final = 256
#: The reason label when only ``allow`` differs, not the reasons.
ALLOW_DIFFERS: Final = "allow_differs"


def disagreement_reasons(enforced: Decision, shadow: Decision) -> tuple[str, ...]:
    """The reasons on which two decisions differ (empty when they agree)."""
    differing = set(enforced.reasons) ^ set(shadow.reasons)
    differing.discard("allowed")
    if not differing and enforced.allow != shadow.allow:
        return (ALLOW_DIFFERS,)
    return tuple(sorted(differing))


class ShadowEngine:
    """Enforces ``primary``; evaluates ``candidate`` beside it, never changing the answer."""

    def __init__(
        self,
        primary: PolicyEngine,
        candidate: PolicyEngine,
        *,
        sample_rate: float,
        timeout_s: float,
        metrics: Metrics | None = None,
        sampler: Callable[[], float] = random.random,
    ) -> None:
        self._primary = primary
        self._candidate = candidate
        self._sample_rate = sample_rate
        self._timeout_s = timeout_s
        self._metrics = metrics or Metrics()
        self._sampler = sampler
        self._tasks: set[asyncio.Task[None]] = set()

    async def decide(self, document: Mapping[str, Any], decision_id: str) -> Decision:
        decision = await self._primary.decide(document, decision_id)
        if self._sample_rate <= 0 or self._sampler() >= self._sample_rate:
            return decision
        if len(self._tasks) >= MAX_IN_FLIGHT:
            self._metrics.shadow_evaluations["skipped"] += 1
            return decision
        task = asyncio.create_task(
            self._compare(dict(document), decision), name=f"shadow-{decision_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return decision

    async def drain(self) -> None:
        """Wait for the comparisons in flight (tests, graceful shutdown)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def healthy(self) -> bool:
        # The candidate's health never decides readiness.
        return await self._primary.healthy()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self._candidate.close()
        finally:
            await self._primary.close()

    async def _compare(self, document: dict[str, Any], enforced: Decision) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                shadow = await self._candidate.decide(document, enforced.decision_id)
        except (PolicyEngineError, TimeoutError) as exc:
            self._error(enforced, type(exc).__name__)
            return
        except Exception as exc:  # noqa: BLE001 - a candidate must never break anything
            self._error(enforced, type(exc).__name__)
            return
        if shadow.reasons[:1] in ((REASON_UNDEFINED,), (REASON_ILL_TYPED,)):
            self._error(enforced, shadow.reasons[0])
            return
        reasons = disagreement_reasons(enforced, shadow)
        if not reasons:
            self._metrics.shadow_evaluations["agree"] += 1
            return
        self._metrics.shadow_evaluations["disagree"] += 1
        for reason in reasons:
            self._metrics.record_shadow_disagreement(enforced.allow, shadow.allow, reason)
        _log.warning(
            "shadow policy disagrees",
            extra={
                "decision_id": enforced.decision_id,
                "enforced_allow": enforced.allow,
                "enforced_reasons": list(enforced.reasons),
                "shadow_allow": shadow.allow,
                "shadow_reasons": list(shadow.reasons),
                "policy_revision": enforced.revision,
                "shadow_revision": shadow.revision,
            },
        )

    def _error(self, enforced: Decision, error: str) -> None:
        self._metrics.shadow_evaluations["error"] += 1
        _log.warning(
            "shadow policy gave no usable answer",
            extra={"decision_id": enforced.decision_id, "error": error},
        )
