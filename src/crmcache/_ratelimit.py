"""The result of a rate-limit check, and decoding of the script's reply."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from ._config import MAX_TTL
from ._validate import positive_int

__all__ = ["MAX_WINDOW", "RateLimitResult", "check_limit_args", "result_from_reply"]

#: Longest rate-limit window accepted, in seconds (ten years).
MAX_WINDOW = MAX_TTL


class RateLimitResult:
    """Outcome of :meth:`CRMCacheManager.check_rate_limit`.

    Unpacks as the spec's pair: ``allowed, current_count = cache.check_rate_limit(...)``.
    Read-only; compares equal field by field.

    Attributes:
        allowed: the call may proceed (and was counted).
        current_count: calls counted in the current window, this one included if allowed.
        limit: calls allowed per window.
        remaining: calls still allowed in this window.
        retry_after: seconds until the window resets.
        degraded: Redis could not be asked; ``allowed`` comes from the failure policy.
    """

    # A hand-written slotted class: a frozen dataclass's __init__ costs about a
    # microsecond more, on a call that must stay within a few microseconds of raw EVALSHA.
    __slots__ = ("allowed", "current_count", "degraded", "limit", "remaining", "retry_after")
    _FIELDS = ("allowed", "current_count", "limit", "remaining", "retry_after", "degraded")

    allowed: bool
    current_count: int
    limit: int
    remaining: int
    retry_after: float
    degraded: bool

    def __init__(
        self,
        allowed: bool,
        current_count: int,
        limit: int,
        remaining: int,
        retry_after: float,
        *,
        degraded: bool = False,
    ) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "allowed", allowed)
        setattr_(self, "current_count", current_count)
        setattr_(self, "limit", limit)
        setattr_(self, "remaining", remaining)
        setattr_(self, "retry_after", retry_after)
        setattr_(self, "degraded", degraded)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"RateLimitResult is read-only (cannot set {name!r})")

    def __iter__(self) -> Iterator[bool | int]:
        """Yield ``allowed`` then ``current_count``, so the result unpacks as a pair."""
        yield self.allowed
        yield self.current_count

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, f) for f in self._FIELDS)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RateLimitResult):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._FIELDS)
        return f"RateLimitResult({fields})"


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
    allowed, count, ttl_ms = reply
    remaining = limit - count
    return RateLimitResult(
        allowed == 1,
        count,
        limit,
        remaining if remaining > 0 else 0,
        ttl_ms / 1000.0 if ttl_ms > 0 else 0.0,
    )
