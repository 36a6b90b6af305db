"""Rate limits: one atomic script, exact counts under threads and processes, expiry."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from enum import IntEnum

import pytest
import redis

from crmcache import CRMCacheManager, RateLimitResult
from crmcache._replies import script_contract
from crmcache._scripts import RegisteredScript, load_script_source
from helpers import run_processes


def test_spec_example_unpacks_as_pair(cache: CRMCacheManager) -> None:
    """`allowed, current_count = check_rate_limit(...)` works as the spec shows."""
    allowed, current_count = cache.check_rate_limit(api="whatsapp", limit=1000, window=86400)
    assert (allowed, current_count) == (True, 1)


def test_result_carries_limit_remaining_retry_after(cache: CRMCacheManager) -> None:
    """The result also tells the limit, what remains and when the window resets."""
    result = cache.check_rate_limit("sms-gw", 5, 60)
    assert isinstance(result, RateLimitResult)
    assert (result.limit, result.remaining, result.degraded) == (5, 4, False)
    assert 59.0 < result.retry_after <= 60.0


def test_key_format_and_expiry(cache: CRMCacheManager, raw: redis.Redis) -> None:
    """The counter is crm:ratelimit:<api>:<window> and expires with the window."""
    cache.check_rate_limit("whatsapp", 10, 300)
    assert raw.get("crm:ratelimit:whatsapp:300") == b"1"
    assert 299_000 < raw.pttl("crm:ratelimit:whatsapp:300") <= 300_000


def test_default_window_is_60_seconds(cache: CRMCacheManager, raw: redis.Redis) -> None:
    """Without a window the key is crm:ratelimit:<api>:60."""
    cache.check_rate_limit("email-api", 10)
    assert 0 < raw.pttl("crm:ratelimit:email-api:60") <= 60_000


def test_rejected_calls_are_not_charged(cache: CRMCacheManager, raw: redis.Redis) -> None:
    """Over the limit: refused, and the counter stays at the limit."""
    outcomes = [cache.check_rate_limit("api", 3, 60) for _ in range(8)]
    assert [r.allowed for r in outcomes] == [True] * 3 + [False] * 5
    assert [r.current_count for r in outcomes] == [1, 2, 3, 3, 3, 3, 3, 3]
    assert raw.get("crm:ratelimit:api:60") == b"3"
    refused = outcomes[-1]
    assert refused.remaining == 0
    assert 0 < refused.retry_after <= 60


def test_cost_counts_several_calls(cache: CRMCacheManager) -> None:
    """A call with cost=3 uses three units; one that does not fit is refused whole."""
    assert cache.check_rate_limit("bulk", 5, 60, cost=3).current_count == 3
    assert cache.check_rate_limit("bulk", 5, 60, cost=3).allowed is False
    assert cache.check_rate_limit("bulk", 5, 60, cost=2).current_count == 5


def test_windows_and_apis_are_separate(cache: CRMCacheManager) -> None:
    """Different APIs and different windows count separately."""
    cache.check_rate_limit("a", 1, 60)
    assert cache.check_rate_limit("a", 1, 60).allowed is False
    assert cache.check_rate_limit("b", 1, 60).allowed is True
    assert cache.check_rate_limit("a", 1, 3600).allowed is True


def test_window_resets_after_expiry(cache: CRMCacheManager) -> None:
    """When the window's key expires a new window starts (polled with a deadline)."""
    assert cache.check_rate_limit("short", 1, 1).allowed
    assert cache.check_rate_limit("short", 1, 1).allowed is False
    deadline = time.monotonic() + 5
    while not cache.check_rate_limit("short", 1, 1).allowed:
        assert time.monotonic() < deadline, "window never reset"
        time.sleep(0.05)


def test_counter_without_expiry_gets_one(cache: CRMCacheManager, raw: redis.Redis) -> None:
    """A counter someone left without TTL is given one, so it cannot block forever."""
    raw.set("crm:ratelimit:x:60", 5)
    result = cache.check_rate_limit("x", 5, 60)
    assert result.allowed is False
    assert 0 < raw.pttl("crm:ratelimit:x:60") <= 60_000


@pytest.mark.parametrize("junk", [b"not-a-number", b"1.5"])
def test_corrupt_counter_starts_a_fresh_window(
    cache: CRMCacheManager, raw: redis.Redis, junk: bytes
) -> None:
    """A non-integer at the counter key is replaced by a fresh counter."""
    raw.set("crm:ratelimit:x:60", junk)
    assert cache.check_rate_limit("x", 5, 60).current_count == 1
    assert raw.pttl("crm:ratelimit:x:60") > 0


def test_wrong_type_counter_is_replaced(cache: CRMCacheManager, raw: redis.Redis) -> None:
    """A hash at the counter key does not break the limiter."""
    raw.hset("crm:ratelimit:x:60", "f", "v")
    assert cache.check_rate_limit("x", 5, 60).current_count == 1


def test_exact_under_threads(cache: CRMCacheManager, raw: redis.Redis) -> None:
    """8 threads x 250 calls with limit=1000 allow exactly 1000."""
    barrier = threading.Barrier(8)

    def worker() -> int:
        barrier.wait(timeout=10)
        return sum(cache.check_rate_limit("whatsapp", 1000, 86400).allowed for _ in range(250))

    with ThreadPoolExecutor(max_workers=8) as pool:
        allowed = sum(pool.map(lambda _: worker(), range(8)))
    assert allowed == 1000
    assert raw.get("crm:ratelimit:whatsapp:86400") == b"1000"
    stats = cache.get_stats().counters
    assert (stats["rate_limit_allowed"], stats["rate_limit_rejected"]) == (1000, 1000)


WORKER = textwrap.dedent(
    """
    import sys, time
    from crmcache import CRMCacheManager

    url, calls = sys.argv[1], int(sys.argv[2])
    with CRMCacheManager(redis_url=url) as cache:
        # Start together. The go signal is read through crmcache, so any URL works
        # (redis+sentinel:// too, which redis-py's from_url does not take).
        deadline = time.monotonic() + 30
        while cache.get_template("go", "sms") is None:
            if time.monotonic() > deadline:
                sys.exit("never told to go")
            time.sleep(0.005)
        print(sum(cache.check_rate_limit("shared", 1000, 3600).allowed for _ in range(calls)))
    """
)


@pytest.mark.slow
def test_exact_across_processes(redis_url: str, raw: redis.Redis) -> None:
    """4 processes x 500 calls on one Redis with limit=1000 allow exactly 1000."""
    outputs = run_processes(
        WORKER, redis_url, "500", go=lambda: raw.set("crm:template:sms:go", "1")
    )
    assert sum(int(out) for out in outputs) == 1000
    assert raw.get("crm:ratelimit:shared:3600") == b"1000"


# -- counters no correct run can leave, and arguments Lua cannot hold (issue 11) ---------

COUNTER = "crm:ratelimit:x:60"


@pytest.mark.parametrize("value", [-1, -1_000_000, -(2**63)])
def test_negative_counter_starts_a_fresh_window(
    cache: CRMCacheManager, raw: redis.Redis, value: int
) -> None:
    """A counter below zero is garbage: replaced by a fresh window, never trusted (it
    answered current_count=-999999, remaining=1000009)."""
    raw.set(COUNTER, value)
    result = cache.check_rate_limit("x", 10, 60)
    assert result.fields() == RateLimitResult(True, 1, 10, 9, result.retry_after).fields()
    assert 59.0 < result.retry_after <= 60.0
    assert raw.get(COUNTER) == b"1"
    assert 0 < raw.pttl(COUNTER) <= 60_000


@pytest.mark.parametrize("value", [2**63 - 1, 2**62, 2**53, 10**30])
def test_out_of_range_counter_starts_a_fresh_window(
    cache: CRMCacheManager, raw: redis.Redis, value: int
) -> None:
    """A counter no limit can reach (above 2**53 - 1; at 2**63 - 1 INCRBY overflows) is
    garbage. Before, 2**63 - 1 degraded the API (fail-open) for good: never replaced, no TTL."""
    raw.set(COUNTER, value)
    results = [cache.check_rate_limit("x", 2, 60) for _ in range(3)]
    assert [(r.allowed, r.current_count, r.degraded) for r in results] == [
        (True, 1, False),
        (True, 2, False),
        (False, 2, False),
    ]
    assert raw.get(COUNTER) == b"2"
    assert 0 < raw.pttl(COUNTER) <= 60_000
    counters = cache.get_cache_stats()["counters"]
    assert (counters["rate_limit_degraded"], counters["redis_errors"]) == (0, 0)


@pytest.mark.parametrize("count", [1, 10], ids=["allowed", "refused"])
def test_counter_expiring_after_its_window_is_cut_back(
    cache: CRMCacheManager, raw: redis.Redis, count: int
) -> None:
    """A counter whose TTL is longer than its window (10 years for window=60 answered
    retry_after=315360000) gets the window's TTL."""
    raw.set(COUNTER, count, ex=10 * 365 * 86400)
    result = cache.check_rate_limit("x", 10, 60)
    assert result.allowed is (count < 10)
    assert 0 < result.retry_after <= 60.0
    assert 0 < raw.pttl(COUNTER) <= 60_000


def test_huge_cost_never_deletes_the_live_counter(
    cache: CRMCacheManager, raw: redis.Redis
) -> None:
    """cost=10**17 reached Lua as "1e+17", which the script took for a garbage counter:
    it deleted the live one. Now such a limit is refused in Python, and the largest
    accepted numbers count exactly."""
    for _ in range(5):
        cache.check_rate_limit("x", 2**53 - 1, 60)
    with pytest.raises(ValueError, match="limit"):
        cache.check_rate_limit("x", 10**18, 60, cost=10**17)
    assert raw.get(COUNTER) == b"5"
    result = cache.check_rate_limit("x", 2**53 - 1, 60, cost=10**15)
    assert (result.allowed, result.current_count, result.degraded) == (True, 10**15 + 5, False)
    assert raw.get(COUNTER) == b"%d" % (10**15 + 5)
    refused = cache.check_rate_limit("x", 2**53 - 1, 60, cost=2**53 - 1)
    assert (refused.allowed, refused.current_count) == (False, 10**15 + 5)
    assert raw.get(COUNTER) == b"%d" % (10**15 + 5)


@pytest.mark.parametrize("cost", ["1e+17", "1.5", "abc", ""])
def test_script_replaces_a_counter_only_when_it_is_not_one(raw: redis.Redis, cost: str) -> None:
    """rate_limit.lua given a cost INCRBY refuses fails the call and keeps the counter: only
    a value that really is not a counter is replaced."""
    raw.set(COUNTER, 5, ex=60)
    sha = raw.script_load(load_script_source("rate_limit"))
    with pytest.raises(redis.ResponseError):
        raw.evalsha(sha, 1, COUNTER, 10, 60_000, cost)
    assert raw.get(COUNTER) == b"5"


class _Limits(IntEnum):
    LIMIT = 3
    WINDOW = 60
    COST = 1


def test_int_enum_arguments_count_like_ints(cache: CRMCacheManager, raw: redis.Redis) -> None:
    """IntEnum limit, window and cost are plain ints to Redis. redis-py refused them, so
    every call degraded and 10 of 10 were allowed with limit=3."""
    results = [
        cache.check_rate_limit("x", _Limits.LIMIT, _Limits.WINDOW, cost=_Limits.COST)
        for _ in range(10)
    ]
    assert [r.allowed for r in results] == [True] * 3 + [False] * 7
    assert not any(r.degraded for r in results)
    assert type(results[0].limit) is int
    assert raw.get(COUNTER) == b"3"


def _reply_script(cache: CRMCacheManager, source: str) -> None:
    """Make the manager run ``source`` instead of rate_limit.lua (a corrupt reply), under
    rate_limit.lua's reply contract."""
    fake = RegisteredScript(
        "rate_limit",
        hashlib.sha1(source.encode()).hexdigest(),  # noqa: S324 - Redis's script id
        source,
        script_contract("rate_limit"),
    )
    transport = cache._transport
    assert transport is not None
    transport.scripts = dataclasses.replace(transport.scripts, rate_limit=fake)


@pytest.mark.parametrize(
    "reply",
    [
        "{1, -1000, -5}",  # negative count and TTL
        "{1, 11, 60000}",  # allowed, yet over the limit
        "{2, 3, 60000}",  # allowed is neither 0 nor 1
        "{1, 3, 61000}",  # the window's end further away than the window
    ],
)
def test_corrupt_reply_degrades_by_policy(
    cache: CRMCacheManager, crm_logs: pytest.LogCaptureFixture, reply: str
) -> None:
    """A reply of the right shape that no correct run of the script gives is never
    trusted (it answered allowed=True, current_count=-1000, remaining=1010,
    degraded=False): the call follows the failure policy, is counted and logged once."""
    _reply_script(cache, f"return {reply}")
    degraded = cache.check_rate_limit("x", 10, 60)
    assert degraded.fields() == RateLimitResult(True, 0, 10, 10, 0.0, degraded=True).fields()
    closed = cache.check_rate_limit("x", 10, 60, policy="closed")
    assert (closed.allowed, closed.degraded) == (False, True)
    counters = cache.get_cache_stats()["counters"]
    assert counters["corrupt_values"] == 2
    assert counters["rate_limit_degraded"] == 2
    assert counters["rate_limit_allowed"] == counters["rate_limit_rejected"] == 0
    warnings = [
        r
        for r in crm_logs.records
        if r.levelno == logging.WARNING and "rate_limit.lua" in r.getMessage()
    ]
    assert len(warnings) == 1
    assert COUNTER in warnings[0].getMessage()


@pytest.mark.parametrize(
    "reply",
    [
        "{1, 3}",  # too short
        "{1, 3, 60000, 4}",  # too long
        "{1, 'x', 60000}",  # not an integer
        "7",  # not a list
    ],
)
def test_misshapen_reply_is_a_protocol_error(
    cache: CRMCacheManager, crm_logs: pytest.LogCaptureFixture, reply: str
) -> None:
    """A reply that breaks the script's declared shape is refused by the pool before it
    is decoded: the call follows the policy, counted as a protocol error, logged once."""
    _reply_script(cache, f"return {reply}")
    assert cache.check_rate_limit("x", 10, 60).degraded
    closed = cache.check_rate_limit("x", 10, 60, policy="closed")
    assert (closed.allowed, closed.degraded) == (False, True)
    counters = cache.get_cache_stats()["counters"]
    assert counters["protocol_errors"] == 2
    assert counters["rate_limit_degraded"] == 2
    broke = [r for r in crm_logs.records if "broke the protocol" in r.getMessage()]
    assert len(broke) == 1
