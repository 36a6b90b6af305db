"""API rate limits: one atomic Lua decision per call (``crm:ratelimit:<api>:<window>``)."""

from __future__ import annotations

from .._config import DEFAULT_RATE_LIMIT_WINDOW, RateLimitPolicy
from .._guard import FAILED
from .._keys import check_id, rate_limit_key
from .._ratelimit import (
    KEY_MEMO_SIZE,
    RateLimitResult,
    check_limit_args,
    choose_policy,
    degraded_result,
    result_from_reply,
)
from .._stats import Counter
from .._validate import MAX_TTL
from .core import AsyncCacheCore

__all__ = ["AsyncRateLimitsMixin"]


class AsyncRateLimitsMixin(AsyncCacheCore):
    """``check_rate_limit``."""

    async def check_rate_limit(
        self,
        api: str,
        limit: int,
        window: int = DEFAULT_RATE_LIMIT_WINDOW,
        *,
        cost: int = 1,
        policy: RateLimitPolicy | None = None,
    ) -> RateLimitResult:
        """Count one call to ``api`` against ``limit`` calls per ``window`` seconds.

        One Lua script checks and increments atomically and sets the window's expiry; a
        refused call is not counted. The result unpacks as ``allowed, current_count``.

        Args:
            api: the API's name (``"whatsapp"``); key ``crm:ratelimit:<api>:<window>``.
            limit: calls allowed per window (> 0).
            window: window length in seconds (> 0), default 60.
            cost: how many calls this one counts for (> 0).
            policy: what to answer when Redis cannot be asked: ``"open"`` allows the call,
                ``"closed"`` refuses it, ``"local"`` asks an in-process limiter; default
                the API's entry in ``rate_limit_policies``, else ``rate_limit_policy``.

        Raises:
            TypeError, ValueError: bad ``api``, ``limit``, ``window``, ``cost`` or
                ``policy``.
        """
        key = self._rate_limit_keys.get((api, window)) if type(api) is str else None
        if key is None:
            api = check_id("api", api, self._max_id)
        if not (
            type(limit) is int
            and type(window) is int
            and type(cost) is int
            and limit > 0
            and 0 < window <= MAX_TTL
            and cost > 0
        ):
            limit, window, cost = check_limit_args(limit, window, cost)
        if key is None:
            key = rate_limit_key(api, window)
            # Hot APIs are few; the bound keeps a caller with endless names from growing it.
            if len(self._rate_limit_keys) < KEY_MEMO_SIZE:
                self._rate_limit_keys[api, window] = key
        chosen = choose_policy(self.settings, api, policy)
        transport = self._active()
        if transport is not None:
            reply = await self._call(
                "check_rate_limit",
                transport.evalsha,
                transport.scripts.rate_limit,
                [key],
                [limit, window * 1000, cost],
            )
            if reply is not FAILED:
                result = result_from_reply(reply, limit)
                self._stats.count(
                    Counter.RATE_LIMIT_ALLOWED if result.allowed else Counter.RATE_LIMIT_REJECTED
                )
                return result
        self._stats.count(Counter.RATE_LIMIT_DEGRADED)
        if chosen == "local":
            return self._local_limiter.check(api, limit, window, cost)
        return degraded_result(chosen, limit)
