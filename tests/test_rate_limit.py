"""Rate limits: one atomic script, exact counts under threads and processes, expiry."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from crmcache import CRMCacheManager, RateLimitResult


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
    import redis
    from crmcache import CRMCacheManager

    url, calls = sys.argv[1], int(sys.argv[2])
    go = redis.Redis.from_url(url)
    deadline = time.monotonic() + 30
    while not go.exists("test:go"):  # start together
        if time.monotonic() > deadline:
            sys.exit("never told to go")
        time.sleep(0.005)
    with CRMCacheManager(redis_url=url) as cache:
        print(sum(cache.check_rate_limit("shared", 1000, 3600).allowed for _ in range(calls)))
    go.close()
    """
)


@pytest.mark.slow
def test_exact_across_processes(redis_url: str, raw: redis.Redis) -> None:
    """4 processes x 500 calls on one Redis with limit=1000 allow exactly 1000."""
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, redis_url, "500"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(4)
    ]
    raw.set("test:go", 1)
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    assert sum(int(out) for out, _ in outputs) == 1000
    assert raw.get("crm:ratelimit:shared:3600") == b"1000"
