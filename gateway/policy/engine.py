"""The one interface the decision stage talks to."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["Decision", "PolicyEngine", "PolicyEngineError"]


class PolicyEngineError(Exception):
    """The engine could not be asked or did not answer; the request fails closed."""

    code = "policy_engine_error"


@dataclass(frozen=True, slots=True)
class Decision:
    """An interpreted policy answer."""

    decision_id: str
    allow: bool
    reasons: tuple[str, ...]
    obligations: Mapping[str, Any] = field(default_factory=dict)
    #: Bundle revisions the engine reported, by bundle name ("" when unknown).
    revision: str = ""
    #: Engine-side decision id when the engine assigns one (OPA with decision logs).
    engine_decision_id: str | None = None
    #: True when the decision cache answered (same input, same revision).
    cached: bool = False


class PolicyEngine(Protocol):
    """Evaluates a policy input document."""

    async def decide(self, document: Mapping[str, Any], decision_id: str) -> Decision:
        """Return the decision; raise :class:`PolicyEngineError` when unreachable."""
        ...

    async def healthy(self) -> bool:
        """True when the engine answers and has its policies loaded."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
