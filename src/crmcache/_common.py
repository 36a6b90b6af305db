"""Constants and small pure helpers shared by the sync and async facades (no I/O)."""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from ._config import MAX_TTL
from ._keys import template_key
from ._validate import positive_int
from .models import MessageChannel

__all__ = [
    "ADMIN_CONNECTIONS",
    "DEFAULT_LEASE_TTL",
    "HEALTH_CHECK_INTERVAL",
    "KEY_MEMO_SIZE",
    "LOW_HIT_RATE_THRESHOLD",
    "MAX_BATCH",
    "MIN_LOOKUPS_FOR_HIT_RATE_WARNING",
    "NEAR_RECONNECT_FIRST",
    "NEAR_RECONNECT_MAX",
    "REPLAY_FIRST_DELAY",
    "REPLAY_MAX_DELAY",
    "SCAN_BUDGET",
    "SCAN_COUNT",
    "TEMPLATE_PREFIX",
    "WRONG_TYPE",
    "LeaseState",
    "TemplateRef",
    "seconds_to_ms",
    "ttl_ms",
]

#: A template is named by (name, channel); the channel may be given as its string value.
TemplateRef = tuple[str, MessageChannel | str]

#: Below this many lookups a low hit rate says nothing and is not logged.
MIN_LOOKUPS_FOR_HIT_RATE_WARNING = 100
#: Hit rate (percent) under which get_cache_stats logs a WARNING (spec: 50).
LOW_HIT_RATE_THRESHOLD = 50.0
#: Most templates one batched call may ask for.
MAX_BATCH = 10_000
#: Time budget for counting crm:* keys with SCAN in get_cache_stats, in seconds.
SCAN_BUDGET = 2.0
SCAN_COUNT = 1000
#: Seconds before the first replay of failed invalidations, and the most between tries.
REPLAY_FIRST_DELAY = 0.2
REPLAY_MAX_DELAY = 5.0
#: Seconds before the near-cache listener reconnects, first and at most.
NEAR_RECONNECT_FIRST = 0.1
NEAR_RECONNECT_MAX = 5.0
#: Connections redis-py's own pool may open for SCAN and INFO (get_cache_stats).
ADMIN_CONNECTIONS = 2
#: Seconds between connection health checks (PING before reuse of an idle connection).
HEALTH_CHECK_INTERVAL = 30
#: Most (api, window) -> key entries remembered by check_rate_limit.
KEY_MEMO_SIZE = 4096
#: Seconds a database-load lease lives if its holder never releases it.
DEFAULT_LEASE_TTL = 2.0

#: A GET that found a value of the wrong type (reported, not raised).
WRONG_TYPE: Final = object()
#: Key prefix per channel, under the enum member and its string value alike.
TEMPLATE_PREFIX: dict[object, str] = {
    **{c: template_key(c, "") for c in MessageChannel},
    **{c.value: template_key(c, "") for c in MessageChannel},
}


class LeaseState(StrEnum):
    """Outcome of ``acquire_load_lease``."""

    ACQUIRED = "acquired"
    BUSY = "busy"
    UNAVAILABLE = "unavailable"


def ttl_ms(name: str, seconds: object) -> int:
    """A TTL argument in whole seconds, validated, as milliseconds."""
    value = positive_int(name, seconds)
    if value > MAX_TTL:
        raise ValueError(f"{name} must be at most {MAX_TTL} seconds, got {value}")
    return value * 1000


def seconds_to_ms(name: str, seconds: object) -> int:
    """A duration argument in (fractional) seconds, validated, as milliseconds."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise TypeError(f"{name} must be a number of seconds, not {type(seconds).__name__}")
    if not 0 < seconds < 86400:
        raise ValueError(f"{name} must be between 0 and 86400 seconds, got {seconds}")
    return max(int(seconds * 1000), 1)
