"""The ``decision`` stage: one question to the policy engine, deny by default."""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.context import RequestContext
from gateway.errors import PolicyDenied, PolicyUnavailable
from gateway.policy.engine import PolicyEngine, PolicyEngineError
from gateway.policy.input import build_input
from gateway.policy.result import REASON_ILL_TYPED, REASON_UNDEFINED

if TYPE_CHECKING:
    from gateway.pipeline import PipelineDeps

__all__ = ["DecisionStage", "build"]

_log = logging.getLogger("gateway.decision")


class DecisionStage:
    name = "decision"

    def __init__(self, engine: PolicyEngine) -> None:
        self._engine = engine

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
        if not decision.allow:
            raise PolicyDenied(
                "the policy denied this request",
                reasons=decision.reasons,
                extra={"decision_id": decision_id},
            )
        return None


def build(deps: PipelineDeps) -> DecisionStage:
    return DecisionStage(deps.engine)
