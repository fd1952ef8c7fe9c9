"""Interpret an engine's raw answer: anything but a well-typed decision denies."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import Any, Final

from gateway.policy.engine import Decision

__all__ = ["REASON_ILL_TYPED", "REASON_UNDEFINED", "interpret", "is_well_typed", "load_schema"]

#: Reasons the gateway itself gives when the policy's answer is unusable.
REASON_UNDEFINED: Final = "decision_undefined"
REASON_ILL_TYPED: Final = "decision_ill_typed"


@cache
def load_schema(name: str) -> dict[str, Any]:
    """A JSON Schema shipped in ``gateway/schemas``."""
    text = resources.files("gateway").joinpath("schemas", name).read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


_REASON: Final = re.compile(r"^[a-z][a-z0-9_]*$")
_KEYS: Final = frozenset({"allow", "reasons", "obligations"})


def is_well_typed(result: Any) -> bool:
    """True iff ``result`` satisfies ``schemas/decision.v1.json``.

    Hand-written because it runs on every request and a generic JSON Schema
    validator costs ~0.2 ms here; a test checks it agrees with the schema.
    """
    return (
        isinstance(result, dict)
        and result.keys() == _KEYS
        and isinstance(result["allow"], bool)
        and isinstance(result["obligations"], dict)
        and isinstance(result["reasons"], list)
        and len(result["reasons"]) > 0
        and all(isinstance(r, str) and _REASON.match(r) for r in result["reasons"])
    )


def interpret(
    result: Any,
    *,
    decision_id: str,
    revision: str = "",
    engine_decision_id: str | None = None,
) -> Decision:
    """Turn ``result`` (the policy's ``decision`` document, or None) into a Decision.

    An undefined result (None) or one that breaks ``decision.v1.json`` is a
    deny with a reason naming the fault; it never raises.
    """
    if result is None:
        return Decision(decision_id, False, (REASON_UNDEFINED,), {}, revision, engine_decision_id)
    if not is_well_typed(result):
        return Decision(decision_id, False, (REASON_ILL_TYPED,), {}, revision, engine_decision_id)
    assert isinstance(result, Mapping)  # noqa: S101 - guaranteed by the schema
    return Decision(
        decision_id=decision_id,
        allow=result["allow"],
        reasons=tuple(result["reasons"]),
        obligations=dict(result["obligations"]),
        revision=revision,
        engine_decision_id=engine_decision_id,
    )
