"""In-process counters, labelled by bounded values only (stage, code, reason).

Exported by the metrics endpoint (issue #9); tests and the admin plane read
them directly. Label values come from code (stage names, error codes, policy
reason codes), never from request data, so cardinality stays bounded.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Final

__all__ = ["MAX_DENIAL_REASONS", "MAX_SHADOW_REASONS", "Metrics"]

#: Distinct reason labels the shadow disagreement counter keeps; further
#: reasons (a candidate policy is not trusted to keep its codes few) count
#: under "other".
MAX_SHADOW_REASONS: Final = 64
#: Distinct reason labels the denial counter keeps (reasons come from code
#: and from policy); further reasons count under "other".
MAX_DENIAL_REASONS: Final = 64


@dataclass(slots=True)
class Metrics:
    #: Requests ended by a problem, by (stage, error code).
    denials: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: Denials by (stage, reason) for errors that carry reasons.
    denial_reasons: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: Responses by status class ("2xx" ...).
    responses: Counter[str] = field(default_factory=Counter)
    #: Decision cache outcomes: hit, miss, uncacheable, flush.
    decision_cache: Counter[str] = field(default_factory=Counter)
    #: Shadow evaluations by outcome: agree, disagree, error, skipped.
    shadow_evaluations: Counter[str] = field(default_factory=Counter)
    #: Shadow disagreements by (enforced allow, shadow allow, reason).
    shadow_disagreements: Counter[tuple[bool, bool, str]] = field(default_factory=Counter)
    #: Egress requests report mode let through, by the reason enforce would have denied.
    egress_would_deny: Counter[str] = field(default_factory=Counter)
    #: True while rate limits run on per-node memory because their Redis failed.
    ratelimit_degraded: bool = False
    #: Rate-limit storage failures, each one answered from the memory fallback.
    ratelimit_storage_errors: int = 0
    #: The reason labels denial_reasons holds (for the MAX_DENIAL_REASONS cap).
    _reason_labels: set[str] = field(default_factory=set)

    def record(self, stage: str, status: int, code: str | None, reasons: tuple[str, ...]) -> None:
        self.responses[f"{status // 100}xx"] += 1
        if code is not None:
            self.denials[(stage, code)] += 1
            for reason in reasons:
                if reason not in self._reason_labels:
                    if len(self._reason_labels) >= MAX_DENIAL_REASONS:
                        reason = "other"
                    else:
                        self._reason_labels.add(reason)
                self.denial_reasons[(stage, reason)] += 1

    def record_egress_would_deny(self, reason: str) -> None:
        """Count one report-mode pass-through, keeping the reason labels bounded."""
        if reason not in self.egress_would_deny and len(self.egress_would_deny) >= (
            MAX_DENIAL_REASONS
        ):
            reason = "other"
        self.egress_would_deny[reason] += 1

    def record_shadow_disagreement(self, enforced: bool, shadow: bool, reason: str) -> None:
        """Count one disagreement, keeping the set of reason labels bounded."""
        known = {label for _, _, label in self.shadow_disagreements}
        if reason not in known and len(known) >= MAX_SHADOW_REASONS:
            reason = "other"
        self.shadow_disagreements[(enforced, shadow, reason)] += 1
