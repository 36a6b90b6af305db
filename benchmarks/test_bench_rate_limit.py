"""Rate limiting: one allowed call against a limit that is never reached.

Compared with the least a hand-written limiter does (a registered INCR + EXPIRE script,
EVALSHA, one round trip; it charges refused calls and returns no retry time) and with the
``limits`` library's fixed-window and sliding-window-counter limiters on the same server.
The limit (10**9 per minute) is never reached, so every call takes the "allowed" path.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from limits import RateLimitItemPerMinute
from limits.storage import RedisStorage
from limits.strategies import FixedWindowRateLimiter, SlidingWindowCounterRateLimiter
from pytest_benchmark.fixture import BenchmarkFixture

from crmcache import CRMCacheManager

API = "bench"
LIMIT = 10**9
WINDOW = 60
RAW_KEY = "bench:raw:ratelimit"

#: The minimal fixed-window limiter: count, and start the window's expiry on the first call.
INCR_EXPIRE_LUA = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then
    redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return count
"""


@pytest.fixture
def limits_storage(bench_redis_url: str) -> Iterator[RedisStorage]:
    storage = RedisStorage(bench_redis_url)
    try:
        yield storage
    finally:
        storage.storage.close()
        storage.storage.connection_pool.disconnect()


@pytest.mark.benchmark(group="rate-limit")
def test_rate_limit_crmcache(benchmark: BenchmarkFixture, cache: CRMCacheManager) -> None:
    def check() -> bool:
        return cache.check_rate_limit(API, LIMIT, WINDOW).allowed

    assert check()
    assert benchmark(check)


@pytest.mark.benchmark(group="rate-limit")
def test_rate_limit_raw_evalsha(benchmark: BenchmarkFixture, raw: redis.Redis) -> None:
    script = raw.register_script(INCR_EXPIRE_LUA)

    def check() -> bool:
        return int(script(keys=[RAW_KEY], args=[WINDOW])) <= LIMIT

    assert check()
    assert benchmark(check)
    assert 0 < raw.ttl(RAW_KEY) <= WINDOW


@pytest.mark.benchmark(group="rate-limit")
def test_rate_limit_limits_fixed_window(
    benchmark: BenchmarkFixture, limits_storage: RedisStorage
) -> None:
    limiter = FixedWindowRateLimiter(limits_storage)
    item = RateLimitItemPerMinute(LIMIT)
    assert limiter.hit(item, API)
    assert benchmark(limiter.hit, item, API)


@pytest.mark.benchmark(group="rate-limit")
def test_rate_limit_limits_sliding_window_counter(
    benchmark: BenchmarkFixture, limits_storage: RedisStorage
) -> None:
    limiter = SlidingWindowCounterRateLimiter(limits_storage)
    item = RateLimitItemPerMinute(LIMIT)
    assert limiter.hit(item, API)
    assert benchmark(limiter.hit, item, API)
