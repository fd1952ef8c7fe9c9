"""Circuit breakers, one per upstream endpoint: closed, open, half-open.

*Closed*: calls go through; ``failure_threshold`` consecutive failures open
the circuit. *Open*: calls are refused without being tried, for
``open_s`` seconds. *Half-open*: then up to ``half_open_max`` trial calls
go through at once; a trial that succeeds closes the circuit, one that fails
opens it again for another ``open_s``.

Every permitted call holds a :class:`Ticket` and reports exactly one outcome
for it (:meth:`CircuitBreaker.success`, :meth:`~CircuitBreaker.failure`, or
:meth:`~CircuitBreaker.release` when it ended without a verdict, e.g. the
client went away). Tickets carry the generation of the state that issued
them, so a slow call that started before a state change cannot judge the
new state: only trials judge a half-open circuit, and a late success from
before an opening does not close it.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Final

__all__ = ["CircuitBreaker", "CircuitBreakers", "CircuitState", "Ticket"]

_log = logging.getLogger("gateway.circuit")


class CircuitState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class Ticket:
    """Permission for one call; report its outcome to the breaker that issued it."""

    generation: int
    trial: bool


StateListener = Callable[[CircuitState, CircuitState], None]


class CircuitBreaker:
    """The breaker of one endpoint. Not thread-safe; one event loop."""

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        open_s: float = 5.0,
        half_open_max: int = 1,
        clock: Callable[[], float] = time.monotonic,
        on_change: StateListener | None = None,
    ) -> None:
        if failure_threshold < 1 or open_s <= 0 or half_open_max < 1:
            raise ValueError("need failure_threshold >= 1, open_s > 0, half_open_max >= 1")
        self._threshold = failure_threshold
        self._open_s = open_s
        self._half_open_max = half_open_max
        self._clock = clock
        self._on_change = on_change
        self._state = CircuitState.CLOSED
        self._generation = 0
        self._failures = 0
        self._opened_at = 0.0
        self._trials = 0

    @property
    def state(self) -> CircuitState:
        self._refresh()
        return self._state

    @property
    def retry_in(self) -> float:
        """Seconds until an open circuit lets a trial through; 0 unless open."""
        if self.state is not CircuitState.OPEN:
            return 0.0
        return max(self._open_s - (self._clock() - self._opened_at), 0.0)

    @property
    def failures(self) -> int:
        """Consecutive failures counted while closed."""
        return self._failures

    def allow(self) -> Ticket | None:
        """A ticket if a call may go through now, else None (the circuit is open)."""
        self._refresh()
        if self._state is CircuitState.CLOSED:
            return Ticket(self._generation, trial=False)
        if self._state is CircuitState.HALF_OPEN and self._trials < self._half_open_max:
            self._trials += 1
            return Ticket(self._generation, trial=True)
        return None

    def success(self, ticket: Ticket) -> None:
        if not self._current(ticket):
            return
        if ticket.trial:
            self._trials -= 1
            self._move(CircuitState.CLOSED)
        else:
            self._failures = 0

    def failure(self, ticket: Ticket) -> None:
        if not self._current(ticket):
            return
        if ticket.trial:
            self._trials -= 1
            self._move(CircuitState.OPEN)
            return
        self._failures += 1
        if self._failures >= self._threshold:
            self._move(CircuitState.OPEN)

    def release(self, ticket: Ticket) -> None:
        """The call ended without telling anything about the endpoint."""
        if self._current(ticket) and ticket.trial:
            self._trials -= 1

    def _current(self, ticket: Ticket) -> bool:
        self._refresh()
        return ticket.generation == self._generation

    def _refresh(self) -> None:
        if self._state is CircuitState.OPEN and self._clock() - self._opened_at >= self._open_s:
            self._move(CircuitState.HALF_OPEN)

    def _move(self, state: CircuitState) -> None:
        old = self._state
        self._state = state
        self._generation += 1
        self._failures = 0
        self._trials = 0
        if state is CircuitState.OPEN:
            self._opened_at = self._clock()
        if self._on_change is not None and old is not state:
            self._on_change(old, state)


class CircuitBreakers:
    """Breakers by key (an endpoint), created on first use, at most ``max_size`` kept."""

    DEFAULT_MAX_SIZE: Final = 10_000

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        open_s: float = 5.0,
        half_open_max: int = 1,
        clock: Callable[[], float] = time.monotonic,
        max_size: int = DEFAULT_MAX_SIZE,
    ) -> None:
        self._settings = (failure_threshold, open_s, half_open_max)
        self._clock = clock
        self._max = max_size
        self._breakers: OrderedDict[Hashable, CircuitBreaker] = OrderedDict()

    def __len__(self) -> int:
        return len(self._breakers)

    def states(self) -> list[CircuitState]:
        """The state of every breaker kept (for the circuit_state metric)."""
        return [breaker.state for breaker in self._breakers.values()]

    def get(self, key: Hashable, *, label: str = "") -> CircuitBreaker:
        """The breaker for ``key``; ``label`` names it in logs (never a secret)."""
        breaker = self._breakers.get(key)
        if breaker is None:
            threshold, open_s, half_open_max = self._settings
            breaker = CircuitBreaker(
                failure_threshold=threshold,
                open_s=open_s,
                half_open_max=half_open_max,
                clock=self._clock,
                on_change=lambda old, new: _log_change(label, old, new),
            )
            self._breakers[key] = breaker
            if len(self._breakers) > self._max:
                self._breakers.popitem(last=False)  # least recently used
        else:
            self._breakers.move_to_end(key)
        return breaker


def _log_change(label: str, old: CircuitState, new: CircuitState) -> None:
    level = logging.WARNING if new is CircuitState.OPEN else logging.INFO
    _log.log(level, "circuit %s", new.value, extra={"endpoint": label, "from": old.value})
