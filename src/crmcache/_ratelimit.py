"""The result of a rate-limit check, and decoding of the script's reply."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ._config import MAX_TTL
from ._validate import positive_int

__all__ = ["MAX_WINDOW", "RateLimitResult", "check_limit_args", "result_from_reply"]

#: Longest rate-limit window accepted, in seconds (ten years).
MAX_WINDOW = MAX_TTL


@dataclass(frozen=True, slots=True)
class RateLimitResult:
    """Outcome of :meth:`CRMCacheManager.check_rate_limit`.

    Unpacks as the spec's pair: ``allowed, current_count = cache.check_rate_limit(...)``.

    Attributes:
        allowed: the call may proceed (and was counted).
        current_count: calls counted in the current window, this one included if allowed.
        limit: calls allowed per window.
        remaining: calls still allowed in this window.
        retry_after: seconds until the window resets (0.0 when allowed and unknown).
        degraded: Redis could not be asked; ``allowed`` comes from the failure policy.
    """

    allowed: bool
    current_count: int
    limit: int
    remaining: int
    retry_after: float
    degraded: bool = False

    def __iter__(self) -> Iterator[bool | int]:
        """Yield ``allowed`` then ``current_count``, so the result unpacks as a pair."""
        yield self.allowed
        yield self.current_count


def check_limit_args(limit: object, window: object, cost: object) -> tuple[int, int, int]:
    """Validate ``limit``, ``window`` (seconds) and ``cost``.

    Raises:
        TypeError: a value is not an int (bools are refused too).
        ValueError: a value is <= 0, or ``window`` is longer than ten years.
    """
    checked = (
        positive_int("limit", limit),
        positive_int("window", window),
        positive_int("cost", cost),
    )
    if checked[1] > MAX_WINDOW:
        raise ValueError(f"window must be at most {MAX_WINDOW} seconds, got {window}")
    return checked


def result_from_reply(reply: Sequence[int], limit: int) -> RateLimitResult:
    """Build a result from ``rate_limit.lua``'s ``{allowed, count, ttl_ms}`` reply."""
    allowed, count, ttl_ms = (int(x) for x in reply)
    return RateLimitResult(
        allowed=bool(allowed),
        current_count=count,
        limit=limit,
        remaining=max(limit - count, 0),
        retry_after=max(ttl_ms, 0) / 1000.0,
    )
