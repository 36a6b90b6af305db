"""API rate limits: one atomic Lua decision per call (``<prefix>:ratelimit:<api>:<window>``)."""

from __future__ import annotations

import logging

from .._config import DEFAULT_RATE_LIMIT_WINDOW, RateLimitPolicy, check_policy
from .._guard import FAILED
from .._keys import check_id
from .._ratelimit import (
    KEY_MEMO_SIZE,
    MAX_LIMIT,
    MAX_WINDOW,
    CorruptReply,
    RateLimitResult,
    check_limit_args,
    choose_policy,
    degraded_result,
    result_from_reply,
)
from .._ratelimit_algos import QUOTA_WINDOW
from .._stats import Counter
from .core import AsyncCacheCore

__all__ = ["AsyncRateLimitsMixin"]

logger = logging.getLogger("crmcache")


#: The decisions counted on every check (module constants: no enum lookup per call).
_ALLOWED = Counter.RATE_LIMIT_ALLOWED
_REJECTED = Counter.RATE_LIMIT_REJECTED


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
            api: the API's name (``"whatsapp"``); key ``<prefix>:ratelimit:<api>:<window>``.
            limit: calls allowed per window (> 0, at most 2**53 - 1).
            window: window length in seconds (> 0, at most ten years), default 60.
            cost: how many calls this one counts for (> 0, at most ``limit``).
            policy: what to answer when Redis cannot be asked: ``"open"`` allows the call,
                ``"closed"`` refuses it, ``"local"`` asks an in-process limiter; default
                the API's entry in ``rate_limit_policies``, else ``rate_limit_policy``.

        Raises:
            TypeError, ValueError: bad ``api``, ``limit``, ``window``, ``cost`` or
                ``policy`` (the error names it); ``cost`` above ``limit``.
        """
        if not (
            type(limit) is int
            and type(window) is int
            and type(cost) is int
            and 0 < cost <= limit <= MAX_LIMIT
            and 0 < window <= MAX_WINDOW
        ):
            limit, window, cost = check_limit_args(limit, window, cost)
        # window is a plain int now: a list or a dict cannot make the lookup raise.
        key = self._rate_limit_keys.get((api, window)) if type(api) is str else None
        if key is None:
            api = check_id("api", api, self._max_id)
            key = self._keys.rate_limit_key(api, window)
            if window >= QUOTA_WINDOW:
                self._quotas_in_use = True  # see health_check: is the server persistent?
            # Hot APIs are few; the bound keeps a caller with endless names from growing it.
            if len(self._rate_limit_keys) < KEY_MEMO_SIZE:
                self._rate_limit_keys[api, window] = key
        if policy is not None:  # checked now, chosen only if Redis cannot answer
            policy = check_policy(policy, "policy")
        transport = self._active()
        if transport is not None:
            window_ms = window * 1000
            reply = await self._call(
                "check_rate_limit",
                transport.evalsha,
                transport.scripts.rate_limit,
                [key],
                [limit, window_ms, cost],
            )
            if reply is not FAILED:
                try:
                    result = result_from_reply(reply, limit, window_ms)
                except CorruptReply as exc:
                    self._corrupt_reply(key, exc)
                else:
                    self._stats.rate_limit(api, _ALLOWED if result.allowed else _REJECTED)
                    return result
        self._stats.rate_limit(api, Counter.RATE_LIMIT_DEGRADED)
        chosen = choose_policy(self.settings, api, policy)
        if chosen == "local":
            return self._local_limiter.check(api, limit, window, cost)
        return degraded_result(chosen, limit)

    def _corrupt_reply(self, key: str, exc: CorruptReply) -> None:
        """Count a reply no correct run of the script gives (the call then degrades by the
        policy) and log it, at most once per 30 s."""
        self._stats.count(Counter.CORRUPT_VALUES)
        suppressed = self._corrupt_reply_log.ready()
        if suppressed is not None:
            logger.warning(
                "rate_limit.lua gave %s an impossible reply (%s); the call degraded by the "
                "failure policy (%d more not logged)",
                key,
                exc,
                suppressed,
            )
