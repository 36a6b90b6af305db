"""The near cache: a hit served from the process, beside a remote hit and raw redis-py.

Two groups, each with three benchmarks measured in the same run:

* ``near-hit``: ``get_client_preferences("client-1")`` on a ``CRMCacheManager`` with
  ``near_cache=True`` once the value is near-cached; the same call on a manager without
  a near cache (a remote hit: one ``GET``); and the baseline, plain redis-py ``GET`` +
  ``crmcache._codec.decode_preferences``.
* ``near-hit-template``: the same three for ``get_template`` of a 5 KB template (baseline:
  ``GET`` + ``decode_template``).

``report.py`` checks the targets: a near hit takes at most 2 µs (median), and at most
0.02 of the raw ``GET`` + decode (50 times faster).

Getting the value near-cached: the listener that keeps the near cache coherent starts on
the manager's first read, and the cache serves only once it has subscribed
(``manager._near.live``). A fill can also be evicted by the invalidation Redis sends for
a write made just before (this process's own writes included: Redis tells the listener
after the write has returned). So the fixture reads, then polls until
``manager._near.get(key)`` holds the value, reading again while it does not.

Every timed call must be a near hit: the near cache's miss counter is compared before
and after the measurement (a miss would be a remote read timed as a near hit).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import redis
from pytest_benchmark.fixture import BenchmarkFixture

from crmcache import ClientPreferences, CRMCacheManager, MessageChannel
from crmcache._codec import decode_preferences, decode_template
from crmcache._keys import prefs_key, template_key
from crmcache._near import MISSING, NearCache

CLIENT_ID = "client-1"
KEY = prefs_key(CLIENT_ID)
TEMPLATE_NAME = "bench-near-template"
CHANNEL = MessageChannel.EMAIL
TEMPLATE_KEY = template_key(CHANNEL, TEMPLATE_NAME)
TEMPLATE_BYTES = 5 * 1024
#: As conftest.py's ``cache`` fixture (crmcache's defaults).
MAX_CONNECTIONS = 10
POOL_TIMEOUT = 1.0
#: How long the fixture waits for the listener to subscribe and a fill to stick.
NEAR_DEADLINE_S = 10.0
NEAR_POLL_S = 0.002

PREFS = ClientPreferences(
    client_id=CLIENT_ID,
    preferred_channels=[MessageChannel.WHATSAPP, MessageChannel.EMAIL],
    timezone="Europe/Berlin",
    language="de",
    quiet_hours_start=22,
    quiet_hours_end=7,
    version=7,
)


def _template_text() -> str:
    line = "Hello {{first_name}}, your order {{order_id}} has shipped and is on its way. "
    text = (line * (TEMPLATE_BYTES // len(line) + 1))[:TEMPLATE_BYTES]
    assert len(text.encode("utf-8")) == TEMPLATE_BYTES
    return text


TEMPLATE_TEXT = _template_text()


@pytest.fixture
def near_cache(bench_redis_url: str) -> Iterator[CRMCacheManager]:
    """A manager like conftest.py's ``cache``, with the near cache on (its defaults)."""
    with CRMCacheManager(
        redis_url=bench_redis_url,
        enabled=True,
        cache_ttl=3600,
        max_connections=MAX_CONNECTIONS,
        pool_timeout=POOL_TIMEOUT,
        near_cache=True,
    ) as manager:
        yield manager


@pytest.fixture
def cached_prefs(cache: CRMCacheManager, raw: redis.Redis) -> ClientPreferences:
    """``client-1``'s preferences, cached by crmcache itself (no near cache)."""
    raw.delete(KEY)
    assert cache.set_client_preferences(PREFS)
    return PREFS


@pytest.fixture
def cached_template(cache: CRMCacheManager, raw: redis.Redis) -> str:
    """The 5 KB template, cached by crmcache itself (no near cache)."""
    raw.delete(TEMPLATE_KEY)
    assert cache.set_template(TEMPLATE_NAME, CHANNEL, TEMPLATE_TEXT)
    return TEMPLATE_TEXT


def _near(manager: CRMCacheManager) -> NearCache:
    near = manager._near
    assert near is not None, "the manager has no near cache"
    return near


def make_near_cached(manager: CRMCacheManager, key: str, read: Callable[[], object]) -> None:
    """Read until ``key`` is held by the near cache (see the module docstring)."""
    near = _near(manager)
    deadline = time.monotonic() + NEAR_DEADLINE_S
    while True:
        assert read() is not None, f"{key} is not cached in Redis"
        if near.get(key) is not MISSING:
            return
        if time.monotonic() > deadline:
            pytest.fail(
                f"{key} not near-cached after {NEAR_DEADLINE_S:.0f} s (listener live: "
                f"{near.live}; {near.stats()})"
            )
        time.sleep(NEAR_POLL_S)


def bench_near_hits(
    benchmark: BenchmarkFixture, manager: CRMCacheManager, key: str, read: Callable[[], object]
) -> object:
    """Near-cache ``key``, time ``read`` and check that every timed call was a near hit."""
    make_near_cached(manager, key, read)
    near = _near(manager)
    before = near.stats()
    result = benchmark(read)
    after = near.stats()
    benchmark.extra_info.update(
        near_hits=after.hits - before.hits, near_misses=after.misses - before.misses
    )
    assert after.misses == before.misses, (
        f"{after.misses - before.misses} timed call(s) missed the near cache "
        f"(invalidations {after.invalidations - before.invalidations}, "
        f"flushes {after.flushes - before.flushes})"
    )
    assert after.hits > before.hits
    return result


# -- near-hit: preferences ----------------------------------------------------------------


@pytest.mark.benchmark(group="near-hit")
def test_near_hit_crmcache_near_cache(
    benchmark: BenchmarkFixture, near_cache: CRMCacheManager, cached_prefs: ClientPreferences
) -> None:
    def read() -> ClientPreferences | None:
        return near_cache.get_client_preferences(CLIENT_ID)

    assert bench_near_hits(benchmark, near_cache, KEY, read) == cached_prefs


@pytest.mark.benchmark(group="near-hit")
def test_near_hit_crmcache_remote(
    benchmark: BenchmarkFixture, cache: CRMCacheManager, cached_prefs: ClientPreferences
) -> None:
    assert cache._near is None
    assert cache.get_client_preferences(CLIENT_ID) == cached_prefs
    result = benchmark(cache.get_client_preferences, CLIENT_ID)
    assert result == cached_prefs


@pytest.mark.benchmark(group="near-hit")
def test_near_hit_raw_get_decode(
    benchmark: BenchmarkFixture, raw: redis.Redis, cached_prefs: ClientPreferences
) -> None:
    def get_and_decode() -> ClientPreferences | None:
        value = raw.get(KEY)
        return None if value is None else decode_preferences(value, CLIENT_ID)  # type: ignore[arg-type]

    assert get_and_decode() == cached_prefs
    result = benchmark(get_and_decode)
    assert result == cached_prefs


# -- near-hit-template: a 5 KB template ---------------------------------------------------


@pytest.mark.benchmark(group="near-hit-template")
def test_near_hit_template_crmcache_near_cache(
    benchmark: BenchmarkFixture, near_cache: CRMCacheManager, cached_template: str
) -> None:
    def read() -> str | None:
        return near_cache.get_template(TEMPLATE_NAME, CHANNEL)

    assert bench_near_hits(benchmark, near_cache, TEMPLATE_KEY, read) == cached_template


@pytest.mark.benchmark(group="near-hit-template")
def test_near_hit_template_crmcache_remote(
    benchmark: BenchmarkFixture, cache: CRMCacheManager, cached_template: str
) -> None:
    assert cache._near is None
    assert cache.get_template(TEMPLATE_NAME, CHANNEL) == cached_template
    result = benchmark(cache.get_template, TEMPLATE_NAME, CHANNEL)
    assert result == cached_template


@pytest.mark.benchmark(group="near-hit-template")
def test_near_hit_template_raw_get_decode(
    benchmark: BenchmarkFixture, raw: redis.Redis, cached_template: str
) -> None:
    def get_and_decode() -> str | None:
        value = raw.get(TEMPLATE_KEY)
        return None if value is None else decode_template(value)  # type: ignore[arg-type]

    assert get_and_decode() == cached_template
    result = benchmark(get_and_decode)
    assert result == cached_template
