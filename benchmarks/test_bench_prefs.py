"""Client preferences: a cached hit, and the fill after a miss, against hand-written redis-py.

Baselines (names contain ``raw``) do what a user would write by hand for the same result:
``GET`` + the library's own decoder for a hit; ``GET`` (miss) + ``SET key value EX 3600``
for a fill. crmcache adds validation, the breaker, stats, and (for the fill) the versioned
Lua "set if not older" that keeps stale rows out.
"""

from __future__ import annotations

import pytest
import redis
from pytest_benchmark.fixture import BenchmarkFixture

from crmcache import ClientPreferences, CRMCacheManager, MessageChannel
from crmcache._codec import decode_preferences, encode_preferences
from crmcache._keys import prefs_key

CLIENT_ID = "client-1"
KEY = prefs_key(CLIENT_ID)
TTL = 3600
FILL_ROUNDS = 2000
FILL_WARMUP_ROUNDS = 50

PREFS = ClientPreferences(
    client_id=CLIENT_ID,
    preferred_channels=[MessageChannel.WHATSAPP, MessageChannel.EMAIL],
    timezone="Europe/Berlin",
    language="de",
    quiet_hours_start=22,
    quiet_hours_end=7,
    version=7,
)


@pytest.fixture
def cached_prefs(cache: CRMCacheManager, raw: redis.Redis) -> ClientPreferences:
    """``client-1``'s preferences, cached by crmcache itself (so stored exactly as it
    stores them)."""
    raw.delete(KEY)
    assert cache.set_client_preferences(PREFS)
    return PREFS


# -- prefs-hit --------------------------------------------------------------------------


@pytest.mark.benchmark(group="prefs-hit")
def test_prefs_hit_crmcache(
    benchmark: BenchmarkFixture, cache: CRMCacheManager, cached_prefs: ClientPreferences
) -> None:
    assert cache.get_client_preferences(CLIENT_ID) == cached_prefs
    result = benchmark(cache.get_client_preferences, CLIENT_ID)
    assert result == cached_prefs


@pytest.mark.benchmark(group="prefs-hit")
def test_prefs_hit_raw_get_decode(
    benchmark: BenchmarkFixture, raw: redis.Redis, cached_prefs: ClientPreferences
) -> None:
    def get_and_decode() -> ClientPreferences | None:
        value = raw.get(KEY)
        return None if value is None else decode_preferences(value, CLIENT_ID)  # type: ignore[arg-type]

    assert get_and_decode() == cached_prefs
    result = benchmark(get_and_decode)
    assert result == cached_prefs


# -- prefs-fill: the key is deleted before every round (untimed) --------------------------


@pytest.mark.benchmark(group="prefs-fill")
def test_prefs_fill_crmcache(
    benchmark: BenchmarkFixture, cache: CRMCacheManager, raw: redis.Redis
) -> None:
    def fill() -> bool:
        assert cache.get_client_preferences(CLIENT_ID) is None
        return cache.set_client_preferences(PREFS)

    def empty() -> None:
        raw.delete(KEY)

    empty()
    assert fill()
    stored = benchmark.pedantic(  # type: ignore[no-untyped-call]
        fill, setup=empty, rounds=FILL_ROUNDS, warmup_rounds=FILL_WARMUP_ROUNDS
    )
    assert stored
    assert raw.get(KEY) == encode_preferences(PREFS)


@pytest.mark.benchmark(group="prefs-fill")
def test_prefs_fill_raw_get_set_ex(benchmark: BenchmarkFixture, raw: redis.Redis) -> None:
    def fill() -> bool:
        assert raw.get(KEY) is None
        return bool(raw.set(KEY, encode_preferences(PREFS), ex=TTL))

    def empty() -> None:
        raw.delete(KEY)

    empty()
    assert fill()
    stored = benchmark.pedantic(  # type: ignore[no-untyped-call]
        fill, setup=empty, rounds=FILL_ROUNDS, warmup_rounds=FILL_WARMUP_ROUNDS
    )
    assert stored
    assert raw.get(KEY) == encode_preferences(PREFS)
