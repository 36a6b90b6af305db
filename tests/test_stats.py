"""Statistics: the spec's dict, per-kind counters, key counting with SCAN, logging."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import redis

from crmcache import CacheStats, ClientPreferences, CRMCacheManager


def test_spec_dict_shape(cache: CRMCacheManager) -> None:
    """The keys the spec reads are there, with the right types."""
    stats = cache.get_cache_stats()
    assert stats["enabled"] is True
    assert isinstance(stats["total_keys"], int)
    assert isinstance(stats["local_hit_rate"], float)
    assert stats["connection_pool"]["max_connections"] == 10
    assert set(stats["connection_pool"]) >= {"max_connections", "in_use", "idle"}
    redis_info = stats["redis"]
    assert set(redis_info) >= {
        "used_memory",
        "used_memory_human",
        "connected_clients",
        "keyspace_hits",
        "keyspace_misses",
        "uptime_in_seconds",
    }
    assert redis_info["connected_clients"] >= 1


def test_hits_and_misses_per_kind(cache: CRMCacheManager) -> None:
    """Preferences and templates are counted separately; the overall rate is in percent."""
    cache.set_client_preferences(ClientPreferences(client_id="a"))
    cache.get_client_preferences("a")
    cache.get_client_preferences("a")
    cache.get_client_preferences("b")
    cache.get_template("t", "email")
    stats = cache.get_stats()
    assert isinstance(stats, CacheStats)
    assert stats.by_kind["preferences"].hits == 2
    assert stats.by_kind["preferences"].misses == 1
    assert stats.by_kind["templates"].misses == 1
    assert stats.local_hit_rate == 50.0
    as_dict = stats.as_dict()
    assert as_dict["by_kind"]["preferences"]["hit_rate"] == pytest.approx(66.67)
    assert as_dict["local_hit_rate"] == 50.0


@pytest.mark.single_only  # commandstats of one node; the cluster's sum: test_cluster.py
def test_total_keys_counts_only_crm_keys_beyond_one_scan_batch(
    cache: CRMCacheManager, raw: redis.Redis
) -> None:
    """total_keys counts crm:* keys over several SCAN batches and ignores other keys."""
    with raw.pipeline(transaction=False) as pipe:
        for i in range(2500):
            pipe.set(f"crm:template:email:t{i}", "x")
        for i in range(300):
            pipe.set(f"other:{i}", "x")
        pipe.execute()
    raw.config_resetstat()
    stats = cache.get_cache_stats()
    assert stats["total_keys"] == 2500
    assert stats["total_keys_exact"] is True
    commands = raw.info("commandstats")
    assert "cmdstat_keys" not in commands
    assert commands["cmdstat_scan"]["calls"] >= 2


@pytest.mark.single_only  # one pool's internals
def test_pool_in_use_and_idle(redis_url: str, raw: redis.Redis) -> None:
    """A connection busy with a command shows as in use; returned, as idle."""
    cache = CRMCacheManager(redis_url=redis_url, pipelining=False)  # the lean pool's books
    cache.get_template("warm", "email")
    lean = cache._transport
    assert lean is not None
    # Hold one pooled connection in a blocking BLPOP until the test pushes a value.
    holder = threading.Thread(target=lean.execute, args=("BLPOP", "test:wake", 10))
    holder.start()
    try:
        deadline = time.monotonic() + 5
        while raw.info("clients")["blocked_clients"] < 1:
            assert time.monotonic() < deadline, "BLPOP never blocked"
            time.sleep(0.01)
        held = cache.get_cache_stats()["connection_pool"]
        assert (held["in_use"], held["idle"], held["created"]) == (1, 0, 1)
    finally:
        raw.lpush("test:wake", "x")
        holder.join(timeout=10)
    after = cache.get_cache_stats()["connection_pool"]
    assert (after["in_use"], after["idle"]) == (0, 1)
    cache.close()


def test_low_hit_rate_is_logged(
    cache: CRMCacheManager, crm_logs: pytest.LogCaptureFixture
) -> None:
    """Below 50% over at least 100 lookups, get_cache_stats logs a WARNING."""
    for i in range(100):
        cache.get_client_preferences(f"nobody-{i}")
    cache.get_cache_stats()
    warnings = [r for r in crm_logs.records if r.levelno == logging.WARNING]
    assert any("Low cache hit rate" in r.getMessage() for r in warnings)


def test_no_low_hit_rate_warning_on_few_lookups(
    cache: CRMCacheManager, crm_logs: pytest.LogCaptureFixture
) -> None:
    """Ten misses say nothing about the hit rate: no warning."""
    for i in range(10):
        cache.get_client_preferences(f"nobody-{i}")
    cache.get_cache_stats()
    assert not any("Low cache hit rate" in r.getMessage() for r in crm_logs.records)


def test_reset_stats(cache: CRMCacheManager) -> None:
    """reset_stats zeroes the hit, miss and event counters that had counted calls."""
    assert cache.get_template("t", "sms") is None
    assert cache.set_template("t", "sms", "hi") is True
    assert cache.get_template("t", "sms") == "hi"
    before = cache.get_stats().as_dict()
    assert (before["hits"], before["misses"], before["counters"]["writes"]) == (1, 1, 1)
    assert before["by_kind"]["templates"]["misses"] == 1
    cache.reset_stats()
    after = cache.get_stats().as_dict()
    assert (after["hits"], after["misses"]) == (0, 0)
    assert {kind: (s["hits"], s["misses"]) for kind, s in after["by_kind"].items()} == {
        "preferences": (0, 0),
        "templates": (0, 0),
    }
    assert after["counters"] == dict.fromkeys(before["counters"], 0)


def test_log_levels(redis_url: str, raw: redis.Redis, crm_logs: pytest.LogCaptureFixture) -> None:
    """INFO on init and stats, DEBUG on hits and misses, all on the crmcache logger."""
    with CRMCacheManager(redis_url=redis_url) as cache:
        cache.get_template("t", "email")
        cache.set_template("t", "email", "x")
        cache.get_template("t", "email")
        cache.get_cache_stats()
    by_level = {(r.levelno, r.getMessage().split(":")[0]) for r in crm_logs.records}
    assert (logging.INFO, "crmcache initialised") in by_level
    assert (logging.INFO, "cache stats") in by_level
    assert (logging.DEBUG, "cache miss") in by_level
    assert (logging.DEBUG, "cache hit") in by_level
    assert {r.name for r in crm_logs.records} == {"crmcache"}
