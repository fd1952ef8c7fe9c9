"""Flood control: rejections anyone can cause become counts, not records.

A caller without any credential can make the gateway reject requests as fast
as it can send them (bad signatures, rate limits, unknown routes). Writing a
durable record for each would let that caller spend the audit store's write
budget; instead those outcomes are counted per ``(source, code)`` and written
as one summary record per window, with exact counts. Everything else (policy
decisions, policy or upstream failures) is recorded one by one.

Counts live in memory until their window is written: a crash loses at most
the current window's counts, never a policy decision. The number of distinct
sources per window is capped (``max_keys``); past it, counts go to the
``*|<code>`` key, so totals stay exact while memory stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Final

from audit.chain import AppendFailed
from audit.record import Entry, Record, rfc3339

__all__ = ["ANONYMOUS_CODES", "OVERFLOW_SOURCE", "Summarizer"]

_log = logging.getLogger("audit.summary")

#: Error codes any caller can cause without a credential: summarised, not recorded one by one.
ANONYMOUS_CODES: Final = frozenset(
    {
        "bad-signature",
        "missing-signature",
        "malformed-signature",
        "malformed-request",
        "rate-limited",
        "no-route",
        "method-not-allowed",
        "payload-too-large",
        "missing-credentials",
        "invalid-token",
        "stale-request",
        "replayed-nonce",
    }
)
#: Where counts go once a window has ``max_keys`` distinct keys.
OVERFLOW_SOURCE: Final = "*"


class Summarizer:
    """Counts per ``"<source>|<code>"`` and appends one summary record per window."""

    def __init__(
        self,
        append: Callable[[Entry], Awaitable[Record]],
        *,
        window_s: float,
        clock: Callable[[], float] = time.time,
        max_keys: int = 10_000,
        keys_per_record: int = 1_000,
    ) -> None:
        self._append = append
        self._window_s = window_s
        self._clock = clock
        self._max_keys = max_keys
        self._keys_per_record = keys_per_record
        self._counts: Counter[str] = Counter()
        self._window_start: float | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def count(self, source: str, code: str) -> None:
        """Count one rejection of ``code`` for ``source`` (``tenant:<id>`` or ``ip:<addr>``)."""
        key = f"{source}|{code}"
        if key not in self._counts and len(self._counts) >= self._max_keys:
            key = f"{OVERFLOW_SOURCE}|{code}"
        if self._window_start is None:
            self._window_start = self._clock()
        self._counts[key] += 1

    @property
    def pending(self) -> int:
        """Rejections counted but not yet written."""
        return sum(self._counts.values())

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-summary")

    async def close(self) -> None:
        """Stop the timer and write what has been counted."""
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        await self.flush()

    async def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._window_s)
            if not self._stop.is_set():
                await self.flush()

    async def flush(self) -> list[Record]:
        """Write the current window's counts; on failure keep them for the next window."""
        if not self._counts or self._window_start is None:
            return []
        counts, self._counts = self._counts, Counter()
        start, self._window_start = self._window_start, None
        end = self._clock()
        keys = sorted(counts)
        chunks = [
            keys[i : i + self._keys_per_record] for i in range(0, len(keys), self._keys_per_record)
        ]
        written: list[Record] = []
        for index, chunk in enumerate(chunks):
            entry = Entry(
                outcome="summary",
                window_start=rfc3339(start),
                window_end=rfc3339(end),
                counts={key: counts[key] for key in chunk},
            )
            try:
                written.append(await self._append(entry))
            except AppendFailed as exc:
                # Keep the exact counts: they go into the next window's record.
                for key in (k for rest in chunks[index:] for k in rest):
                    self._counts[key] += counts[key]
                current = self._window_start
                self._window_start = start if current is None else min(start, current)
                _log.error("audit summary not written; retrying", extra={"error": str(exc)})
                break
        return written
