"""The gateway's side of the audit log: what a request's record says, and when.

- An allowed request is recorded by the ``audit`` stage, and goes on to the
  ``route`` stage only once its record is durable.
- A request ended by a :class:`~gateway.errors.GatewayError` at any stage is
  recorded at the HTTP edge before its problem response is sent: one record
  per policy denial, policy or upstream failure; a count in the window's
  summary record for the rejections any caller can cause
  (:data:`audit.ANONYMOUS_CODES`).
- If a record cannot be made durable the answer is 503 ``audit-unavailable``
  and nothing is forwarded.

Records carry identifiers and a digest of the policy input, never headers,
tokens or signatures.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from audit import (
    ANONYMOUS_CODES,
    AppendFailed,
    AuditLog,
    AuditSettings,
    Entry,
    Summarizer,
    digest_document,
    open_audit_log,
)
from audit.record import Outcome
from gateway.config import Config
from gateway.context import RequestContext
from gateway.errors import AuditUnavailable, GatewayError
from gateway.telemetry import operation

__all__ = ["AuditRecorder", "audit_recorder", "audit_settings"]

_log = logging.getLogger("gateway.audit")


class AuditRecorder:
    """Turns request outcomes into audit entries."""

    def __init__(self, log: AuditLog, summarizer: Summarizer) -> None:
        self.log = log
        self.summarizer = summarizer

    async def record_allow(self, ctx: RequestContext) -> None:
        """Append the allow decision; raise AuditUnavailable if it is not durable."""
        # Report mode: allowed, but the record says what enforce mode would have done.
        code = "enforce_would_deny" if ctx.egress_would_deny else None
        await self._append(ctx, _entry(ctx, "allow", status=None, code=code, reasons=None))

    async def record_outcome(self, ctx: RequestContext, error: GatewayError) -> None:
        """Record a request the pipeline ended with ``error`` (the edge's hook)."""
        if isinstance(error, AuditUnavailable):
            return  # by construction there is nowhere durable to record it
        if error.code in ANONYMOUS_CODES:
            source = f"tenant:{ctx.tenant.id}" if ctx.tenant else f"ip:{ctx.client_ip}"
            self.summarizer.count(source, error.code)
            return
        outcome: Outcome = "error" if error.status >= 500 else "deny"
        decision_id = error.extra.get("decision_id")
        entry = _entry(
            ctx,
            outcome,
            status=error.status,
            code=error.code,
            reasons=error.reasons,
            decision_id=decision_id if isinstance(decision_id, str) else None,
        )
        await self._append(ctx, entry)

    async def _append(self, ctx: RequestContext, entry: Entry) -> None:
        try:
            with operation("audit"):
                record = await self.log.append(entry)
        except AppendFailed:
            raise AuditUnavailable(
                "the decision could not be recorded; the request was not forwarded"
            ) from None
        ctx.audit_seq = record.seq


def _entry(
    ctx: RequestContext,
    outcome: Outcome,
    *,
    status: int | None,
    code: str | None,
    reasons: tuple[str, ...] | None,
    decision_id: str | None = None,
) -> Entry:
    decision = ctx.decision
    if decision is not None:
        decision_id = decision.decision_id
    if reasons is None:
        reasons = decision.reasons if decision is not None else ()
    return Entry(
        outcome=outcome,
        stage=ctx.stage,
        request_id=ctx.request_id,
        decision_id=decision_id,
        tenant=ctx.tenant.id if ctx.tenant else None,
        subject=ctx.subject.sub,
        status=status,
        code=code,
        reasons=tuple(reasons),
        policy_revision=(decision.revision or None) if decision is not None else None,
        input_digest=_input_digest(ctx),
    )


def _input_digest(ctx: RequestContext) -> str | None:
    if ctx.policy_input is None:
        return None
    try:
        return digest_document(ctx.policy_input)
    except ValueError:  # not canonicalisable (an integer past 2**53): never expected
        _log.warning("policy input has no canonical form; recorded without a digest")
        return None


def audit_settings(config: Config) -> AuditSettings:
    audit = config.audit
    return AuditSettings(
        store=audit.store,
        path=Path(audit.path),
        dsn=audit.dsn or config.dependencies.postgres_dsn,
        chain_id=audit.chain_id,
        spool_path=Path(audit.spool_path),
        checkpoint_every=audit.checkpoint_every,
        checkpoint_interval_s=audit.checkpoint_interval_s,
        signing_key_file=audit.signing_key_file,
        batch_max=audit.batch_max,
    )


@asynccontextmanager
async def audit_recorder(
    config: Config, *, clock: Callable[[], float] = time.time
) -> AsyncIterator[AuditRecorder]:
    """Open the audit log; on exit write the summaries, a final checkpoint, and close."""
    try:
        log = await open_audit_log(audit_settings(config), clock=clock)
    except Exception as exc:
        # The message names the file or the database problem; never the DSN.
        _log.error("audit log cannot start", extra={"error": f"{type(exc).__name__}: {exc}"})
        raise
    summarizer = Summarizer(log.append, window_s=config.audit.summary_window_s, clock=clock)
    await summarizer.start()
    try:
        yield AuditRecorder(log, summarizer)
    finally:
        try:
            await summarizer.close()
        finally:
            await log.close()
