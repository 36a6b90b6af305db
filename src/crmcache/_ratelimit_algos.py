"""Rate limits with an algorithm each, checked together: the pure part (no I/O).

:class:`RateLimit` describes one limit (validated once, at construction); the manager's
``check_rate_limits`` / ``acquire_up_to`` / ``refund`` send a set of them to
``lua/rate_limits.lua`` in one EVALSHA. Here: the per-limit arguments of that script
(:func:`script_args`), the calendar boundaries it needs (:func:`calendar_bounds`), the
decoding of its reply (:func:`decode_reply`), and :class:`Engine`, the same algorithms in
Python: the ``"local"`` failure policy's limiter, and the model the property tests hold
the script to.

Algorithms (all on Redis's clock, ``TIME``; a refused call is never charged):

* ``"fixed"`` with ``window`` in seconds: the window opens with the first charge and ends
  when its key expires (the counter ``check_rate_limit`` uses for the same name and window).
  Up to twice the limit can pass in one window's span around an edge.
* ``"fixed"`` with ``window="day"`` or ``"month"``: a calendar window, from local midnight
  to local midnight (the first of the month) in ``timezone``, so a 23 h or 25 h day on a
  DST change counts as one day.
* ``"sliding"``: a sliding-window counter. The count is ``floor(previous * (W - e) / W) +
  current`` (windows aligned to multiples of ``W``, ``e`` the time into the current one):
  exact when the previous window's calls were spread evenly; at worst (all of them at its
  very end) a span of ``W`` can hold up to ``2 * limit - 1`` calls, as with a fixed window;
  it never refuses a call that a true sliding log would allow by more than the rounding of
  one unit.
* ``"gcra"``: the generic cell rate algorithm: one unit every ``T = ceil(window / limit)``
  microseconds, up to ``burst`` at once (default ``limit``); integer microseconds, so
  ``retry_after`` is exact.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ._config import DEFAULT_MAX_ID_LENGTH, DEFAULT_RATE_LIMIT_WINDOW
from ._keys import check_id
from ._ratelimit import MAX_LIMIT, MAX_WINDOW, CorruptReply, RateLimitResult
from ._validate import brief

__all__ = [
    "ALGORITHMS",
    "CALENDAR_WINDOWS",
    "MAX_LIMITS_PER_CALL",
    "QUOTA_WINDOW",
    "Algorithm",
    "Engine",
    "RateLimit",
    "RateLimitsResult",
    "calendar_bounds",
    "check_cost",
    "check_limits",
    "decode_reply",
    "script_args",
    "wire_args",
]

Algorithm = Literal["fixed", "sliding", "gcra"]
ALGORITHMS: Final = ("fixed", "sliding", "gcra")
CALENDAR_WINDOWS: Final = ("day", "month")
#: Most limits one call may check together.
MAX_LIMITS_PER_CALL: Final = 32
#: Windows this long or longer (and calendar windows) are quotas: losing their counters
#: on a restart matters (see docs/guides/rate-limits.md, Durability).
QUOTA_WINDOW: Final = 3600
#: The largest burst * T (microseconds) a GCRA limit may span: keeps TAT arithmetic exact
#: in Lua's doubles (now + 2^52 < 2^53).
_MAX_GCRA_SPAN_US: Final = 2**52
_US = 1_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)


class RateLimit:
    """One rate limit: ``limit`` units per ``window``, counted by ``algorithm``.

    Immutable and validated at construction; build the limits of a hot path once and
    reuse them.

    Args:
        name: what is limited (``"sms-gateway"``, ``f"client:{id}:marketing"``).
        limit: units allowed per window (1 to 2**53 - 1); for ``gcra``, the rate.
        window: seconds (1 to ten years), or ``"day"`` / ``"month"``: a calendar window
            reset at local midnight in ``timezone`` (``algorithm="fixed"`` only).
        algorithm: ``"fixed"`` (default), ``"sliding"`` or ``"gcra"`` (see the module).
        burst: ``gcra`` only: units that may go at once (default ``limit``).
        timezone: calendar windows only: an IANA zone name, default ``"UTC"``.
        group: a hash tag, so that limits checked together share one Redis Cluster slot
            (their keys become ``<prefix>:ratelimit:{<group>}:...``); no braces. A
            ``fixed`` limit with a group has a key of its own, not ``check_rate_limit``'s.

    Raises:
        TypeError, ValueError: a bad argument; the message names it.
    """

    __slots__ = (
        "_args",
        "_quota",
        "_suffix",
        "_wire",
        "_zone",
        "algorithm",
        "burst",
        "group",
        "limit",
        "name",
        "timezone",
        "window",
    )

    name: str
    limit: int
    window: int | str
    algorithm: Algorithm
    burst: int | None
    timezone: str | None
    group: str | None
    _args: tuple[str | int, ...]
    _quota: bool
    _suffix: str
    _wire: tuple[bytes, ...]
    _zone: ZoneInfo | None

    def __init__(
        self,
        name: str,
        limit: int,
        window: int | Literal["day", "month"] = DEFAULT_RATE_LIMIT_WINDOW,
        *,
        algorithm: Algorithm = "fixed",
        burst: int | None = None,
        timezone: str | None = None,
        group: str | None = None,
    ) -> None:
        name = check_id("name", name, DEFAULT_MAX_ID_LENGTH)
        limit = _bounded_int("limit", limit, MAX_LIMIT)
        if algorithm not in ALGORITHMS:
            raise ValueError(
                f"algorithm must be one of {', '.join(ALGORITHMS)}; got {brief(algorithm)}"
            )
        checked, timezone, zone = _check_window(window, algorithm, timezone)
        if algorithm == "gcra":
            burst = limit if burst is None else _bounded_int("burst", burst, MAX_LIMIT)
        elif burst is not None:
            raise ValueError(f"burst applies only to algorithm='gcra', not {algorithm!r}")
        if group is not None:
            group = check_id("group", group, DEFAULT_MAX_ID_LENGTH)
            if "{" in group or "}" in group:
                raise ValueError(f"group must not contain braces: {group!r}")
        tag = "" if group is None else f"{{{group}}}:"
        args: tuple[str | int, ...]
        if zone is not None:
            suffix = f"{tag}{name}:{checked}:{timezone}"
            args = ()
        elif algorithm == "fixed":
            suffix = f"{tag}{name}:{checked}"
            args = ("f", limit, int(checked) * 1000)
        elif algorithm == "sliding":
            suffix = f"{tag}{name}:{checked}:sliding"
            args = ("s", limit, int(checked) * _US)
        else:
            burst = limit if burst is None else burst  # set above for gcra; narrows the type
            interval = -(-int(checked) * _US // limit)
            if burst * interval > _MAX_GCRA_SPAN_US:
                raise ValueError(
                    f"burst ({burst}) times the emission interval ({interval} µs, window / "
                    f"limit) must be at most {_MAX_GCRA_SPAN_US} µs"
                )
            suffix = f"{tag}{name}:{checked}:gcra"
            args = ("g", burst, interval)
        setattr_ = object.__setattr__
        for field, value in (
            ("name", name),
            ("limit", limit),
            ("window", checked),
            ("algorithm", algorithm),
            ("burst", burst),
            ("timezone", timezone),
            ("group", group),
            ("_suffix", suffix),
            ("_args", args),
            ("_wire", tuple(str(arg).encode() for arg in args)),
            ("_zone", zone),
            ("_quota", zone is not None or int(checked) >= QUOTA_WINDOW),
        ):
            setattr_(self, field, value)

    @property
    def capacity(self) -> int:
        """The most units one call may take: ``burst`` for gcra, else ``limit``."""
        return self.burst if self.burst is not None else self.limit

    @property
    def is_quota(self) -> bool:
        """True for calendar windows and windows of an hour or more (quotas whose loss on a
        restart matters)."""
        return self._quota

    def key_suffix(self) -> str:
        """The key after ``<prefix>:ratelimit:``."""
        return self._suffix

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"RateLimit is read-only (cannot set {name!r})")

    def _identity(self) -> tuple[object, ...]:
        return (
            self.name,
            self.limit,
            self.window,
            self.algorithm,
            self.burst,
            self.timezone,
            self.group,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RateLimit):
            return NotImplemented
        return self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())

    def __repr__(self) -> str:
        extra = "".join(
            f", {name}={value!r}"
            for name, value in (
                ("algorithm", self.algorithm),
                ("burst", self.burst),
                ("timezone", self.timezone),
                ("group", self.group),
            )
            if value is not None and not (name == "algorithm" and value == "fixed")
        )
        return f"RateLimit({self.name!r}, limit={self.limit}, window={self.window!r}{extra})"


def _check_window(
    window: object, algorithm: str, timezone: str | None
) -> tuple[int | str, str | None, ZoneInfo | None]:
    """Validate ``window`` (and ``timezone``, which only a calendar window takes)."""
    if not isinstance(window, str):
        if timezone is not None:
            raise ValueError("timezone applies only to window='day' or 'month'")
        return _bounded_int("window", window, MAX_WINDOW, unit=" seconds"), None, None
    if window not in CALENDAR_WINDOWS:
        raise ValueError(f"window must be seconds (an int) or 'day' or 'month'; got {window!r}")
    if algorithm != "fixed":
        raise ValueError(
            f"window={window!r} (a calendar window) needs algorithm='fixed', "
            f"got algorithm={algorithm!r}"
        )
    timezone = "UTC" if timezone is None else timezone
    return str.__str__(window), timezone, _zone(timezone)


def _bounded_int(name: str, value: object, most: int, *, unit: str = "") -> int:
    if type(value) is not int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        value = int(value)
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {brief(value)}")
    if value > most:
        raise ValueError(f"{name} must be at most {most}{unit}, got {brief(value)}")
    return value


def _zone(name: object) -> ZoneInfo:
    if not isinstance(name, str):
        raise TypeError(f"timezone must be a str, not {type(name).__name__}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"timezone is not a known IANA time zone: {name!r}") from None


def check_limits(limits: object) -> tuple[RateLimit, ...]:
    """Validate ``limits`` (a non-empty sequence of :class:`RateLimit`, at most
    :data:`MAX_LIMITS_PER_CALL`, no key twice) and return them as a tuple.

    Raises:
        TypeError, ValueError: the message names ``limits``.
    """
    if isinstance(limits, RateLimit):
        return (limits,)
    if not isinstance(limits, list | tuple):
        raise TypeError(f"limits must be a list of RateLimit, not {type(limits).__name__}")
    if not limits:
        raise ValueError("limits must not be empty")
    if len(limits) > MAX_LIMITS_PER_CALL:
        raise ValueError(f"limits may hold at most {MAX_LIMITS_PER_CALL} limits")
    if len(limits) == 1:
        only = limits[0]
        if not isinstance(only, RateLimit):
            raise TypeError(f"limits must hold RateLimit objects, not {type(only).__name__}")
        return (only,)
    seen: set[object] = set()
    for item in limits:
        if not isinstance(item, RateLimit):
            raise TypeError(f"limits must hold RateLimit objects, not {type(item).__name__}")
        if item._suffix in seen:
            raise ValueError(f"limits names the same limit twice: {item!r}")
        seen.add(item._suffix)
    return tuple(limits)


def check_cost(limits: Sequence[RateLimit], cost: object, *, name: str = "cost") -> int:
    """Validate ``cost`` (an int >= 0) against every limit's capacity.

    Raises:
        TypeError: not an int. ValueError: negative, or above a limit's ``limit`` (its
            ``burst`` for gcra): such a call could never be allowed; the message names
            both.
    """
    if type(cost) is not int:
        if isinstance(cost, bool) or not isinstance(cost, int):
            raise TypeError(f"{name} must be an int, not {type(cost).__name__}")
        cost = int(cost)
    if cost < 0:
        raise ValueError(f"{name} must be at least 0, got {brief(cost)}")
    for item in limits:
        capacity = item.capacity
        if cost > capacity:
            what = "burst" if item.algorithm == "gcra" else "limit"
            raise ValueError(
                f"{name} ({brief(cost)}) is above the {what} ({capacity}) of {item!r}: "
                "such a call could never be allowed"
            )
    return cost


# -- calendar windows ------------------------------------------------------------------

_bounds_memo: dict[tuple[str, str], tuple[int, int, tuple[int, int, int, int]]] = {}
_bounds_lock = threading.Lock()
_wire_memo: dict[tuple[int, int, int, int], tuple[bytes, ...]] = {}


def _start_us(day: date, zone: ZoneInfo) -> int:
    """The first instant (µs since the epoch) whose local date in ``zone`` is ``day``.

    Local midnight with ``fold=0``: where midnight is skipped (a DST jump at 00:00), that
    is the instant of the jump, the day's first; where it repeats, the first of the two.
    """
    local = datetime(day.year, day.month, day.day, tzinfo=zone)
    return (local - _EPOCH) // _ONE_US


def _month(day: date, months: int) -> date:
    index = day.year * 12 + day.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


def calendar_bounds(window: str, zone: ZoneInfo, now_us: int) -> tuple[int, int, int, int]:
    """Four consecutive period starts (µs) around ``now_us``: the previous period's, the
    current one's, the next's and the one after. The script takes the period that holds
    Redis's own time, so a client clock off by less than a period changes nothing.
    """
    key = (window, zone.key)
    memo = _bounds_memo.get(key)
    if memo is not None and memo[0] <= now_us < memo[1]:
        return memo[2]
    today = datetime.fromtimestamp(now_us / _US, zone).date()
    if window == "day":
        days = [today + timedelta(days=offset) for offset in (-1, 0, 1, 2)]
    else:
        first = today.replace(day=1)
        days = [_month(first, offset) for offset in (-1, 0, 1, 2)]
    b0, b1, b2, b3 = (_start_us(day, zone) for day in days)
    bounds = (b0, b1, b2, b3)
    with _bounds_lock:
        if len(_bounds_memo) > 1024:
            _bounds_memo.clear()
        _bounds_memo[key] = (b1, b2, bounds)
    return bounds


def wire_args(limit: RateLimit, now_us: int) -> tuple[bytes, ...]:
    """:func:`script_args` as the bytes sent (encoded once per limit, or per calendar
    period for a calendar window: the hot path packs them as they are)."""
    wire = limit._wire
    if wire:
        return wire
    zone = limit._zone
    if zone is None:  # only calendar limits have no static args
        raise TypeError(f"{limit!r} has neither static arguments nor a calendar window")
    bounds = calendar_bounds(str(limit.window), zone, now_us)
    memo = _wire_memo.get(bounds)
    if memo is None:
        memo = tuple(b"%d" % bound for bound in bounds)
        with _bounds_lock:
            if len(_wire_memo) > 1024:
                _wire_memo.clear()
            _wire_memo[bounds] = memo
    return (b"c", b"%d" % limit.limit, *memo)


def script_args(limit: RateLimit, now_us: int) -> tuple[str | int, ...]:
    """The ARGV entries of ``limit`` in ``rate_limits.lua`` (three, six for a calendar
    window)."""
    args: tuple[str | int, ...] = limit._args
    if args:
        return args
    zone = limit._zone
    if zone is None:  # only calendar limits have no static args
        raise TypeError(f"{limit!r} has neither static arguments nor a calendar window")
    return ("c", limit.limit, *calendar_bounds(str(limit.window), zone, now_us))


# -- the reply ---------------------------------------------------------------------------


class RateLimitsResult:
    """Outcome of :meth:`CRMCacheManager.check_rate_limits`.

    Attributes:
        allowed: every limit allowed the call; then every limit was charged.
        blocked_by: the first limit that refused, else None.
        retry_after: seconds until the whole set would allow this cost (the largest
            ``retry_after`` among the limits that refused; 0.0 when allowed).
        results: one :class:`RateLimitResult` per limit, in the order given (built on
            first access: a caller that reads only ``allowed`` does not pay for them).
        degraded: Redis could not be asked; ``allowed`` comes from the failure policy.
    """

    __slots__ = ("_results", "_source", "allowed", "blocked_by", "degraded", "retry_after")

    allowed: bool
    blocked_by: RateLimit | None
    retry_after: float
    degraded: bool
    _results: tuple[RateLimitResult, ...] | None
    #: What ``results`` is built from: the reply, the limits and their capacities.
    _source: tuple[list[int], Sequence[RateLimit], Sequence[int] | None] | None

    def __init__(
        self,
        allowed: bool,
        blocked_by: RateLimit | None,
        retry_after: float,
        results: tuple[RateLimitResult, ...],
        *,
        degraded: bool = False,
    ) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "allowed", allowed)
        setattr_(self, "blocked_by", blocked_by)
        setattr_(self, "retry_after", retry_after)
        setattr_(self, "_results", results)
        setattr_(self, "_source", None)
        setattr_(self, "degraded", degraded)

    @property
    def results(self) -> tuple[RateLimitResult, ...]:
        """One :class:`RateLimitResult` per limit, in the order given."""
        results = self._results
        if results is None:
            source = self._source  # set whenever _results is not
            if source is None:
                raise TypeError("a rate-limit result without results or a reply to build them")
            reply, limits, capacities = source
            degraded = self.degraded
            built = []
            at = 2
            for index, item in enumerate(limits):
                ok, count, retry, reset = reply[at], reply[at + 1], reply[at + 2], reply[at + 3]
                at += 4
                capacity = item.capacity if capacities is None else capacities[index]
                remaining = capacity - count
                built.append(
                    RateLimitResult(
                        ok == 1,
                        count,
                        capacity,
                        remaining if remaining > 0 else 0,
                        retry / _US,
                        degraded=degraded,
                        reset=reset / _US,
                    )
                )
            results = tuple(built)
            object.__setattr__(self, "_results", results)
        return results

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"RateLimitsResult is read-only (cannot set {name!r})")

    def __bool__(self) -> bool:
        return self.allowed

    def __repr__(self) -> str:
        return (
            f"RateLimitsResult(allowed={self.allowed!r}, blocked_by={self.blocked_by!r}, "
            f"retry_after={self.retry_after!r}, degraded={self.degraded!r}, "
            f"results={list(self.results)!r})"
        )


_new_outcome = RateLimitsResult.__new__
_set_field = object.__setattr__


def decode_reply(
    reply: object,
    limits: Sequence[RateLimit],
    cost: int,
    *,
    degraded: bool = False,
    capacities: Sequence[int] | None = None,
) -> tuple[bool, int, RateLimitsResult]:
    """Decode ``rate_limits.lua``'s reply: ``(allowed, granted, result)``.

    The reply is checked in full here; the per-limit results are built when first read.

    Args:
        capacities: each limit's capacity when not its own (the local limiter's share).

    Raises:
        CorruptReply: not a reply a correct run gives (shape, flags, negative figures, or
            more granted than asked).
    """
    if type(reply) is not list or len(reply) != 2 + 4 * len(limits):
        raise CorruptReply(f"expected {2 + 4 * len(limits)} integers, got {reply!r:.80}")
    allowed, granted = reply[0], reply[1]
    if allowed not in (0, 1) or type(granted) is not int or not 0 <= granted <= cost:
        raise CorruptReply(f"impossible head {{{allowed!r:.20}, {granted!r:.30}}}")
    blocked_by = None
    retry_us = 0
    at = 2
    for item in limits:
        ok, count, retry, reset = reply[at], reply[at + 1], reply[at + 2], reply[at + 3]
        at += 4
        if not (
            ok in (0, 1)
            and type(count) is int
            and type(retry) is int
            and type(reset) is int
            and count >= 0
            and retry >= 0
            and reset >= 0
        ):
            raise CorruptReply(f"impossible figures for {item!r}: {ok}, {count}, {retry}, {reset}")
        if ok == 0:
            if blocked_by is None:
                blocked_by = item
            retry_us = max(retry_us, retry)
    outcome = _new_outcome(RateLimitsResult)
    _set_field(outcome, "allowed", allowed == 1)
    _set_field(outcome, "blocked_by", blocked_by)
    _set_field(outcome, "retry_after", retry_us / _US)
    _set_field(outcome, "_results", None)
    _set_field(outcome, "_source", (reply, limits, capacities))
    _set_field(outcome, "degraded", degraded)
    return allowed == 1, granted, outcome


# -- the same algorithms in Python ---------------------------------------------------------


class Engine:
    """``rate_limits.lua`` in Python, over an in-process store, for one ``now`` per call.

    Mirrors the script step for step (the same float operations in the same order, so
    the sliding estimate rounds alike). Used by the ``"local"`` failure policy (with the
    process's clock) and by the tests as the model of the script. Not thread-safe: the
    caller holds a lock.
    """

    def __init__(self, *, max_keys: int = 10_000) -> None:
        self.store: dict[str, list[int | str]] = {}
        self.expires: dict[str, int] = {}
        self._max_keys = max_keys

    def run(
        self, keys: Sequence[str], args: Sequence[str | int], now: int, cost: int, mode: str
    ) -> list[int]:
        """What the script answers for ``keys`` and the per-limit ``args`` (those of
        :func:`script_args`, one limit after the other)."""
        self._expire(now)
        states = []
        at = 0
        for key in keys:
            width = 6 if args[at] == "c" else 3
            states.append(self._read(key, args[at : at + width], now))
            at += width
        least = min(state.cap for state in states)
        allowed, granted, want = 1, 0, cost
        if mode == "c":
            if cost == 0:
                want = 1
                allowed = 1 if least >= 1 else 0
            elif least < cost:
                allowed = 0
            else:
                granted = cost
        elif mode == "u":
            want = 1
            granted = max(0, min(cost, least))
            allowed = 1 if granted > 0 else 0
        else:
            granted = cost
        reply = [allowed, granted]
        for state in states:
            ok, retry = 1, 0
            if mode != "r" and state.cap < want:
                ok, retry = 0, state.retry(want)
            if granted > 0:
                if mode == "r":
                    state.refund(granted)
                else:
                    state.charge(granted)
            reply += [ok, max(0, state.count), retry, state.reset]
        return reply

    def _expire(self, now: int) -> None:
        if len(self.store) < self._max_keys:
            return
        for key in [k for k, at in self.expires.items() if at <= now]:
            self.store.pop(key, None)
            self.expires.pop(key, None)
        if len(self.store) >= self._max_keys:
            self.store.clear()
            self.expires.clear()

    def _get(self, key: str, now: int) -> list[int | str] | None:
        at = self.expires.get(key)
        if at is not None and at <= now:
            self.store.pop(key, None)
            self.expires.pop(key, None)
        return self.store.get(key)

    def _read(self, key: str, args: Sequence[str | int], now: int) -> _State:
        kind = args[0]
        values = [int(a) for a in args[1:]]
        if kind == "f":
            return _Fixed(self, key, now, values[0], values[1])
        if kind == "s":
            return _Sliding(self, key, now, values[0], values[1])
        if kind == "g":
            return _Gcra(self, key, now, values[0], values[1])
        return _Calendar(self, key, now, values[0], values[1:5])


class _State:
    cap: int
    count: int
    reset: int

    def retry(self, x: int) -> int:
        raise NotImplementedError

    def charge(self, k: int) -> None:
        raise NotImplementedError

    def refund(self, k: int) -> None:
        raise NotImplementedError


class _Fixed(_State):
    def __init__(self, engine: Engine, key: str, now: int, limit: int, window_ms: int) -> None:
        self.e, self.key, self.now, self.limit = engine, key, now, limit
        self.window_us = window_ms * 1000
        got = engine._get(key, now)
        self.count = int(got[0]) if got else 0
        self.ttl = engine.expires[key] - now if got else 0
        self.cap, self.reset = limit - self.count, self.ttl

    def retry(self, x: int) -> int:
        return 0 if self.count + x <= self.limit else self.ttl

    def charge(self, k: int) -> None:
        if self.count == 0:
            self.e.expires[self.key] = self.now + self.window_us
            self.reset = self.window_us
        self.count += k
        self.e.store[self.key] = [self.count]

    def refund(self, k: int) -> None:
        if self.count > 0:
            self.count -= min(k, self.count)
            self.e.store[self.key] = [self.count]


class _Sliding(_State):
    def __init__(self, engine: Engine, key: str, now: int, limit: int, window_us: int) -> None:
        self.e, self.key, self.now, self.limit, self.w = engine, key, now, limit, window_us
        self.idx = now // window_us
        self.elapsed = now - self.idx * window_us
        got = engine._get(key, now)
        self.c = self.p = 0
        if got and got[0] == self.idx:
            self.c, self.p = int(got[1]), int(got[2])
        elif got and got[0] == self.idx - 1:
            self.p = int(got[1])
        self.count = self._estimate(self.p, self.elapsed) + self.c
        self.cap = limit - self.count
        self.reset = self._reset()

    def _estimate(self, prev: int, e: int) -> int:
        return math.floor(float(prev) * float(self.w - e) / float(self.w))

    def _reset(self) -> int:
        if self.c > 0:
            return 2 * self.w - self.elapsed
        if self.p > 0:
            return self.w - self.elapsed
        return 0

    def _wait(self, prev: int, room: int, start: int) -> int:
        if prev <= room:
            return start
        e = math.floor(float(self.w) - float(room + 1) * float(self.w) / float(prev)) + 1
        e = max(e, start)
        while e < self.w and self._estimate(prev, e) > room:
            e += 1
        return e

    def retry(self, x: int) -> int:
        if self.count + x <= self.limit:
            return 0
        if self.c + x <= self.limit:
            return self._wait(self.p, self.limit - self.c - x, self.elapsed) - self.elapsed
        return self.w - self.elapsed + self._wait(self.c, self.limit - x, 0)

    def charge(self, k: int) -> None:
        self.c += k
        self.e.store[self.key] = [self.idx, self.c, self.p]
        self.e.expires[self.key] = self.now + 2 * self.w - self.elapsed
        self.count += k
        self.reset = self._reset()

    def refund(self, k: int) -> None:
        from_c = min(k, self.c)
        from_p = min(k - from_c, self.p)
        if from_c + from_p > 0:
            self.c -= from_c
            self.p -= from_p
            self.e.store[self.key] = [self.idx, self.c, self.p]
        self.count = self._estimate(self.p, self.elapsed) + self.c
        self.reset = self._reset()


class _Gcra(_State):
    def __init__(self, engine: Engine, key: str, now: int, burst: int, interval: int) -> None:
        self.e, self.key, self.now, self.burst, self.t = engine, key, now, burst, interval
        got = engine._get(key, now)
        self.tat = max(now, int(got[0])) if got else now
        self.count = -(-(self.tat - now) // interval)
        self.cap = burst - self.count
        self.reset = self.tat - now

    def retry(self, x: int) -> int:
        return max(0, self.tat - self.now + x * self.t - self.burst * self.t)

    def _set(self) -> None:
        self.count = -(-(self.tat - self.now) // self.t)
        self.reset = self.tat - self.now

    def charge(self, k: int) -> None:
        self.tat += k * self.t
        self.e.store[self.key] = [self.tat]
        self.e.expires[self.key] = self.tat
        self._set()

    def refund(self, k: int) -> None:
        if self.tat <= self.now:
            return
        self.tat = max(self.now, self.tat - k * self.t)
        if self.tat == self.now:
            self.e.store.pop(self.key, None)
            self.e.expires.pop(self.key, None)
        else:
            self.e.store[self.key] = [self.tat]
        self._set()


class _Calendar(_State):
    def __init__(
        self, engine: Engine, key: str, now: int, limit: int, bounds: Sequence[int]
    ) -> None:
        self.e, self.key, self.now, self.limit = engine, key, now, limit
        b0, b1, b2, b3 = bounds
        if not b0 <= now < b3:
            raise ValueError("calendar boundaries do not hold now")
        self.start, self.end = (b0, b1) if now < b1 else (b1, b2) if now < b2 else (b2, b3)
        got = engine._get(key, now)
        self.count = int(got[1]) if got and got[0] == self.start else 0
        self.cap = limit - self.count
        self.reset = self.end - now

    def retry(self, x: int) -> int:
        return 0 if self.count + x <= self.limit else self.end - self.now

    def charge(self, k: int) -> None:
        self.count += k
        self.e.store[self.key] = [self.start, self.count]
        self.e.expires[self.key] = self.end

    def refund(self, k: int) -> None:
        if self.count > 0:
            self.count -= min(k, self.count)
            self.e.store[self.key] = [self.start, self.count]
