"""crmcache._guard without Redis: the circuit breaker and log throttle on an injected
clock, and the classification of errors (connection failure, full pool, topology moved,
critical)."""

from __future__ import annotations

from typing import Any

import pytest
from redis._parsers.base import BaseParser as _Parser
from redis.exceptions import (
    AuthenticationError,
    NoPermissionError,
    OutOfMemoryError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from crmcache._guard import (
    POOL_EXHAUSTED,
    TOPOLOGY_ERRORS,
    BreakerState,
    CircuitBreaker,
    LogThrottle,
    PoolExhaustedError,
    is_connection_failure,
    is_critical,
    is_pool_exhausted,
    is_topology_moved,
    new_breaker,
    slow_call_threshold,
    stalled_by_redis,
)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def open_breaker(
    clock: Clock, *, threshold: int = 2, reset: float = 1.0, max_reset: float = 30.0
) -> CircuitBreaker:
    """A breaker on ``clock`` that has just opened (at ``clock.now``)."""
    breaker = CircuitBreaker(
        failure_threshold=threshold, reset_timeout=reset, max_reset_timeout=max_reset, clock=clock
    )
    for _ in range(threshold):
        breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    return breaker


def wait_for_probe(breaker: CircuitBreaker, clock: Clock, step: float = 0.5) -> float:
    """Advance ``clock`` by ``step`` until the breaker lets a probe through; return the
    seconds waited."""
    started = clock.now
    for _ in range(1000):
        clock.now += step
        if breaker.allow():
            return clock.now - started
    raise AssertionError("the breaker never let a probe through")


def probe_and_fail(breaker: CircuitBreaker) -> None:
    """Let the due probe through and have it fail."""
    assert breaker.allow() is True
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.record_failure() is False
    assert breaker.state is BreakerState.OPEN


# -- CircuitBreaker -------------------------------------------------------------------------


@pytest.mark.parametrize("failures", [1, 2, 7])
def test_configured_breaker_opens_after_exactly_n_failures(failures: int) -> None:
    """new_breaker(N, ...) stays closed for N - 1 consecutive failures and opens on the Nth."""
    breaker = new_breaker(failures, 30.0, clock=Clock())
    for _ in range(failures - 1):
        assert breaker.record_failure() is False
        assert breaker.state is BreakerState.CLOSED
    assert breaker.record_failure() is True
    assert breaker.state is BreakerState.OPEN


@pytest.mark.parametrize(
    ("max_backoff", "waits"),
    [
        (30.0, [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]),
        (5.0, [1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0, 5.0]),
        (0.25, [0.25] * 8),
    ],
)
def test_configured_backoff_doubles_and_never_exceeds_the_maximum(
    max_backoff: float, waits: list[float]
) -> None:
    """The wait before each probe doubles from 1 s (or the maximum, if shorter) after
    every failed probe and is capped at breaker_max_backoff."""
    clock = Clock()
    breaker = new_breaker(2, max_backoff, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    seen = []
    for _ in waits:
        seen.append(wait_for_probe(breaker, clock, step=0.125))  # the probe goes ...
        assert breaker.state is BreakerState.HALF_OPEN
        breaker.record_failure()  # ... and fails
        assert breaker.state is BreakerState.OPEN
    assert seen == waits
    assert max(seen) <= max_backoff


def test_breaker_unit_transitions() -> None:
    """Closed -> open after the threshold -> half-open probe -> closed on success."""
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=1.0, clock=lambda: now[0])
    for _ in range(2):
        assert breaker.allow()
        assert breaker.record_failure() is False
    assert breaker.record_failure() is True
    assert breaker.state is BreakerState.OPEN
    assert breaker.allow() is False
    now[0] = 1.0
    assert breaker.allow() is True  # the probe
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow() is False  # only one probe at a time
    breaker.record_failure()  # probe failed: wait twice as long
    now[0] = 2.5
    assert breaker.allow() is False
    now[0] = 3.0
    assert breaker.allow() is True
    assert breaker.record_success() is True
    assert breaker.state is BreakerState.CLOSED
    assert (breaker.trips, breaker.recoveries) == (1, 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"failure_threshold": 0}, "failure_threshold must be > 0, got 0"),
        ({"reset_timeout": 0.0}, "reset_timeout must be > 0"),
        ({"reset_timeout": 5.0, "max_reset_timeout": 4.0}, "<= max_reset_timeout"),
    ],
)
def test_breaker_rejects_bad_settings(kwargs: dict[str, Any], message: str) -> None:
    """A threshold below 1, a non-positive timeout or a max below the base is refused."""
    with pytest.raises(ValueError, match=message):
        CircuitBreaker(**kwargs)


def test_only_consecutive_failures_open_the_breaker() -> None:
    """A success in between starts the count again: threshold - 1 failures twice stay closed."""
    breaker = CircuitBreaker(failure_threshold=3, clock=Clock())
    for _ in range(2):
        breaker.record_failure()
        breaker.record_failure()
        assert breaker.record_success() is False  # closed already: no recovery
    assert breaker.state is BreakerState.CLOSED
    assert breaker.record_failure() is False
    assert breaker.record_failure() is False
    assert breaker.record_failure() is True
    assert (breaker.state, breaker.trips, breaker.recoveries) == (BreakerState.OPEN, 1, 0)


def test_open_breaker_short_circuits_until_the_reset_timeout() -> None:
    """Open, every call is refused and counted until exactly reset_timeout has passed."""
    clock = Clock()
    clock.now = 10.0
    breaker = open_breaker(clock, reset=2.0)
    clock.now = 11.999
    assert [breaker.allow() for _ in range(3)] == [False, False, False]
    assert breaker.short_circuited == 3
    clock.now = 12.0
    assert breaker.allow() is True
    assert breaker.short_circuited == 3


def test_half_open_lets_a_single_probe_through() -> None:
    """Once the timeout passed, one call probes; the others short-circuit while it runs."""
    clock = Clock()
    breaker = open_breaker(clock)
    clock.now = 1.0
    assert [breaker.allow() for _ in range(4)] == [True, False, False, False]
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.short_circuited == 3


def test_failed_probe_doubles_the_timeout_up_to_the_max() -> None:
    """Each failed probe doubles the wait for the next one (1, 2, 4), capped at the max (5)."""
    clock = Clock()
    breaker = open_breaker(clock, reset=1.0, max_reset=5.0)
    waits = []
    for _ in range(5):
        waits.append(wait_for_probe(breaker, clock))
        assert breaker.record_failure() is False  # a failed probe is no new trip
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert breaker.trips == 1


def test_success_resets_the_timeout_to_the_base() -> None:
    """After a recovery the next outage probes after reset_timeout again, not the backoff."""
    clock = Clock()
    breaker = open_breaker(clock, reset=1.0)
    clock.now = 1.0
    probe_and_fail(breaker)  # the next wait is 2 s
    clock.now = 3.0
    assert breaker.allow() is True
    assert breaker.record_success() is True
    for _ in range(2):
        breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    clock.now = 4.0
    assert breaker.allow() is True
    assert breaker.trips == 2


def test_release_probe_lets_the_next_call_probe_at_once() -> None:
    """A probe released without an answer re-opens the breaker with the probe already due."""
    clock = Clock()
    breaker = open_breaker(clock, reset=1.0)
    clock.now = 1.0
    probe_and_fail(breaker)  # timeout now 2 s: the next probe would be due at 3.0
    clock.now = 3.0
    assert breaker.allow() is True
    breaker.release_probe()
    assert breaker.state is BreakerState.OPEN
    assert breaker.allow() is True  # no wait: the next call is the probe
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow() is False  # and still only one
    breaker.record_failure()
    clock.now = 6.999  # a released probe kept the backoff: this failure doubled 2 s to 4 s
    assert breaker.allow() is False
    clock.now = 7.0
    assert breaker.allow() is True


def test_release_probe_does_nothing_unless_half_open() -> None:
    """Released while open (no probe out) it does not shorten the wait; closed, it stays closed."""
    clock = Clock()
    closed = CircuitBreaker(clock=clock)
    closed.release_probe()
    assert closed.state is BreakerState.CLOSED
    breaker = open_breaker(clock, reset=1.0)
    breaker.release_probe()
    assert breaker.state is BreakerState.OPEN
    assert breaker.allow() is False


def test_success_while_open_counts_a_recovery() -> None:
    """A success recorded on an open breaker (no probe) closes it and counts a recovery."""
    clock = Clock()
    breaker = open_breaker(clock)
    assert breaker.record_success() is True
    assert breaker.state is BreakerState.CLOSED
    assert (breaker.trips, breaker.recoveries) == (1, 1)
    assert breaker.allow() is True
    assert breaker.record_success() is False  # closed and clean: nothing to recover
    assert breaker.recoveries == 1


def test_reset_closes_and_forgets_failures() -> None:
    """reset() closes an open breaker and the failure count starts from zero."""
    clock = Clock()
    breaker = open_breaker(clock, threshold=2)
    breaker.reset()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow() is True
    assert breaker.record_failure() is False  # one failure, not threshold + 1
    assert breaker.state is BreakerState.CLOSED


# -- LogThrottle ----------------------------------------------------------------------------


def test_throttle_lets_one_line_per_interval_and_counts_the_rest() -> None:
    """The first line passes; lines within the interval are held back and counted."""
    clock = Clock()
    throttle = LogThrottle(10.0, clock)
    assert throttle.ready() == 0
    clock.now = 9.999
    assert [throttle.ready() for _ in range(3)] == [None, None, None]
    clock.now = 10.0
    assert throttle.ready() == 3
    clock.now = 15.0
    assert throttle.ready() is None
    clock.now = 20.0
    assert throttle.ready() == 1


def test_throttle_force_logs_now_and_restarts_the_interval() -> None:
    """force=True passes within the interval, reports what was held back, restarts the wait."""
    clock = Clock()
    throttle = LogThrottle(10.0, clock)
    assert throttle.ready() == 0
    clock.now = 1.0
    assert throttle.ready() is None
    assert throttle.ready(force=True) == 1
    clock.now = 10.5  # 10 s since the first line, but only 9.5 s since the forced one
    assert throttle.ready() is None


def test_throttle_reset_returns_the_held_back_count_and_rearms() -> None:
    """reset() returns how many lines were held back, and the next line passes at once."""
    clock = Clock()
    throttle = LogThrottle(10.0, clock)
    throttle.ready()
    clock.now = 1.0
    throttle.ready()
    throttle.ready()
    assert throttle.reset() == 2
    assert throttle.ready() == 0
    assert throttle.reset() == 0


# -- error classification -------------------------------------------------------------------


def test_full_pool_is_exhaustion_not_a_connection_failure() -> None:
    """A full pool (its own class) means saturated, not down, and needs no person."""
    exc = PoolExhaustedError()
    assert str(exc) == POOL_EXHAUSTED
    assert is_pool_exhausted(exc) is True
    assert is_connection_failure(exc) is False
    assert is_critical(exc) is False


@pytest.mark.parametrize(
    ("slots", "waited", "released", "hold", "stalled"),
    [
        (10, 1.0, 0, 1.0, True),  # nothing came free in the whole wait: Redis hangs
        (10, 1.0, 5, 2.0, True),  # two seconds per call: Redis is slow
        (10, 1.0, 20, 0.5, True),  # exactly the threshold (0.1 x 5 s)
        (10, 1.0, 1000, 0.01, False),  # 10 ms per call: the pool is too small
        (1, 0.1, 400, 0.00025, False),
        (None, 1.0, None, None, False),  # not known: not blamed on Redis
    ],
)
def test_saturation_cause_from_what_the_waiter_saw(
    slots: int | None, waited: float, released: int | None, hold: float | None, stalled: bool
) -> None:
    """A full pool is blamed on Redis when no call got its reply during the wait, or
    calls held their connections >= 10 % of socket_timeout on average; else on the pool."""
    exc = PoolExhaustedError(slots=slots, waited=waited, released=released)
    assert exc.hold_time == (None if hold is None else pytest.approx(hold))
    assert stalled_by_redis(exc, slow_call_threshold(5.0)) is stalled
    assert is_pool_exhausted(exc) is True


def test_exhaustion_is_known_by_class_not_by_message() -> None:
    """A ConnectionError that only says 'No connection available.' is not taken for a full
    pool: classification never matches messages by string equality."""
    exc = RedisConnectionError(POOL_EXHAUSTED)
    assert is_pool_exhausted(exc) is False
    assert is_connection_failure(exc) is True


@pytest.mark.parametrize(
    "reply",
    [
        "MOVED 3999 127.0.0.1:7001",
        "ASK 3999 127.0.0.1:7001",
        "READONLY You can't write against a read only replica.",
        "TRYAGAIN Multiple keys request during rehashing of slot",
        "CLUSTERDOWN Hash slot not served",
        "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
    ],
)
def test_topology_replies_are_their_own_class(reply: str) -> None:
    """Each reply saying the topology moved, parsed as redis-py parses it, is a topology
    error: not a connection failure, not exhaustion, not critical."""
    exc = _Parser.parse_error(reply)
    assert is_topology_moved(exc) is True
    assert isinstance(exc, TOPOLOGY_ERRORS)
    assert is_connection_failure(exc) is False
    assert is_pool_exhausted(exc) is False
    assert is_critical(exc) is False


def test_plain_refusals_are_not_topology_errors() -> None:
    """OOM, WRONGTYPE and a script error are refusals, not a moved topology."""
    for reply in ("OOM command not allowed", "WRONGTYPE Operation", "ERR user_script:1: x"):
        assert is_topology_moved(_Parser.parse_error(reply)) is False


def test_breaker_snapshot_shows_state_and_tallies() -> None:
    """snapshot() is what the stats show: the state's value, the three tallies and the
    transitions into each state."""
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=1.0, clock=clock)
    breaker.record_failure()
    assert breaker.allow() is False
    assert breaker.snapshot() == {
        "state": "open",
        "trips": 1,
        "recoveries": 0,
        "short_circuited": 1,
        "transitions": {"closed": 0, "open": 1, "half_open": 0},
    }


def test_breaker_counts_every_transition() -> None:
    """Each state entered is counted once per entry: closed -> open (trip), open ->
    half_open (probe), half_open -> open (failed probe, and a released probe), half_open
    -> closed (recovery); staying in a state counts nothing."""
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout=1.0, clock=clock)
    breaker.record_failure()
    assert breaker.transitions == dict.fromkeys(BreakerState, 0)  # still closed
    breaker.record_failure()  # closed -> open
    clock.now += 1.0
    assert breaker.allow() is True  # open -> half_open
    breaker.record_failure()  # half_open -> open (the probe failed)
    clock.now += 2.0
    assert breaker.allow() is True  # open -> half_open
    breaker.release_probe()  # half_open -> open
    assert breaker.allow() is True  # open -> half_open at once
    assert breaker.record_success() is True  # half_open -> closed
    assert breaker.record_success() is False  # closed stays closed
    breaker.reset()  # already closed: nothing
    assert breaker.transitions == {
        BreakerState.OPEN: 3,
        BreakerState.HALF_OPEN: 3,
        BreakerState.CLOSED: 1,
    }
    assert breaker.trips == 1
    assert breaker.recoveries == 1


@pytest.mark.parametrize(
    "exc",
    [
        RedisConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused."),
        RedisTimeoutError("Timeout reading from socket"),
        ConnectionResetError(104, "Connection reset by peer"),
        OSError(113, "No route to host"),
    ],
    ids=["refused", "redis-timeout", "reset", "oserror"],
)
def test_unreachable_redis_is_a_connection_failure(exc: BaseException) -> None:
    """Connection errors, timeouts and OSErrors count towards the breaker; none is a full pool."""
    assert is_connection_failure(exc) is True
    assert is_pool_exhausted(exc) is False


@pytest.mark.parametrize(
    "exc",
    [
        ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'."),
        NoPermissionError("this user has no permissions to run the 'get' command"),
        ValueError(POOL_EXHAUSTED),
    ],
    ids=["wrongtype", "oom", "noperm", "not-a-redis-error"],
)
def test_refusals_are_neither_connection_failures_nor_a_full_pool(exc: BaseException) -> None:
    """A reply from Redis (or a non-Redis error with the pool's message) says Redis is up."""
    assert is_connection_failure(exc) is False
    assert is_pool_exhausted(exc) is False


@pytest.mark.parametrize(
    "exc",
    [
        AuthenticationError("invalid username-password pair or user is disabled."),
        NoPermissionError("this user has no permissions to run the 'evalsha' command"),
        ResponseError("NOPERM User app has no permissions to access the 'other' key"),
        RedisConnectionError(
            "Error 1 connecting to localhost:6380. [SSL: CERTIFICATE_VERIFY_FAILED] "
            "certificate verify failed: self-signed certificate (_ssl.c:1000)."
        ),
        ResponseError("Error running script (call to f_0123): @user_script:1: bad argument"),
        ResponseError("user_script:3: Script attempted to access nonexistent global variable"),
    ],
    ids=["auth", "noperm-class", "noperm-text", "tls", "script-error", "user-script"],
)
def test_failures_that_need_a_person_are_critical(exc: BaseException) -> None:
    """Bad credentials, missing ACL permissions, untrusted TLS and script bugs are critical."""
    assert is_critical(exc) is True


@pytest.mark.parametrize(
    "exc",
    [
        OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'."),
        ResponseError(
            "OOM command not allowed when used memory > 'maxmemory'. script: f_0123, "
            "on @user_script:5."
        ),
        ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        RedisConnectionError("Connection refused"),
        RedisTimeoutError("Timeout reading from socket"),
    ],
    ids=["oom", "oom-inside-script", "wrongtype", "refused", "timeout"],
)
def test_transient_failures_are_not_critical(exc: BaseException) -> None:
    """Full memory (even inside a script), wrong types and outages need a retry, not a person."""
    assert is_critical(exc) is False
