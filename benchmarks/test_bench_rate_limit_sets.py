"""Rate-limit algorithms and sets: each crmcache algorithm beside its equivalent elsewhere.

One allowed call per round (limits of 10**9, never reached), same server, same run; each
group's baseline is the other library's (or a bare script's) call:

* ``rl-fixed``: ``check_rate_limits`` of one ``fixed`` limit vs ``limits`` FixedWindow;
* ``rl-moving``: one ``sliding`` limit vs ``limits`` MovingWindow (an exact log);
* ``rl-sliding-counter``: one ``sliding`` limit vs ``limits`` SlidingWindowCounter;
* ``rl-gcra``: one ``gcra`` limit vs a bare GCRA script (TIME, GET, SET PX: the least a
  GCRA can do in one EVALSHA);
* ``rl-gcra-pyrate``: one ``gcra`` limit vs ``pyrate-limiter``'s GCRA on its Redis state
  store;
* ``rl-set-pyrate``: a set of three limits (per second, per minute, per day) vs one
  ``pyrate-limiter`` Limiter on its Redis bucket holding the same three rates (its
  sliding log: ZADD per unit).

The Redis-side cost of the same calls is in test_bench_redis_cost.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from limits import RateLimitItemPerMinute
from limits.storage import RedisStorage
from limits.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    SlidingWindowCounterRateLimiter,
)
from pyrate_limiter import GCRA, Duration, Limiter, Rate, RedisBucket
from pyrate_limiter.buckets.redis_state import RedisStateStore
from pyrate_limiter.buckets.state_bucket import StateBucket
from pytest_benchmark.fixture import BenchmarkFixture

from crmcache import CRMCacheManager, RateLimit

LIMIT = 10**9
WINDOW = 60

#: The least a GCRA check does in one script: Redis's clock, the TAT, the decision, the
#: new TAT with its expiry (no retry time, no burst bookkeeping beyond the comparison).
GCRA_LUA = """
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new = tat + interval
if new - now > burst * interval then return 0 end
redis.call('SET', KEYS[1], string.format('%.0f', new), 'PX', math.ceil((new - now) / 1000))
return 1
"""


@pytest.fixture
def limits_storage(bench_redis_url: str) -> Iterator[RedisStorage]:
    storage = RedisStorage(bench_redis_url)
    try:
        yield storage
    finally:
        storage.storage.close()
        storage.storage.connection_pool.disconnect()


def _crmcache(
    benchmark: BenchmarkFixture, cache: CRMCacheManager, limits: list[RateLimit]
) -> None:
    def check() -> bool:
        return cache.check_rate_limits(limits).allowed

    assert check()
    assert benchmark(check)


@pytest.mark.benchmark(group="rl-fixed")
def test_rl_fixed_crmcache(benchmark: BenchmarkFixture, cache: CRMCacheManager) -> None:
    _crmcache(benchmark, cache, [RateLimit("bench-fixed", LIMIT, WINDOW)])


@pytest.mark.benchmark(group="rl-fixed")
def test_rl_fixed_baseline_limits_fixed_window(
    benchmark: BenchmarkFixture, limits_storage: RedisStorage
) -> None:
    limiter = FixedWindowRateLimiter(limits_storage)
    item = RateLimitItemPerMinute(LIMIT)
    assert limiter.hit(item, "bench-fixed")
    assert benchmark(limiter.hit, item, "bench-fixed")


@pytest.mark.benchmark(group="rl-moving")
def test_rl_moving_crmcache_sliding(benchmark: BenchmarkFixture, cache: CRMCacheManager) -> None:
    _crmcache(benchmark, cache, [RateLimit("bench-sliding", LIMIT, WINDOW, algorithm="sliding")])


@pytest.mark.benchmark(group="rl-moving")
def test_rl_moving_baseline_limits_moving_window(
    benchmark: BenchmarkFixture, limits_storage: RedisStorage
) -> None:
    limiter = MovingWindowRateLimiter(limits_storage)
    item = RateLimitItemPerMinute(LIMIT)
    assert limiter.hit(item, "bench-moving")
    assert benchmark(limiter.hit, item, "bench-moving")


@pytest.mark.benchmark(group="rl-sliding-counter")
def test_rl_sliding_counter_crmcache_sliding(
    benchmark: BenchmarkFixture, cache: CRMCacheManager
) -> None:
    _crmcache(benchmark, cache, [RateLimit("bench-sliding", LIMIT, WINDOW, algorithm="sliding")])


@pytest.mark.benchmark(group="rl-sliding-counter")
def test_rl_sliding_counter_baseline_limits(
    benchmark: BenchmarkFixture, limits_storage: RedisStorage
) -> None:
    limiter = SlidingWindowCounterRateLimiter(limits_storage)
    item = RateLimitItemPerMinute(LIMIT)
    assert limiter.hit(item, "bench-counter")
    assert benchmark(limiter.hit, item, "bench-counter")


@pytest.mark.benchmark(group="rl-gcra")
def test_rl_gcra_crmcache(benchmark: BenchmarkFixture, cache: CRMCacheManager) -> None:
    _crmcache(benchmark, cache, [RateLimit("bench-gcra", LIMIT, WINDOW, algorithm="gcra")])


@pytest.mark.benchmark(group="rl-gcra")
def test_rl_gcra_baseline_script(benchmark: BenchmarkFixture, raw: redis.Redis) -> None:
    script = raw.register_script(GCRA_LUA)
    interval = WINDOW * 1_000_000 // LIMIT or 1

    def check() -> bool:
        return int(script(keys=["bench:raw:gcra"], args=[interval, LIMIT])) == 1

    assert check()
    assert benchmark(check)


@pytest.mark.benchmark(group="rl-gcra-pyrate")
def test_rl_gcra_pyrate_crmcache(benchmark: BenchmarkFixture, cache: CRMCacheManager) -> None:
    _crmcache(benchmark, cache, [RateLimit("bench-gcra", LIMIT, WINDOW, algorithm="gcra")])


@pytest.mark.benchmark(group="rl-gcra-pyrate")
def test_rl_gcra_pyrate_baseline_state_store(
    benchmark: BenchmarkFixture, raw: redis.Redis
) -> None:
    bucket = StateBucket(
        [Rate(LIMIT, Duration.MINUTE)], GCRA(), RedisStateStore(raw, "bench:pyrate:gcra")
    )
    with Limiter(bucket) as limiter:

        def check() -> bool:
            return bool(limiter.try_acquire("bench", blocking=False))

        assert check()
        assert benchmark(check)


#: pyrate-limiter wants increasing limits of decreasing density.
THREE_RATES = [
    Rate(LIMIT, Duration.SECOND),
    Rate(LIMIT * 10, Duration.MINUTE),
    Rate(LIMIT * 100, Duration.DAY),
]


@pytest.mark.benchmark(group="rl-set-pyrate")
def test_rl_set_pyrate_crmcache_three_limits(
    benchmark: BenchmarkFixture, cache: CRMCacheManager
) -> None:
    _crmcache(
        benchmark,
        cache,
        [
            RateLimit("bench-set:s", LIMIT, 1, algorithm="sliding", group="bench"),
            RateLimit("bench-set:m", LIMIT * 10, 60, algorithm="sliding", group="bench"),
            RateLimit("bench-set:d", LIMIT * 100, "day", group="bench"),
        ],
    )


@pytest.mark.benchmark(group="rl-set-pyrate")
def test_rl_set_pyrate_baseline_redis_bucket(
    benchmark: BenchmarkFixture, raw: redis.Redis
) -> None:
    bucket = RedisBucket.init(THREE_RATES, raw, "bench:pyrate:set")
    with Limiter(bucket) as limiter:

        def check() -> bool:
            return bool(limiter.try_acquire("bench", blocking=False))

        assert check()
        assert benchmark(check)
