"""Several rate limits in one atomic step: ``check_rate_limits``, ``acquire_up_to``,
``refund`` (one EVALSHA of ``lua/rate_limits.lua`` per call; see ``crmcache._ratelimit_algos``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from .._cluster import slot_of
from .._config import RateLimitPolicy, check_policy, is_cluster_url
from .._guard import FAILED
from .._ratelimit import CorruptReply, RateLimitResult, degraded_result
from .._ratelimit_algos import (
    RateLimit,
    RateLimitsResult,
    check_cost,
    check_limits,
    decode_reply,
    wire_args,
)
from .._stats import Counter
from .core import AsyncCacheCore

__all__ = ["AsyncRateLimitSetsMixin"]

logger = logging.getLogger("crmcache")

#: How strict each failure policy is: a set takes the strictest of its limits'.
_STRICTNESS: dict[str, int] = {"open": 0, "local": 1, "closed": 2}


class AsyncRateLimitSetsMixin(AsyncCacheCore):
    """``check_rate_limits``, ``acquire_up_to``, ``refund``."""

    #: Tests only: the time the script runs at (µs since the epoch), instead of Redis's
    #: ``TIME``. It drives the sliding, gcra and calendar algorithms (not key expiry).
    _rate_limit_clock: Callable[[], int] | None = None

    async def check_rate_limits(
        self,
        limits: Sequence[RateLimit],
        cost: int = 1,
        policy: RateLimitPolicy | None = None,
    ) -> RateLimitsResult:
        """Check ``cost`` against every limit at once; charge all of them or none.

        One Lua script reads every limit, decides, and charges each only if all allow:
        a refused call is charged nowhere.

        Args:
            limits: the :class:`RateLimit` objects (1 to 32, each at most once). On a
                Redis Cluster their keys must share a hash slot: give them one ``group``.
            cost: units this call takes (0 to the smallest limit; ``gcra``: burst).
                ``cost=0`` peeks: nothing is charged, and ``allowed`` / ``retry_after``
                say whether (and when) a call of cost 1 would be allowed.
            policy: what to answer, for the whole set, when Redis cannot be asked:
                ``"open"``, ``"closed"`` or ``"local"``; default the strictest of the
                limits' policies (``rate_limit_policies`` by name, else
                ``rate_limit_policy``).

        Returns:
            ``allowed``, ``blocked_by``, ``retry_after`` and one ``RateLimitResult`` per
            limit (count, remaining, reset), in order.

        Raises:
            TypeError, ValueError: bad ``limits``, ``cost`` (above a limit: the message
                names both) or ``policy``; on a cluster, keys in different slots.
        """
        limits = check_limits(limits)
        cost = check_cost(limits, cost)
        chosen = self._set_policy(limits, policy)
        decoded = await self._run_limits("check_rate_limits", limits, cost, "c")
        if decoded is not None:
            outcome = decoded[2]
            if cost:
                if outcome.allowed:
                    self._stats.rate_limit_set(
                        Counter.RATE_LIMIT_ALLOWED, (limit.name for limit in limits)
                    )
                else:
                    refused = zip(limits, outcome.results, strict=True)
                    self._stats.rate_limit_set(
                        Counter.RATE_LIMIT_REJECTED,
                        (limit.name for limit, result in refused if not result.allowed),
                    )
            return outcome
        self._stats.rate_limit_set(Counter.RATE_LIMIT_DEGRADED, (limit.name for limit in limits))
        if chosen == "local":
            return self._local_run(limits, cost, "c")[2]
        return _degraded_set(chosen, limits)

    async def acquire_up_to(
        self,
        limits: Sequence[RateLimit],
        n: int,
        policy: RateLimitPolicy | None = None,
    ) -> int:
        """Take as many of ``n`` units as every limit allows now (0 to ``n``), charged to
        every limit in one atomic step: a campaign sends that many now, the rest later.

        Args:
            limits: as for :meth:`check_rate_limits`.
            n: the units wanted (>= 0; may exceed the limits).
            policy: as for :meth:`check_rate_limits`.

        Returns:
            The units granted. When Redis cannot be asked: ``n`` under ``"open"``, 0
            under ``"closed"``, the local limiter's answer under ``"local"``.
        """
        limits = check_limits(limits)
        n = check_cost((), n, name="n")
        chosen = self._set_policy(limits, policy)
        decoded = await self._run_limits("acquire_up_to", limits, n, "u")
        if decoded is not None:
            return decoded[1]
        self._stats.count(Counter.RATE_LIMIT_DEGRADED)
        if chosen == "local":
            return self._local_run(limits, n, "u")[1]
        return n if chosen == "open" else 0

    async def refund(self, limits: Sequence[RateLimit], cost: int = 1) -> bool:
        """Give ``cost`` units back to every limit (a send that failed downstream).

        A count never goes below zero and no window is extended: a refund after the
        window ended gives nothing back to the next one. For ``sliding`` the units come
        off the current window first, then the previous; for ``gcra`` the theoretical
        arrival time moves back by ``cost`` emission intervals (never before now).

        Returns:
            True if Redis applied it; False if it could not be asked (the local
            limiter, which counts calls while Redis is away, is refunded then).

        Raises:
            TypeError, ValueError: bad ``limits`` or ``cost``.
        """
        limits = check_limits(limits)
        cost = check_cost(limits, cost)
        if cost == 0:
            return True
        decoded = await self._run_limits("refund", limits, cost, "r")
        if decoded is not None:
            return True
        self._local_run(limits, cost, "r")
        return False

    # -- shared --------------------------------------------------------------------------

    def _set_policy(self, limits: Sequence[RateLimit], policy: object) -> RateLimitPolicy:
        if policy is not None:
            return check_policy(policy, "policy")
        settings = self.settings
        chosen: RateLimitPolicy = settings.rate_limit_policy
        named = settings.rate_limit_policies
        if named:
            for item in limits:
                own = named.get(item.name, chosen)
                if _STRICTNESS[own] > _STRICTNESS[chosen]:
                    chosen = own
        return chosen

    def _limit_keys(self, limits: Sequence[RateLimit]) -> list[str]:
        prefix = self._keys.rate_limit_prefix
        keys = []
        for item in limits:
            if len(item.name) > self._max_id:
                raise ValueError(
                    f"name is longer than {self._max_id} characters ({len(item.name)})"
                )
            keys.append(prefix + item.key_suffix())
        if len(keys) > 1 and is_cluster_url(self.settings.redis_url):
            slots = {slot_of(key) for key in keys}
            if len(slots) > 1:
                raise ValueError(
                    "limits checked together on a Redis Cluster must share a hash slot, "
                    f"and these span {len(slots)}: give them one group "
                    '(RateLimit(..., group="sms")), or check them in separate calls'
                )
        if not self._quotas_in_use and any(item.is_quota for item in limits):
            self._quotas_in_use = True
        return keys

    def _now_us(self) -> int:
        clock = self._rate_limit_clock
        if clock is not None:
            return clock()
        return _wall_us()

    async def _run_limits(
        self, op: str, limits: Sequence[RateLimit], cost: int, mode: str
    ) -> tuple[bool, int, RateLimitsResult] | None:
        """Run the script; None when Redis could not be asked or answered nonsense."""
        keys = self._limit_keys(limits)
        transport = self._active()
        if transport is None:
            return None
        clock = self._rate_limit_clock
        # The wall clock only picks calendar periods (the script runs on Redis's TIME).
        now = clock() if clock is not None else 0
        args: list[bytes | int | str] = [b"" if clock is None else now, cost, mode]
        for item in limits:
            wire = item._wire
            if not wire:
                wire = wire_args(item, now if clock is not None else _wall_us())
            args += wire
        reply = await self._call(op, transport.evalsha, transport.scripts.rate_limits, keys, args)
        if reply is FAILED:
            return None
        try:
            return decode_reply(reply, limits, cost)
        except CorruptReply as exc:
            self._corrupt_set_reply(keys[0], exc)
            return None

    def _local_run(
        self, limits: Sequence[RateLimit], cost: int, mode: str
    ) -> tuple[bool, int, RateLimitsResult]:
        prefix = self._keys.rate_limit_prefix
        keys = [prefix + item.key_suffix() for item in limits]
        return self._local_limiter.run_set(keys, limits, cost, mode, self._now_us())

    def _corrupt_set_reply(self, key: str, exc: CorruptReply) -> None:
        self._stats.count(Counter.CORRUPT_VALUES)
        suppressed = self._corrupt_reply_log.ready()
        if suppressed is not None:
            logger.warning(
                "rate_limits.lua gave %s an impossible reply (%s); the call degraded by "
                "the failure policy (%d more not logged)",
                key,
                exc,
                suppressed,
            )


def _wall_us() -> int:
    return time.time_ns() // 1000


def _degraded_set(policy: RateLimitPolicy, limits: Sequence[RateLimit]) -> RateLimitsResult:
    """``"open"`` or ``"closed"`` for a whole set (``degraded=True``)."""
    results: tuple[RateLimitResult, ...] = tuple(
        degraded_result(policy, item.capacity) for item in limits
    )
    if policy == "open":
        return RateLimitsResult(True, None, 0.0, results, degraded=True)
    return RateLimitsResult(False, limits[0], 1.0, results, degraded=True)
