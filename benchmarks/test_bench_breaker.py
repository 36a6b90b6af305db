"""Overhead with Redis down: a preferences read while the circuit breaker is open.

A manager is pointed at a dedicated ``redis-server`` that the benchmark starts and then
kills (nothing is ever filled). Reads fail on connection refused until the breaker opens;
from then on a read must short-circuit in microseconds instead of paying a connection
attempt, and ``report.py`` checks the target "breaker-open read <= 50 µs median".

Beside it, in the same group, the baseline: a cache hit on the live session server.

The breaker lets one probe through once its reset timeout has passed (1 s, doubling after
each failed probe); such a probe pays a refused connection and the retry's back-off. The
few probes that fall inside the measurement show in the maximum and the mean, not in the
median, which is what the target is about.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
from pytest_benchmark.fixture import BenchmarkFixture

from crmcache import BreakerState, ClientPreferences, CRMCacheManager, MessageChannel
from crmcache._keys import prefs_key
from crmcache.testing import RedisServer, RedisServerError, find_redis_server_binary

CLIENT_ID = "bench-breaker-client"
#: As conftest.py's ``cache`` fixture (crmcache's defaults).
MAX_CONNECTIONS = 10
POOL_TIMEOUT = 1.0
#: Reads allowed for the breaker to open (its threshold is 5 consecutive failures).
MAX_CALLS_TO_OPEN = 100
OPEN_DEADLINE_S = 30.0
#: Short timeouts: nothing listens on the dead port, so refusals come at once anyway.
SOCKET_TIMEOUT = 0.5

PREFS = ClientPreferences(
    client_id=CLIENT_ID,
    preferred_channels=[MessageChannel.EMAIL],
    timezone="UTC",
    language="en",
    version=1,
)


@pytest.fixture
def dead_cache() -> Iterator[CRMCacheManager]:
    """A manager whose Redis was killed, with its breaker open."""
    if find_redis_server_binary() is None:
        pytest.skip("no redis-server binary to start (and kill) a dedicated server")
    server = RedisServer()
    try:
        server.start()
    except RedisServerError as exc:
        pytest.skip(f"could not start a dedicated redis-server: {exc}")
    try:
        with CRMCacheManager(
            redis_url=server.url,
            enabled=True,
            cache_ttl=3600,
            max_connections=MAX_CONNECTIONS,
            pool_timeout=POOL_TIMEOUT,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT,
        ) as manager:
            server.kill()
            deadline = time.monotonic() + OPEN_DEADLINE_S
            calls = 0
            while manager._breaker.state is BreakerState.CLOSED:
                assert manager.get_client_preferences(CLIENT_ID) is None
                calls += 1
                if calls > MAX_CALLS_TO_OPEN or time.monotonic() > deadline:
                    pytest.fail(f"the breaker did not open after {calls} failed reads")
            yield manager
    finally:
        server.stop()


@pytest.mark.benchmark(group="breaker-open")
def test_breaker_open_crmcache_read(
    benchmark: BenchmarkFixture, dead_cache: CRMCacheManager
) -> None:
    assert dead_cache.get_client_preferences(CLIENT_ID) is None
    result = benchmark(dead_cache.get_client_preferences, CLIENT_ID)
    assert result is None
    breaker = dead_cache._breaker
    assert breaker.state is not BreakerState.CLOSED
    assert breaker.short_circuited > 0
    benchmark.extra_info.update(
        breaker_state=breaker.state.value,
        short_circuited=breaker.short_circuited,
        trips=breaker.trips,
    )


@pytest.mark.benchmark(group="breaker-open")
def test_breaker_open_baseline_live_hit(
    benchmark: BenchmarkFixture, cache: CRMCacheManager, raw: redis.Redis
) -> None:
    raw.delete(prefs_key(CLIENT_ID))
    assert cache.set_client_preferences(PREFS)
    assert cache.get_client_preferences(CLIENT_ID) == PREFS
    result = benchmark(cache.get_client_preferences, CLIENT_ID)
    assert result == PREFS
