"""The ``decision`` stage: one question to the policy engine, deny by default."""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.context import RequestContext
from gateway.egress_route import EGRESS_POLICY_REASONS, REPORTABLE_REASONS
from gateway.errors import EgressDenied, PolicyDenied, PolicyUnavailable
from gateway.metrics import Metrics
from gateway.policy.engine import PolicyEngine, PolicyEngineError
from gateway.policy.input import build_input
from gateway.policy.result import REASON_ILL_TYPED, REASON_UNDEFINED

if TYPE_CHECKING:
    from gateway.pipeline import PipelineDeps

__all__ = ["DecisionStage", "build"]

_log = logging.getLogger("gateway.decision")


class DecisionStage:
    name = "decision"

    def __init__(self, engine: PolicyEngine, metrics: Metrics | None = None) -> None:
        self._engine = engine
        self._metrics = metrics

    async def run(self, ctx: RequestContext) -> web.StreamResponse | None:
        decision_id = str(uuid.uuid4())
        document = build_input(ctx)
        ctx.policy_input = document
        try:
            decision = await self._engine.decide(document, decision_id)
        except PolicyEngineError as exc:
            # SECURITY: fail closed; the decision id still identifies the attempt.
            _log.error("policy engine unavailable", extra={"decision_id": decision_id})
            raise PolicyUnavailable(
                "the policy engine did not answer; the request was not forwarded",
                reasons=(exc.code,),
                extra={"decision_id": decision_id},
            ) from None
        ctx.decision = decision
        if decision.reasons[:1] in ((REASON_UNDEFINED,), (REASON_ILL_TYPED,)):
            _log.error(
                "policy returned no usable decision; denying",
                extra={"decision_id": decision_id, "reasons": list(decision.reasons)},
            )
        egress = ctx.egress_target is not None
        if not decision.allow and egress and set(decision.reasons) & EGRESS_POLICY_REASONS:
            return self._egress_denied(ctx, decision.reasons, decision_id)
        if not decision.allow:
            raise PolicyDenied(
                "the policy denied this request",
                reasons=decision.reasons,
                extra={"decision_id": decision_id},
            )
        return None

    def _egress_denied(
        self, ctx: RequestContext, reasons: tuple[str, ...], decision_id: str
    ) -> web.StreamResponse | None:
        """Egress: 403 egress-denied, or in report mode log, count and go on."""
        target = ctx.egress_target
        assert target is not None  # noqa: S101 - only called for egress targets
        if target.mode == "report" and reasons and set(reasons) <= REPORTABLE_REASONS:
            ctx.egress_would_deny = reasons
            _log.warning(
                "enforce_would_deny",
                extra={
                    "decision_id": decision_id,
                    "destination": target.destination,
                    "reasons": list(reasons),
                },
            )
            if self._metrics is not None:
                for reason in reasons:
                    self._metrics.record_egress_would_deny(reason)
            return None
        raise EgressDenied(
            "data of this class may not leave for this destination",
            reasons=reasons,
            extra={"decision_id": decision_id},
        )


def build(deps: PipelineDeps) -> DecisionStage:
    return DecisionStage(deps.engine, deps.metrics)
