"""gateway.circuit: closed, open and half-open, on a pinned clock."""

from __future__ import annotations

import logging

import pytest

from gateway.circuit import CircuitBreaker, CircuitBreakers, CircuitState, Ticket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _breaker(clock: Clock, **kwargs: int | float) -> CircuitBreaker:
    settings: dict[str, int | float] = {"failure_threshold": 3, "open_s": 10.0}
    settings.update(kwargs)
    return CircuitBreaker(clock=clock, **settings)  # type: ignore[arg-type]


def _state(breaker: CircuitBreaker) -> CircuitState:
    """The breaker's state read afresh: mypy keeps ``breaker.state`` narrowed across calls."""
    return breaker.state


def _fail(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        ticket = breaker.allow()
        assert ticket is not None
        breaker.failure(ticket)


class TestCircuitBreaker:
    def test_opens_after_consecutive_failures(self) -> None:
        """threshold consecutive failures open the circuit; then calls are refused."""
        clock = Clock()
        breaker = _breaker(clock)
        _fail(breaker, 2)
        assert _state(breaker) is CircuitState.CLOSED
        _fail(breaker, 1)
        assert _state(breaker) is CircuitState.OPEN
        assert breaker.allow() is None

    def test_success_resets_the_count(self) -> None:
        """Failures must be consecutive: a success in between starts the count again."""
        clock = Clock()
        breaker = _breaker(clock)
        _fail(breaker, 2)
        ticket = breaker.allow()
        assert ticket is not None
        breaker.success(ticket)
        _fail(breaker, 2)
        assert _state(breaker) is CircuitState.CLOSED
        assert breaker.failures == 2

    @pytest.mark.parametrize(
        ("trial_outcome", "state_after"),
        [
            pytest.param("success", CircuitState.CLOSED, id="trial-succeeds-closes"),
            pytest.param("failure", CircuitState.OPEN, id="trial-fails-reopens"),
            pytest.param("release", CircuitState.HALF_OPEN, id="trial-released-stays"),
        ],
    )
    def test_half_open_trial(self, trial_outcome: str, state_after: CircuitState) -> None:
        """After open_s one trial goes through; its outcome closes or reopens the circuit."""
        clock = Clock()
        breaker = _breaker(clock)
        _fail(breaker, 3)
        clock.now += 9.9
        assert breaker.allow() is None
        clock.now += 0.1
        assert _state(breaker) is CircuitState.HALF_OPEN
        trial = breaker.allow()
        assert trial is not None
        assert trial.trial
        assert breaker.allow() is None  # one trial at a time
        getattr(breaker, trial_outcome)(trial)
        assert _state(breaker) is state_after

    def test_reopened_circuit_waits_open_s_again(self) -> None:
        """A failed trial restarts the open period from the failure."""
        clock = Clock()
        breaker = _breaker(clock)
        _fail(breaker, 3)
        clock.now += 10
        trial = breaker.allow()
        assert trial is not None
        clock.now += 5
        breaker.failure(trial)
        clock.now += 9
        assert breaker.allow() is None
        clock.now += 1
        assert breaker.allow() is not None

    def test_half_open_allows_configured_trials(self) -> None:
        """half_open_max trials may run at once; a released trial frees its slot."""
        clock = Clock()
        breaker = _breaker(clock, half_open_max=2)
        _fail(breaker, 3)
        clock.now += 10
        first, second = breaker.allow(), breaker.allow()
        assert first is not None
        assert second is not None
        assert breaker.allow() is None
        breaker.release(first)
        assert breaker.allow() is not None

    def test_late_outcomes_do_not_judge_a_new_state(self) -> None:
        """A call that started before the circuit opened cannot close it, nor count twice."""
        clock = Clock()
        breaker = _breaker(clock)
        slow = breaker.allow()
        assert slow is not None
        _fail(breaker, 3)
        breaker.success(slow)  # from the closed generation: ignored
        assert _state(breaker) is CircuitState.OPEN
        clock.now += 10
        trial = breaker.allow()
        assert trial is not None
        breaker.failure(Ticket(generation=0, trial=False))  # stale: ignored
        assert _state(breaker) is CircuitState.HALF_OPEN
        breaker.success(trial)
        assert _state(breaker) is CircuitState.CLOSED

    @pytest.mark.parametrize(
        "kwargs",
        [
            pytest.param({"failure_threshold": 0}, id="threshold"),
            pytest.param({"open_s": 0}, id="open-s"),
            pytest.param({"half_open_max": 0}, id="half-open-max"),
        ],
    )
    def test_bad_settings_are_refused(self, kwargs: dict[str, float]) -> None:
        """Settings that would make a breaker meaningless are refused."""
        with pytest.raises(ValueError, match="failure_threshold"):
            _breaker(Clock(), **kwargs)

    def test_transitions_are_logged(self, caplog: pytest.LogCaptureFixture) -> None:
        """Opening is a warning naming the endpoint; closing again is info."""
        clock = Clock()
        breakers = CircuitBreakers(failure_threshold=1, open_s=1, clock=clock)
        breaker = breakers.get("k", label="http://agent:1")
        with caplog.at_level(logging.INFO, logger="gateway.circuit"):
            _fail(breaker, 1)
            clock.now += 1
            trial = breaker.allow()
            assert trial is not None
            breaker.success(trial)
        assert [(r.levelname, r.getMessage(), r.endpoint) for r in caplog.records] == [  # type: ignore[attr-defined]
            ("WARNING", "circuit open", "http://agent:1"),
            ("INFO", "circuit half_open", "http://agent:1"),
            ("INFO", "circuit closed", "http://agent:1"),
        ]

    def test_retry_in_counts_down_while_open(self) -> None:
        """retry_in: 0 while closed, the rest of open_s while open, 0 again once half-open."""
        clock = Clock()
        breaker = _breaker(clock, open_s=10.0)
        assert breaker.retry_in == 0.0
        _fail(breaker, 3)
        clock.now += 4.0
        assert breaker.retry_in == 6.0
        clock.now += 6.0
        assert (_state(breaker), breaker.retry_in) == (CircuitState.HALF_OPEN, 0.0)


class TestCircuitBreakers:
    def test_one_breaker_per_key_and_bounded(self) -> None:
        """Each key has its own breaker; the least recently used go past max_size."""
        breakers = CircuitBreakers(max_size=2)
        a = breakers.get("a")
        assert breakers.get("a") is a
        breakers.get("b")
        breakers.get("a")  # a is now the most recent
        breakers.get("c")
        assert len(breakers) == 2
        assert breakers.get("a") is a
        assert breakers.get("b") is not None  # recreated, fresh
