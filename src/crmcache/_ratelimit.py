"""The result of a rate-limit check, and decoding of the script's reply."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ._config import CacheSettings, RateLimitPolicy, check_policy
from ._validate import MAX_TTL, brief, positive_int

if TYPE_CHECKING:
    from ._ratelimit_algos import Engine, RateLimit, RateLimitsResult
from .models import MAX_VERSION

__all__ = [
    "KEY_MEMO_SIZE",
    "MAX_LIMIT",
    "MAX_WINDOW",
    "CorruptReply",
    "LocalRateLimiter",
    "RateLimitResult",
    "check_limit_args",
    "choose_policy",
    "degraded_result",
    "result_from_reply",
]

#: Longest rate-limit window accepted, in seconds (ten years).
MAX_WINDOW = MAX_TTL
#: Largest ``limit`` (and so ``cost``) accepted: ``rate_limit.lua`` compares counts as
#: Lua numbers, which are doubles, exact up to 2**53 (as versions are, ``MAX_VERSION``).
MAX_LIMIT = MAX_VERSION
#: Most (api, window) -> key entries a manager remembers (hot APIs are few; the bound keeps
#: a caller with endless names from growing the memo).
KEY_MEMO_SIZE = 4096


_new_pair = tuple.__new__


class RateLimitResult(tuple[bool, int]):
    """Outcome of :meth:`CRMCacheManager.check_rate_limit`, and of one limit in
    :meth:`CRMCacheManager.check_rate_limits`.

    It *is* the spec's pair ``(allowed, current_count)``: a ``tuple`` of two that unpacks
    (``allowed, current_count = cache.check_rate_limit(...)``), indexes (``result[0]`` is
    ``result.allowed``, ``result[1]`` the count), has ``len`` 2, compares equal to
    ``(allowed, current_count)`` and hashes as that pair. The other fields are read-only
    attributes; compare them by name (two results with the same pair are equal).

    Attributes:
        allowed: the call may proceed (and was counted).
        current_count: units counted in the current window, this call included if allowed
            (the count; ``count`` stays the tuple's method, as on any tuple).
        limit: units allowed per window (for ``gcra``: the burst).
        remaining: units still allowed now.
        retry_after: seconds until this call's cost would be allowed (0.0 when allowed);
            for ``check_rate_limit``, seconds until the window resets.
        reset: seconds until the limit is back to its full capacity (the window resets).
        degraded: Redis could not be asked; ``allowed`` comes from the failure policy.
    """

    # A tuple subclass carrying its other fields in a dict set in one step: about as fast
    # to build as the slotted class it replaced (measured), on a call that must stay
    # within a few microseconds of raw EVALSHA.

    allowed: bool
    current_count: int
    limit: int
    remaining: int
    retry_after: float
    reset: float
    degraded: bool

    def __new__(
        cls,
        allowed: bool,
        current_count: int,
        limit: int,
        remaining: int,
        retry_after: float,
        *,
        degraded: bool = False,
        reset: float | None = None,
    ) -> RateLimitResult:
        return _build(
            cls,
            allowed,
            current_count,
            limit,
            remaining,
            retry_after,
            retry_after if reset is None else reset,
            degraded,
        )

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"RateLimitResult is read-only (cannot set {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"RateLimitResult is read-only (cannot delete {name!r})")

    def __getnewargs_ex__(self) -> tuple[tuple[object, ...], dict[str, object]]:
        d = self.__dict__
        return (
            (d["allowed"], d["current_count"], d["limit"], d["remaining"], d["retry_after"]),
            {"degraded": d["degraded"], "reset": d["reset"]},
        )

    def fields(self) -> tuple[bool, int, int, int, float, float, bool]:
        """Every field, to compare results in full: ``(allowed, current_count, limit,
        remaining, retry_after, reset, degraded)``."""
        d = self.__dict__
        return (
            d["allowed"],
            d["current_count"],
            d["limit"],
            d["remaining"],
            d["retry_after"],
            d["reset"],
            d["degraded"],
        )

    def __repr__(self) -> str:
        d = self.__dict__
        return (
            f"RateLimitResult(allowed={d['allowed']!r}, current_count={d['current_count']!r}, "
            f"limit={d['limit']!r}, remaining={d['remaining']!r}, "
            f"retry_after={d['retry_after']!r}, reset={d['reset']!r}, "
            f"degraded={d['degraded']!r})"
        )


def _new_engine(max_keys: int) -> Engine:
    from ._ratelimit_algos import Engine  # noqa: PLC0415 - that module imports this one

    return Engine(max_keys=max_keys)


class CorruptReply(Exception):  # noqa: N818 - internal signal, never reaches callers
    """``rate_limit.lua`` answered what no correct run of it can: the call degrades."""


def check_limit_args(limit: object, window: object, cost: object) -> tuple[int, int, int]:
    """Validate ``limit``, ``window`` (seconds) and ``cost``; return them as plain ints
    (an ``IntEnum`` member is accepted, but redis-py would refuse to send it).

    Raises:
        TypeError: a value is not an int (bools are refused too).
        ValueError: a value is <= 0, ``limit`` is above :data:`MAX_LIMIT`, ``window`` is
            longer than ten years, or ``cost`` is above ``limit`` (such a call could never
            be allowed).
    """
    limit = positive_int("limit", limit)
    window = positive_int("window", window)
    cost = positive_int("cost", cost)
    if limit > MAX_LIMIT:
        raise ValueError(f"limit must be at most {MAX_LIMIT}, got {brief(limit)}")
    if window > MAX_WINDOW:
        raise ValueError(f"window must be at most {MAX_WINDOW} seconds, got {brief(window)}")
    if cost > limit:
        raise ValueError(
            f"cost must be at most limit ({limit}): a call that costs more can never be "
            f"allowed; got {brief(cost)}"
        )
    return limit, window, cost


#: Sets a result's ``__dict__`` in one step: the class's own descriptor, called directly
#: (``object.__setattr__`` looks it up on every call).
_set_dict: Callable[[RateLimitResult, dict[str, object]], None] = RateLimitResult.__dict__[
    "__dict__"
].__set__


def _build(  # noqa: PLR0917 - positional: the hot path pays for keywords
    cls: type[RateLimitResult],
    allowed: bool,
    current_count: int,
    limit: int,
    remaining: int,
    retry_after: float,
    reset: float,
    degraded: bool,
) -> RateLimitResult:
    """A result, every field given: what ``RateLimitResult(...)`` does, without its
    keyword handling (a check's reply is turned into one on every call)."""
    self = _new_pair(cls, (allowed, current_count))
    _set_dict(
        self,
        {
            "allowed": allowed,
            "current_count": current_count,
            "limit": limit,
            "remaining": remaining,
            "retry_after": retry_after,
            "reset": reset,
            "degraded": degraded,
        },
    )
    return self


def result_from_reply(reply: object, limit: int, window_ms: int) -> RateLimitResult:
    """Build a result from ``rate_limit.lua``'s ``{allowed, count, ttl_ms}`` reply.

    Raises:
        CorruptReply: the reply is not three ints that a correct run can give: ``allowed``
            0 or 1, ``0 <= count``, ``count <= limit`` when allowed (and at least 1, this
            call), ``0 <= ttl_ms <= window_ms``.
    """
    allowed: object
    count: object
    ttl_ms: object
    try:
        allowed, count, ttl_ms = reply  # type: ignore[misc]
    except (TypeError, ValueError):
        raise CorruptReply(f"expected {{allowed, count, ttl_ms}}, got {reply!r:.80}") from None
    if not (
        type(count) is int
        and type(ttl_ms) is int
        and type(allowed) is int
        and 0 <= ttl_ms <= window_ms
        and (0 < count <= limit if allowed == 1 else allowed == 0 and count >= 0)
    ):
        raise CorruptReply(
            f"impossible reply {{{allowed!r:.20}, {count!r:.30}, {ttl_ms!r:.30}}} for "
            f"limit={limit}, window={window_ms} ms"
        )
    remaining = limit - count
    retry_after = ttl_ms / 1000.0
    return _build(
        RateLimitResult,
        allowed == 1,
        count,
        limit,
        remaining if remaining > 0 else 0,
        retry_after,
        retry_after,
        False,
    )


def choose_policy(settings: CacheSettings, api: str, policy: object) -> RateLimitPolicy:
    """The failure policy for one call: ``policy`` if given (validated), else the API's
    own from ``rate_limit_policies``, else the manager's ``rate_limit_policy``.

    Raises:
        TypeError, ValueError: ``policy`` is not one of the policies.
    """
    if policy is not None:
        return check_policy(policy, "policy")
    return settings.rate_limit_policies.get(api, settings.rate_limit_policy)


def degraded_result(policy: RateLimitPolicy, limit: int) -> RateLimitResult:
    """What ``"open"`` or ``"closed"`` answers when Redis cannot be asked: allow with the
    whole limit left, or refuse with a retry in one second (``degraded=True`` either way).
    """
    allowed = policy == "open"
    return RateLimitResult(
        allowed=allowed,
        current_count=0,
        limit=limit,
        remaining=limit if allowed else 0,
        retry_after=0.0 if allowed else 1.0,
        degraded=True,
    )


class LocalRateLimiter:
    """In-process fixed-window limiter: the ``"local"`` policy's fallback while Redis is away.

    Each process enforces ``ceil(limit * share)`` calls per window on its own, so with
    ``share = 1 / processes`` a fleet keeps to about the shared limit during an outage. The
    window starts with the first call seen locally (the process's monotonic clock: there is
    no Redis clock to ask). Bounded: at most ``max_keys`` windows are remembered.
    """

    def __init__(self, share: float, *, max_keys: int = 10_000) -> None:
        self._share = share
        self._max_keys = max_keys
        self._lock = threading.Lock()
        # (api, window) -> (window start, count)
        self._windows: dict[tuple[str, int], tuple[float, int]] = {}
        self._engine: Engine | None = None

    def check(self, api: str, limit: int, window: int, cost: int) -> RateLimitResult:
        """Count a call locally; the result is marked ``degraded``."""
        local_limit = max(1, math.ceil(limit * self._share))
        now = time.monotonic()
        with self._lock:
            start, count = self._windows.get((api, window), (now, 0))
            if now - start >= window:
                start, count = now, 0
            allowed = count + cost <= local_limit
            if allowed:
                count += cost
            if len(self._windows) >= self._max_keys and (api, window) not in self._windows:
                self._evict_expired(now)
            self._windows[api, window] = (start, count)
        return RateLimitResult(
            allowed,
            count,
            local_limit,
            max(local_limit - count, 0),
            max(start + window - now, 0.0),
            degraded=True,
        )

    def run_set(
        self,
        keys: Sequence[str],
        limits: Sequence[RateLimit],
        cost: int,
        mode: str,
        now_us: int,
    ) -> tuple[bool, int, RateLimitsResult]:
        """Check, take (``mode`` ``"u"``) or refund (``"r"``) a set of limits locally, by
        their own algorithms (``crmcache._ratelimit_algos.Engine``, the script's twin),
        each limit scaled by the share as :meth:`check` scales it (a gcra limit's rate
        and burst alike). ``now_us`` is the process's wall clock: calendar windows need
        one. The result is marked ``degraded``."""
        from ._ratelimit_algos import decode_reply, script_args  # noqa: PLC0415 - cycle

        share = self._share
        args: list[str | int] = []
        capacities = []
        for item in limits:
            kind, limit, *rest = script_args(item, now_us)
            local = max(1, math.ceil(int(limit) * share))
            if kind == "g" and share < 1:
                rest[0] = math.ceil(int(rest[0]) / share)
            args += [kind, local, *rest]
            capacities.append(local)
        with self._lock:
            engine = self._engine
            if engine is None:
                engine = self._engine = _new_engine(self._max_keys)
            reply = engine.run(keys, args, now_us, cost, mode)
        return decode_reply(reply, limits, cost, degraded=True, capacities=capacities)

    def _evict_expired(self, now: float) -> None:
        expired = [k for k, (start, _) in self._windows.items() if now - start >= k[1]]
        for key in expired:
            del self._windows[key]
        if len(self._windows) >= self._max_keys:
            # All live: drop the oldest windows rather than grow without bound.
            for key in sorted(self._windows, key=lambda k: self._windows[k][0])[
                : self._max_keys // 10
            ]:
                del self._windows[key]
