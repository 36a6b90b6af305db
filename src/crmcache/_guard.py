"""Failure handling: the circuit breaker and the log throttle around every Redis call.

The cache must never break its caller. A Redis error becomes a miss (reads), a no-op
(writes) or the rate-limit failure policy, and is counted and logged: the first failure of
an outage at WARNING, then at most one summary line per ``log_interval`` seconds, and one
line when Redis answers again.

The breaker stops paying a timeout on every call while Redis is down: after
``failure_threshold`` consecutive connection failures it opens, and calls short-circuit
(microseconds) until ``reset_timeout`` has passed; then one call is let through as a
probe. Success closes the breaker; failure re-opens it with the timeout doubled, up to
``max_reset_timeout``.

Failures fall in four classes, each logged on its own throttle:

* **outage**: the node could not be reached (``ConnectionError``, ``TimeoutError``,
  ``OSError``). Only these count towards the breaker.
* **refusal**: the node answered with an error (``OOM``, ``NOPERM``, ``WRONGTYPE``, a
  script error). It is up: a refusal closes the breaker like a success.
* **topology moved**: the node answered ``MOVED``, ``ASK``, ``READONLY``, ``TRYAGAIN``,
  ``CLUSTERDOWN`` or ``MASTERDOWN`` (:data:`TOPOLOGY_ERRORS`): the key lives elsewhere now,
  or the node stopped (or has not yet started) being a writable primary. Neither an outage
  nor a refusal: the breaker is left as it is, and the call degrades.
* **protocol error**: a reply broke its command's contract (``crmcache._replies``): a
  buggy server or a stream out of step. The pool has closed that connection; the call
  degrades, the breaker is left as it is, and one ERROR per interval says so.
* **saturation**: no pooled connection came free in time (:class:`PoolExhaustedError`).

What is logged never holds the password (:class:`SecretMask`): not the whole of it, and no
run of :data:`MIN_SECRET_RUN` of its characters either, since servers echo it truncated and
with newlines turned into spaces. An error raised by the connection handshake (``AUTH``,
``HELLO``, ``CLIENT SETNAME``, ``SELECT``) is never logged with its text at all
(:func:`describe_failure`): a server with ``AUTH`` renamed answers "unknown command 'AUTH',
with args beginning with: '<the password>'".
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
import traceback
from collections.abc import Callable
from enum import StrEnum
from typing import Final
from urllib.parse import quote, quote_plus

from redis.exceptions import (
    AskError,
    AuthenticationError,
    ClusterDownError,
    MasterDownError,
    MovedError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ._replies import ProtocolError

__all__ = [
    "FAILED",
    "MIN_SECRET_RUN",
    "POOL_EXHAUSTED",
    "SLOW_CALL_SHARE",
    "TOPOLOGY_ERRORS",
    "BreakerState",
    "CircuitBreaker",
    "Guard",
    "LogThrottle",
    "PoolClosedError",
    "PoolExhaustedError",
    "SecretMask",
    "describe_failure",
    "is_critical",
    "is_handshake_error",
    "is_topology_moved",
    "new_breaker",
    "slow_call_threshold",
    "stalled_by_redis",
]

logger = logging.getLogger("crmcache")


DEFAULT_FAILURE_THRESHOLD = 5
DEFAULT_RESET_TIMEOUT = 1.0
DEFAULT_MAX_RESET_TIMEOUT = 30.0
DEFAULT_LOG_INTERVAL = 30.0

#: Distinct (operation, error) kinds with a log throttle of their own.
_MAX_REFUSAL_KINDS = 256
#: The message of :class:`PoolExhaustedError` (redis-py's own pool says the same).
POOL_EXHAUSTED = "No connection available."
#: Error replies that mean the topology moved (redis-py maps each reply to its class).
TOPOLOGY_ERRORS: Final = (
    MovedError,
    AskError,
    ReadOnlyError,
    TryAgainError,
    ClusterDownError,
    MasterDownError,
)


class PoolExhaustedError(RedisConnectionError):
    """No pooled connection came free within the pool timeout (saturated, not down).

    Attributes:
        slots: the pool's size (None: not known).
        waited: seconds the caller waited for a connection.
        released: connections given back by other calls during that wait (None: not
            known). None given back means every connection was held by a call that got
            no reply for the whole wait: Redis is slow or hung, not the pool too small.
    """

    def __init__(
        self, *, slots: int | None = None, waited: float = 0.0, released: int | None = None
    ) -> None:
        super().__init__(POOL_EXHAUSTED)
        self.slots = slots
        self.waited = waited
        self.released = released

    @property
    def hold_time(self) -> float | None:
        """Seconds a call held its connection during the wait, on average (Little's law:
        ``slots`` held throughout, ``released`` given back in ``waited`` seconds); when
        none was given back, every call had held its connection for the whole wait (a
        lower bound). None when not known."""
        if self.slots is None or self.released is None:
            return None
        if self.released == 0:
            return self.waited
        return self.slots * self.waited / self.released


#: Calls that hold their connections this share of ``socket_timeout`` on average are
#: waiting on a slow Redis: a full pool is then its fault, not the pool's size.
SLOW_CALL_SHARE = 0.1


def slow_call_threshold(socket_timeout: float) -> float:
    """Seconds of average connection hold time past which a full pool is blamed on a
    slow Redis (see :func:`stalled_by_redis`)."""
    return SLOW_CALL_SHARE * socket_timeout


def stalled_by_redis(exc: PoolExhaustedError, slow_call: float) -> bool:
    """True if the calls holding the connections were waiting on Redis: not one of them
    got its reply during the whole wait (a hung Redis), or they held their connections
    ``slow_call`` seconds or longer on average (a slow one). False for a pool too small
    for quick calls, or when not known."""
    hold = exc.hold_time
    if hold is None:
        return False
    return exc.released == 0 or hold >= slow_call


class PoolClosedError(RedisConnectionError):
    """The pool was closed (the manager is closing): the call was not sent."""

    def __init__(self) -> None:
        super().__init__("the connection pool is closed")


class _Failed:
    """Sentinel type: the guarded call failed and was degraded."""

    def __repr__(self) -> str:
        return "FAILED"


FAILED: Final = _Failed()


class BreakerState(StrEnum):
    """State of the circuit breaker."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


#: The hot path's test, without the enum's attribute lookup on every call.
_CLOSED: Final = BreakerState.CLOSED


class CircuitBreaker:
    """Consecutive-failure circuit breaker with a single half-open probe.

    Thread-safe. ``allow()`` on a closed breaker takes no lock.
    """

    def __init__(
        self,
        *,
        failure_threshold: int = DEFAULT_FAILURE_THRESHOLD,
        reset_timeout: float = DEFAULT_RESET_TIMEOUT,
        max_reset_timeout: float = DEFAULT_MAX_RESET_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold <= 0:
            raise ValueError(f"failure_threshold must be > 0, got {failure_threshold}")
        if reset_timeout <= 0 or max_reset_timeout < reset_timeout:
            raise ValueError("reset_timeout must be > 0 and <= max_reset_timeout")
        self._threshold = failure_threshold
        self._base_timeout = reset_timeout
        self._max_timeout = max_reset_timeout
        self._clock = clock
        self._lock = threading.Lock()
        self.state = BreakerState.CLOSED
        self.failures = 0
        self._timeout = reset_timeout
        self._opened_at = 0.0
        self.trips = 0
        self.recoveries = 0
        self.short_circuited = 0
        #: Transitions into each state (closed -> open, open -> half_open, half_open ->
        #: open or closed ...), counted under the lock.
        self.transitions = dict.fromkeys(BreakerState, 0)

    def allow(self) -> bool:
        """True if a call may go to Redis now."""
        if self.state is _CLOSED:
            return True
        return self._allow_when_not_closed()

    def _allow_when_not_closed(self) -> bool:
        with self._lock:
            state = self.state
            # Another thread may have closed it while we waited for the lock.
            if state is BreakerState.CLOSED:
                return True
            if state is BreakerState.OPEN and self._clock() - self._opened_at >= self._timeout:
                self._enter(BreakerState.HALF_OPEN)
                return True
            self.short_circuited += 1
            return False

    def record_success(self) -> bool:
        """Note a successful call. Returns True if this closed an open breaker."""
        if self.state is _CLOSED and self.failures == 0:
            return False
        with self._lock:
            recovered = self.state is not BreakerState.CLOSED
            if recovered:
                self._enter(BreakerState.CLOSED)
            self.failures = 0
            self._timeout = self._base_timeout
            if recovered:
                self.recoveries += 1
            return recovered

    def record_failure(self) -> bool:
        """Note a connection failure. Returns True if this opened the breaker."""
        with self._lock:
            self.failures += 1
            if self.state is BreakerState.HALF_OPEN:
                # The probe failed: wait longer before the next one.
                self._timeout = min(self._timeout * 2, self._max_timeout)
                self._enter(BreakerState.OPEN)
                self._opened_at = self._clock()
                return False
            if self.state is BreakerState.CLOSED and self.failures >= self._threshold:
                self._enter(BreakerState.OPEN)
                self._opened_at = self._clock()
                self.trips += 1
                return True
            return False

    def release_probe(self) -> None:
        """A half-open probe ended without an answer either way (e.g. no free pooled
        connection): open again, and let the next call probe at once."""
        with self._lock:
            if self.state is BreakerState.HALF_OPEN:
                self._enter(BreakerState.OPEN)
                self._opened_at = self._clock() - self._timeout

    def _enter(self, state: BreakerState) -> None:
        """Move to ``state`` (under the lock) and count the transition."""
        self.state = state
        self.transitions[state] += 1

    def snapshot(self) -> dict[str, object]:
        """``{"state", "trips", "recoveries", "short_circuited", "transitions"}``, as the
        stats show it (``transitions``: how many times each state was entered)."""
        return {
            "state": self.state.value,
            "trips": self.trips,
            "recoveries": self.recoveries,
            "short_circuited": self.short_circuited,
            "transitions": {state.value: n for state, n in self.transitions.items()},
        }

    def reset(self) -> None:
        """Close the breaker and forget past failures."""
        with self._lock:
            if self.state is not BreakerState.CLOSED:
                self._enter(BreakerState.CLOSED)
            self.failures = 0
            self._timeout = self._base_timeout


def new_breaker(
    failures: int, max_backoff: float, *, clock: Callable[[], float] = time.monotonic
) -> CircuitBreaker:
    """The breaker the settings ``breaker_failures`` and ``breaker_max_backoff`` ask for:
    it opens after ``failures`` consecutive connection failures, waits
    :data:`DEFAULT_RESET_TIMEOUT` (or ``max_backoff`` if shorter) before its first probe,
    and doubles the wait after each failed probe up to ``max_backoff`` seconds."""
    return CircuitBreaker(
        failure_threshold=failures,
        reset_timeout=min(DEFAULT_RESET_TIMEOUT, max_backoff),
        max_reset_timeout=max_backoff,
        clock=clock,
    )


class NodeDownError(RedisConnectionError):
    """One node of several (a cluster primary) could not be reached, or its own breaker
    is open: only the keys it serves degrade. Counted and logged as an outage of that
    node; the manager's breaker is left as it is, since the other nodes answer.

    Attributes:
        address: the node's ``host:port``.
    """

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"primary {address} unreachable: {reason}")
        self.address = address


def is_pool_exhausted(exc: BaseException) -> bool:
    """True if ``exc`` says no pooled connection came free in time (saturation)."""
    return isinstance(exc, PoolExhaustedError)


def is_topology_moved(exc: BaseException) -> bool:
    """True if ``exc`` is a reply saying the topology moved (see :data:`TOPOLOGY_ERRORS`)."""
    return isinstance(exc, TOPOLOGY_ERRORS)


def is_connection_failure(exc: BaseException) -> bool:
    """True if ``exc`` says Redis could not be reached (as opposed to a refusal, a moved
    topology or a full pool)."""
    if isinstance(exc, RedisConnectionError):
        return not isinstance(exc, PoolExhaustedError)
    return isinstance(exc, RedisTimeoutError | OSError)


class LogThrottle:
    """Lets one log line through per ``interval`` seconds and counts the ones held back."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._last = -interval
        self._suppressed = 0

    def ready(self, *, force: bool = False) -> int | None:
        """Return how many lines were held back if one may be logged now, else None.

        Args:
            force: log now whatever the interval (e.g. the first failure of an outage).
        """
        now = self._clock()
        with self._lock:
            if not force and now - self._last < self._interval:
                self._suppressed += 1
                return None
            suppressed, self._suppressed = self._suppressed, 0
            self._last = now
            return suppressed

    def reset(self) -> int:
        """Start afresh (the next line logs at once); return how many were held back."""
        with self._lock:
            suppressed, self._suppressed = self._suppressed, 0
            self._last = -self._interval
            return suppressed


#: The shortest run of a password's characters that :class:`SecretMask` masks wherever it
#: appears (a whole password shorter than this is masked too).
MIN_SECRET_RUN: Final = 8
#: Redis turns CR and LF into spaces in an error reply (it must stay one line).
_REPLY_NEWLINES: Final = str.maketrans("\r\n", "  ")


def _unicode_escaped(text: str) -> str:
    return text.encode("unicode_escape").decode("ascii")


def _secret_forms(secret: str) -> set[str]:
    """``secret`` as it may appear in a message: as is, as Redis echoes it (newlines as
    spaces), as ``repr`` and ``traceback`` show it (escaped, also as UTF-8 bytes), and
    percent-encoded as in a URL."""
    spaced = secret.translate(_REPLY_NEWLINES)
    forms = {secret, spaced, quote(secret, safe=""), quote(secret), quote_plus(secret)}
    for text in (secret, spaced):
        forms.add(_unicode_escaped(text))
        forms.add(repr(text)[1:-1])
        forms.add(repr(text.encode())[2:-1])
    return forms


class SecretMask:
    """Replaces a secret in text with ``***``: the whole of it, and every run of at least
    :data:`MIN_SECRET_RUN` of its characters (a server echoes a password truncated), also
    in the forms a server or Python gives it (see :func:`_secret_forms`).

    For error paths only: the first call builds the set of the secret's runs, and each
    call then costs one set lookup per character of ``text``.
    """

    __slots__ = ("_runs", "_secret", "_short")

    def __init__(self, secret: str | None) -> None:
        self._secret = secret or None
        self._runs: frozenset[str] | None = None
        self._short: tuple[str, ...] = ()

    def _build(self, secret: str) -> frozenset[str]:
        runs: set[str] = set()
        short: list[str] = []
        for form in _secret_forms(secret):
            if len(form) < MIN_SECRET_RUN:
                short.append(form)
            else:
                runs.update(
                    form[i : i + MIN_SECRET_RUN] for i in range(len(form) - MIN_SECRET_RUN + 1)
                )
        # Longest first, so a short form inside another is not matched on its own first.
        self._short = tuple(sorted(short, key=len, reverse=True))
        self._runs = frozen = frozenset(runs)
        return frozen

    def __call__(self, text: str) -> str:
        """``text`` with every run of the secret (see the class docstring) masked."""
        secret = self._secret
        if secret is None or not text:
            return text
        runs = self._runs
        if runs is None:
            runs = self._build(secret)
        spans: list[tuple[int, int]] = []
        size = MIN_SECRET_RUN
        if runs:
            for i in range(len(text) - size + 1):
                if text[i : i + size] in runs:
                    spans.append((i, i + size))
        for form in self._short:
            start = text.find(form)
            while start != -1:
                spans.append((start, start + len(form)))
                start = text.find(form, start + 1)
        if not spans:
            return text
        spans.sort()
        parts: list[str] = []
        done = 0
        end = -1
        for start, stop in spans:
            if start > end:
                if end >= 0:
                    parts.append("***")
                parts.append(text[done:start])
            end = max(end, stop)
            done = end
        parts.append("***")
        parts.append(text[done:])
        return "".join(parts)


#: The functions that run the handshake after the socket is open (AUTH or HELLO, CLIENT
#: SETNAME/SETINFO, SELECT): redis-py's (the near-cache listener's connections) and the
#: lean pool's own ``_handshake`` (sync and asyncio alike).
_HANDSHAKE_FUNCTIONS: Final = frozenset({"on_connect", "on_connect_check_health", "_handshake"})
#: Parts of a handshake reply that name a command (never an argument), safe to show.
#: (Redis 7 quotes with '...', Redis 6 with `...`.)
_UNKNOWN_COMMAND_RE: Final = re.compile(r"(?:ERR )?unknown command ['`]([A-Za-z][\w|-]{0,31})['`]")
_NO_PERMISSION_RE: Final = re.compile(r"no permissions to run the ['`]([A-Za-z][\w|-]{0,31})['`]")
_AUTH_COMMANDS: Final = frozenset({"auth", "hello"})


def is_handshake_error(exc: BaseException) -> bool:
    """True if ``exc`` (or an exception it was raised from) came out of a connection
    handshake (redis-py's ``on_connect`` or the lean pool's ``_handshake``: AUTH or HELLO,
    CLIENT SETNAME, SELECT), whose error replies may echo the password."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        tb = current.__traceback__
        while tb is not None:
            code = tb.tb_frame.f_code
            if code.co_name in _HANDSHAKE_FUNCTIONS and (
                "redis" in code.co_filename or "crmcache" in code.co_filename
            ):
                return True
            tb = tb.tb_next
        current = current.__cause__ or current.__context__
    return False


def _handshake_description(exc: BaseException) -> str:
    """A fixed description of a handshake failure: its class, and at most the name of the
    command refused (parsed, never the reply's text)."""
    message = str(exc)
    unknown = _UNKNOWN_COMMAND_RE.match(message)
    denied = _NO_PERMISSION_RE.search(message)
    if unknown is not None:
        command = unknown[1]
        what = f"the server does not know the command {command!r} (renamed or disabled?)"
        if command.lower() in _AUTH_COMMANDS:
            what = f"authentication failed: {what}"
    elif denied is not None:
        what = f"the user has no permissions to run the handshake command {denied[1]!r}"
    elif isinstance(exc, AuthenticationError) or "WRONGPASS" in message:
        what = "authentication failed"
    else:
        what = "the connection handshake failed"
    return (
        f"{type(exc).__name__} during the connection handshake: {what}; "
        "server reply withheld (it may echo the password)"
    )


def describe_failure(exc: BaseException, scrub: Callable[[str], str]) -> str:
    """``exc`` as a log line may show it: ``"<class>: <message>"`` with the password
    scrubbed, or a fixed description for a handshake error (whose reply may echo the
    password: :func:`is_handshake_error`)."""
    if is_handshake_error(exc):
        return scrub(_handshake_description(exc))
    return scrub(f"{type(exc).__name__}: {exc}")


def is_critical(exc: BaseException) -> bool:
    """True for failures that need a person, not a retry: bad credentials, missing ACL
    permissions, a handshake the server refuses (a renamed ``AUTH``, a wrong ``SELECT``), an
    untrusted TLS certificate, or a Lua script that raised for a reason other than memory
    (a bug or an incompatible server)."""
    if isinstance(exc, AuthenticationError | NoPermissionError):
        return True
    if isinstance(exc, ResponseError) and is_handshake_error(exc):
        return True
    message = str(exc)
    if "NOPERM" in message or "certificate verify failed" in message.lower():
        return True
    if isinstance(exc, OutOfMemoryError) or "OOM command not allowed" in message:
        return False  # Redis 7 tags every error inside a script with user_script
    return isinstance(exc, ResponseError) and (
        "user_script" in message or "Error running script" in message
    )


class Guard:
    """Breaker and logging around Redis calls (the facades' ``_call`` does the I/O):
    ``begin()`` before a call, then ``succeeded(token)`` or ``failed(op, exc)``."""

    def __init__(
        self,
        *,
        breaker: CircuitBreaker,
        on_error: Callable[[str, BaseException], None],
        secret: str | None = None,
        on_recovered: Callable[[], None] | None = None,
        log_interval: float = DEFAULT_LOG_INTERVAL,
        slow_call: float = math.inf,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.breaker = breaker
        #: Hold time past which a full pool is blamed on Redis (:func:`stalled_by_redis`).
        self._slow_call = slow_call
        self._on_error = on_error
        #: Removes the password from a text (``scrub(text) -> text``, see SecretMask).
        self.scrub = SecretMask(secret)
        self._on_recovered = on_recovered
        self._log_interval = log_interval
        self._clock = clock
        self._throttle = LogThrottle(log_interval, clock)
        self._saturation_throttle = LogThrottle(log_interval, clock)
        self._stall_throttle = LogThrottle(log_interval, clock)
        self._unexpected_throttle = LogThrottle(log_interval, clock)
        self._topology_throttle = LogThrottle(log_interval, clock)
        self._protocol_throttle = LogThrottle(log_interval, clock)
        self._node_throttle = LogThrottle(log_interval, clock)
        self._refusal_throttles: dict[str, LogThrottle] = {}
        self._lock = threading.Lock()
        self._failing = False
        self._failures_seen = 0

    def begin(self) -> int | None:
        """Before a Redis call: None if the breaker says not to make it, else a token to
        pass to :meth:`succeeded` when it returns."""
        # A closed breaker, inline (CircuitBreaker.allow's first line): every call asks.
        if self.breaker.state is not _CLOSED and not self.breaker.allow():
            return None
        return self._failures_seen

    def succeeded(self, token: int | None = None) -> None:
        """Note a call that reached Redis (closes the breaker, ends an outage).

        Args:
            token: from :meth:`begin`. A call that began before a failure recorded since
                says nothing about Redis now (its reply may predate a crash): it neither
                closes the breaker nor announces a recovery.
        """
        breaker = self.breaker
        if token is not None and token != self._failures_seen:
            breaker.release_probe()
            return
        if breaker.state is _CLOSED and not breaker.failures and not self._failing:
            return  # nothing to note (CircuitBreaker.record_success's first test, inline)
        if breaker.record_success() or self._failing:
            self._recovered()

    def abandoned(self) -> None:
        """Note a call that ended with neither a reply nor a failure: its caller was
        cancelled (asyncio) or interrupted (``KeyboardInterrupt``). It says nothing about
        Redis, but if it was the breaker's half-open probe, the next call may probe."""
        self.breaker.release_probe()

    def unexpected(self, op: str, exc: BaseException) -> None:
        """Note a call that raised neither a Redis error nor a cancellation (a bug, or a
        reply no code expected). The call degrades like a failure and is logged with its
        traceback (throttled); it says nothing about Redis being up or down, so the
        breaker only lets the next call probe if this one was the probe."""
        self._on_error(op, exc)
        self.breaker.release_probe()
        suppressed = self._unexpected_throttle.ready()
        if suppressed is not None:
            # A handshake error's traceback would quote its reply: described instead.
            detail = (
                self.describe(exc)
                if is_handshake_error(exc)
                else self.scrub("".join(traceback.format_exception(exc)).rstrip())
            )
            logger.error(
                "unexpected error during %s, the call degraded (%d more not logged): %s",
                op,
                suppressed,
                detail,
            )

    def failed(self, op: str, exc: BaseException) -> None:
        """Record and log (throttled) a failed call."""
        self._on_error(op, exc)
        # Three failures that say nothing about Redis being up or down: the breaker is left
        # as it is (a half-open probe lets the next call probe), and each kind logs on its
        # own throttle.
        if isinstance(exc, PoolExhaustedError):
            # Saturated, not down: no outage to declare, no recovery to announce.
            self._saturated(op, exc)
            return
        if isinstance(exc, ProtocolError):
            # The server answered, but not as any command of ours can be answered: the
            # pool closed that connection.
            self._neither(
                self._protocol_throttle,
                logging.ERROR,
                "Redis broke the protocol during %s (%s): the call degraded and its "
                "connection was closed (%d more not logged). A buggy server, proxy or "
                "network device is between crmcache and Redis.",
                op,
                self.scrub(str(exc)),
            )
            return
        if isinstance(exc, TOPOLOGY_ERRORS):
            # The node answered, but the key (or the primary) is elsewhere now.
            self._neither(
                self._topology_throttle,
                logging.WARNING,
                "Redis topology changed under %s (%s): the call degraded (%d more not "
                "logged). A cluster node answers MOVED/ASK and a replica READONLY: point "
                "redis_url at what serves the keys.",
                op,
                self.describe(exc),
            )
            return
        if isinstance(exc, NodeDownError):
            # One primary of a cluster is down: its keys degrade, the others are served.
            self._neither(
                self._node_throttle,
                logging.WARNING,
                "Redis node down during %s (%s): calls for its keys degrade, the other "
                "nodes are served (%d more not logged)",
                op,
                self.describe(exc),
            )
            return
        if not is_connection_failure(exc):
            # Redis answered, with a refusal (OOM, NOPERM, WRONGTYPE, a script error): it
            # is up. That closes the breaker like a success, and is no outage.
            self.succeeded()
            self._refused(op, exc)
            return
        opened = self.breaker.record_failure()
        with self._lock:
            self._failures_seen += 1
            first = not self._failing
            self._failing = True
        suppressed = self._throttle.ready(force=first or opened)
        if suppressed is None:
            return
        message = self.describe(exc)
        if is_critical(exc):
            logger.error("Redis refused %s, needs attention: %s", op, message)
        elif opened:
            logger.warning(
                "Redis circuit breaker opened after repeated failures (last: %s during %s); "
                "cache calls degrade without waiting until a probe succeeds",
                message,
                op,
            )
        elif first:
            logger.warning("Redis unavailable during %s, degrading: %s", op, message)
        else:
            logger.warning(
                "Redis still failing (%d similar failures not logged); last during %s: %s",
                suppressed,
                op,
                message,
            )

    def _neither(
        self, throttle: LogThrottle, level: int, message: str, op: str, *detail: str
    ) -> None:
        """A failure that is neither an outage nor a refusal: release a half-open probe and
        log ``message`` (``op``, ``detail``, then the count held back) on ``throttle``."""
        self.breaker.release_probe()
        suppressed = throttle.ready()
        if suppressed is not None:
            logger.log(level, message, op, *detail, suppressed)

    def _saturated(self, op: str, exc: PoolExhaustedError) -> None:
        """Log a full pool with its cause: calls stuck on a slow or hung Redis (a larger
        pool would fill up the same), or a pool too small for fast calls."""
        hold = exc.hold_time
        if stalled_by_redis(exc, self._slow_call):
            held = "" if exc.slots is None else f"all {exc.slots} "
            answered = (
                f"none answered in {exc.waited:.2f}s"
                if exc.released == 0
                else f"about {hold:.2f}s per call"
            )
            self._neither(
                self._stall_throttle,
                logging.WARNING,
                "Redis slow or hung during %s: %spooled connections are held by calls "
                "waiting for its replies (%s); the call degraded (%d more not "
                "logged). A larger max_connections would not help: check the server "
                "(SLOWLOG, LATENCY DOCTOR, a paused or overloaded process, the network).",
                op,
                held,
                answered,
            )
            return
        detail = "no free connection within the pool timeout"
        if hold is not None and exc.slots is not None:
            detail = (
                f"{exc.slots} connection(s), each call holding one about "
                f"{hold * 1000:.1f} ms, served {exc.released} call(s) in the "
                f"{exc.waited:.2f}s this one waited"
            )
        self._neither(
            self._saturation_throttle,
            logging.WARNING,
            "connection pool saturated during %s: %s; the call degraded (%d more not "
            "logged). Redis answers quickly: the pool is too small for this load; "
            "consider a larger max_connections.",
            op,
            detail,
        )

    def _refused(self, op: str, exc: BaseException) -> None:
        # One throttle per kind of refusal, whatever the operation: a missing permission
        # or a full memory refuses every call alike.
        kind = type(exc).__name__
        with self._lock:
            throttle = self._refusal_throttles.get(kind)
            if throttle is None:
                if len(self._refusal_throttles) >= _MAX_REFUSAL_KINDS:
                    self._refusal_throttles.clear()
                throttle = self._refusal_throttles[kind] = LogThrottle(
                    self._log_interval, self._clock
                )
        suppressed = throttle.ready()
        if suppressed is None:
            return
        level = logging.ERROR if is_critical(exc) else logging.WARNING
        logger.log(
            level,
            "Redis refused %s%s: %s (%d similar refusals not logged)",
            op,
            ", needs attention" if level == logging.ERROR else "",
            self.describe(exc),
            suppressed,
        )

    def _recovered(self) -> None:
        with self._lock:
            if not self._failing:
                return
            self._failing = False
        suppressed = self._throttle.reset()
        logger.warning(
            "Redis reachable again; cache back in service (%d failures not logged)", suppressed
        )
        if self._on_recovered is not None:
            self._on_recovered()

    def describe(self, exc: BaseException) -> str:
        """``exc`` fit for a log line (see :func:`describe_failure`)."""
        return describe_failure(exc, self.scrub)
