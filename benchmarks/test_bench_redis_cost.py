"""Redis-side cost of each script: ``INFO commandstats`` ``usec`` per call.

The other benchmarks time the whole round trip from Python; this one asks the server how
long it spent *executing* each command, which is what a busy shared Redis pays for every
caller (it runs commands one at a time). For each operation: ``CONFIG RESETSTAT``, ``N``
calls, then ``cmdstat_<command>`` from ``INFO commandstats``:

* ``rate_limit``: ``check_rate_limit`` (EVALSHA of rate_limit.lua, the allowed path);
* ``prefs_set``: ``set_client_preferences`` (EVALSHA of prefs_set.lua, the versioned set:
  GET, version compare, SET PX);
* ``get`` and ``set``: a plain ``GET`` of a cached preferences value and a
  ``SET key value EX 3600`` of one, the baselines.

Each test records ``usec_per_call`` (the server's total ``usec`` over ``calls``, computed
here rather than taken from Redis's two-decimal figure) and the client's wall time per
call in ``benchmark.extra_info``; ``report.py`` shows them as a table of their own, with
the target "rate-limit script <= 10 µs per call". Redis times each command in whole
microseconds, so a sub-microsecond command averages out only over many calls.

Skipped where the server refuses ``CONFIG RESETSTAT`` (an external server with ``CONFIG``
renamed away).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import redis
from pytest_benchmark.fixture import BenchmarkFixture

from crmcache import ClientPreferences, CRMCacheManager, MessageChannel, RateLimit
from crmcache._codec import encode_preferences
from crmcache._keys import prefs_key

CALLS = 10_000
SMOKE_CALLS = 50
CLIENT_ID = "bench-cost-client"
KEY = prefs_key(CLIENT_ID)
API = "bench-cost"
LIMIT = 10**9
WINDOW = 60
TTL = 3600
REPORT_TABLE = "redis-cost"

PREFS = ClientPreferences(
    client_id=CLIENT_ID,
    preferred_channels=[MessageChannel.SMS, MessageChannel.EMAIL],
    timezone="Europe/Paris",
    language="fr",
    version=5,
)
PAYLOAD = encode_preferences(PREFS)


@dataclass(frozen=True)
class Operation:
    """One measured operation: what it runs on the server, and how to call it once."""

    name: str
    command: str  # as INFO commandstats names it
    description: str
    make: Callable[[CRMCacheManager, redis.Redis], Callable[[], object]]


def _rate_limit(cache: CRMCacheManager, raw: redis.Redis) -> Callable[[], object]:
    def call() -> object:
        result = cache.check_rate_limit(API, LIMIT, WINDOW)
        assert result.allowed
        assert not result.degraded
        return result

    return call


def _prefs_set(cache: CRMCacheManager, raw: redis.Redis) -> Callable[[], object]:
    def call() -> object:
        # The same version every time: accepted (it refreshes the TTL), so each call takes
        # the full path, GET + compare + SET PX.
        stored = cache.set_client_preferences(PREFS)
        assert stored
        return stored

    return call


def _get(cache: CRMCacheManager, raw: redis.Redis) -> Callable[[], object]:
    def call() -> object:
        value = raw.get(KEY)
        assert value == PAYLOAD
        return value

    return call


def _set(cache: CRMCacheManager, raw: redis.Redis) -> Callable[[], object]:
    def call() -> object:
        stored = raw.set(KEY, PAYLOAD, ex=TTL)
        assert stored
        return stored

    return call


def _rate_limits(
    *limits: RateLimit,
) -> Callable[[CRMCacheManager, redis.Redis], Callable[[], object]]:
    def make(cache: CRMCacheManager, raw: redis.Redis) -> Callable[[], object]:
        def call() -> object:
            result = cache.check_rate_limits(list(limits))
            assert result.allowed
            assert not result.degraded
            return result

        return call

    return make


#: One limit of each algorithm, and the issue's set of three (one hash tag).
SET_OF_THREE = (
    RateLimit("cost-set:s", LIMIT, 1, group="cost"),
    RateLimit("cost-set:d", LIMIT, "day", timezone="America/New_York", group="cost"),
    RateLimit("cost-set:w", LIMIT, 7 * 86400, algorithm="sliding", group="cost"),
)

OPERATIONS = (
    Operation("rate_limit", "evalsha", "check_rate_limit (rate_limit.lua)", _rate_limit),
    Operation(
        "rate_limits_fixed",
        "evalsha",
        "check_rate_limits, one fixed limit",
        _rate_limits(RateLimit("cost-fixed", LIMIT, WINDOW)),
    ),
    Operation(
        "rate_limits_sliding",
        "evalsha",
        "check_rate_limits, one sliding limit",
        _rate_limits(RateLimit("cost-sliding", LIMIT, WINDOW, algorithm="sliding")),
    ),
    Operation(
        "rate_limits_gcra",
        "evalsha",
        "check_rate_limits, one gcra limit",
        _rate_limits(RateLimit("cost-gcra", LIMIT, WINDOW, algorithm="gcra")),
    ),
    Operation(
        "rate_limits_calendar",
        "evalsha",
        "check_rate_limits, one calendar-day limit",
        _rate_limits(RateLimit("cost-day", LIMIT, "day", timezone="America/New_York")),
    ),
    Operation(
        "rate_limits_three",
        "evalsha",
        "check_rate_limits, 3 limits (per second, per day, sliding week)",
        _rate_limits(*SET_OF_THREE),
    ),
    Operation("prefs_set", "evalsha", "set_client_preferences (prefs_set.lua)", _prefs_set),
    Operation("get", "get", "GET of a cached preferences value", _get),
    Operation("set", "set", "SET key value EX 3600", _set),
)


def _reset_stats(raw: redis.Redis) -> None:
    try:
        raw.config_resetstat()
    except redis.ResponseError as exc:
        pytest.skip(f"the server refuses CONFIG RESETSTAT: {exc}")


def _command_stats(raw: redis.Redis, command: str) -> tuple[int, int]:
    """(calls, usec) of ``command`` since the last reset; (0, 0) if it never ran."""
    info = raw.info("commandstats")
    entry = info.get(f"cmdstat_{command}")
    if not isinstance(entry, dict):
        return 0, 0
    return int(entry["calls"]), int(entry["usec"])


@pytest.mark.benchmark(group="redis-cost")
@pytest.mark.parametrize("operation", OPERATIONS, ids=[op.name for op in OPERATIONS])
def test_redis_cost(
    benchmark: BenchmarkFixture,
    cache: CRMCacheManager,
    raw: redis.Redis,
    operation: Operation,
) -> None:
    raw.set(KEY, PAYLOAD, ex=TTL)
    call = operation.make(cache, raw)
    # Untimed first calls: scripts loaded (a NOSCRIPT retry would be counted), connection
    # open, names set.
    for _ in range(3):
        call()
    calls = SMOKE_CALLS if benchmark.disabled else CALLS

    def run() -> float:
        began = time.perf_counter()
        for _ in range(calls):
            call()
        return time.perf_counter() - began

    _reset_stats(raw)
    wall_s: float = benchmark.pedantic(run, rounds=1, iterations=1)  # type: ignore[no-untyped-call]
    counted, usec = _command_stats(raw, operation.command)
    assert counted == calls, (
        f"cmdstat_{operation.command} counted {counted} calls, expected {calls} "
        "(is another client using this server?)"
    )
    benchmark.extra_info.update(
        report_table=REPORT_TABLE,
        operation=operation.name,
        command=operation.command.upper(),
        description=operation.description,
        calls=counted,
        usec=usec,
        usec_per_call=usec / counted,
        client_us_per_call=wall_s * 1e6 / calls,
    )
