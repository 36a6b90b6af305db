"""crmcache.metrics against a real server: a workload, then a Prometheus scrape and an
OpenTelemetry collection whose figures must equal get_cache_stats() exactly."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import redis
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry

from crmcache import BreakerState, CRMCacheManager, RateLimit
from crmcache.metrics import OpenTelemetryMetrics, PrometheusCollector
from crmcache.testing import RedisServer
from helpers import poll
from metrics_helpers import collect, labels, scrape, workload

#: Every family a manager with the near cache on publishes before any latency is timed.
PROMETHEUS_NAMES = {
    "crmcache_cache_hits",
    "crmcache_cache_misses",
    "crmcache_stale_writes_refused",
    "crmcache_decode_errors_evicted",
    "crmcache_corrupt_values",
    "crmcache_writes",
    "crmcache_writes_failed",
    "crmcache_reads_failed",
    "crmcache_invalidations",
    "crmcache_invalidations_failed",
    "crmcache_invalidations_replayed",
    "crmcache_invalidations_pending",
    "crmcache_redis_errors",
    "crmcache_cancelled",
    "crmcache_unexpected_errors",
    "crmcache_topology_errors",
    "crmcache_protocol_errors",
    "crmcache_send_claims_won",
    "crmcache_send_claims_refused",
    "crmcache_send_claims_degraded",
    "crmcache_send_claims_released",
    "crmcache_rate_limit_decisions",
    "crmcache_circuit_breaker_state",
    "crmcache_circuit_breaker_transitions",
    "crmcache_circuit_breaker_short_circuited",
    "crmcache_pool_connections",
    "crmcache_pool_max_connections",
    "crmcache_pool_waiting",
    "crmcache_pool_waits",
    "crmcache_pool_timeouts",
    "crmcache_pool_wait_seconds",
    "crmcache_near_cache_entries",
    "crmcache_near_cache_max_entries",
    "crmcache_near_cache_invalidations",
    "crmcache_near_cache_flushes",
    "crmcache_near_cache_live",
    "crmcache_operation_duration_seconds",
    "crmcache_enabled",
}
OTEL_NAMES = {
    "crmcache.cache.hits",
    "crmcache.cache.misses",
    "crmcache.stale_writes_refused",
    "crmcache.decode_errors_evicted",
    "crmcache.invalidations_replayed",
    "crmcache.invalidations.pending",
    "crmcache.rate_limit.decisions",
    "crmcache.circuit_breaker.state",
    "db.client.connection.count",
    "db.client.connection.max",
    "db.client.connection.pending_requests",
    "db.client.connection.timeouts",
    "db.client.operation.duration",
    "crmcache.near_cache.size",
    "crmcache.near_cache.invalidations",
}


@pytest.fixture
def near_cache(redis_url: str, raw: redis.Redis) -> Iterator[CRMCacheManager]:
    """A manager with the near cache on and live."""
    with CRMCacheManager(redis_url=redis_url, near_cache=True) as cache:
        cache.get_template("warm-up", "email")  # starts the listener
        poll(lambda: cache.get_cache_stats()["near_cache"]["live"], what="near cache live")
        cache.reset_stats()
        yield cache


def test_prometheus_scrape_equals_get_cache_stats(
    near_cache: CRMCacheManager, raw: redis.Redis
) -> None:
    """After a workload, a scrape of a registry shows every family under crmcache_, and
    hits and misses by kind and tier equal get_cache_stats() exactly."""
    workload(near_cache, raw)
    registry = CollectorRegistry()
    PrometheusCollector(near_cache, latency=True).register(registry)
    near_cache.get_client_preferences("timed")  # one call timed
    names, samples = scrape(registry)
    stats = near_cache.get_cache_stats()
    assert names == PROMETHEUS_NAMES
    assert all(name.startswith("crmcache_") for name in names)
    for kind, figures in stats["by_kind"].items():
        near = samples["crmcache_cache_hits_total", labels(manager="crm", kind=kind, tier="near")]
        remote = samples[
            "crmcache_cache_hits_total", labels(manager="crm", kind=kind, tier="redis")
        ]
        misses = samples[
            "crmcache_cache_misses_total", labels(manager="crm", kind=kind, tier="redis")
        ]
        assert (near + remote, near, misses) == (
            figures["hits"],
            figures["near_hits"],
            figures["misses"],
        )
    assert stats["by_kind"]["preferences"]["near_hits"] >= 2
    assert stats["by_kind"]["templates"]["near_hits"] >= 2  # get_template, get_templates
    one = labels(manager="crm")
    counters = stats["counters"]
    assert samples["crmcache_stale_writes_refused_total", one] == 1
    assert samples["crmcache_decode_errors_evicted_total", one] == 1
    for counter in ("stale_writes_refused", "decode_errors_evicted", "writes", "invalidations"):
        assert samples[f"crmcache_{counter}_total", one] == counters[counter]

    def decisions(limit: str, decision: str) -> float:
        return samples[
            "crmcache_rate_limit_decisions_total",
            labels(manager="crm", limit=limit, decision=decision),
        ]

    assert decisions("whatsapp", "allowed") == 2
    assert decisions("whatsapp", "refused") == 1
    assert decisions("sms-gateway", "allowed") == 1
    assert decisions("sms-gateway", "degraded") == 0
    assert samples["crmcache_circuit_breaker_state", labels(manager="crm", state="closed")] == 1
    assert samples["crmcache_circuit_breaker_state", labels(manager="crm", state="open")] == 0
    assert samples["crmcache_invalidations_pending", one] == stats["pending_invalidations"] == 0
    assert samples["crmcache_near_cache_entries", one] == stats["near_cache"]["size"]
    assert (
        samples["crmcache_near_cache_invalidations_total", one]
        == (stats["near_cache"]["invalidations"])
    )
    assert samples["crmcache_near_cache_live", one] == 1
    pool = stats["connection_pool"]
    assert (
        samples["crmcache_pool_connections", labels(manager="crm", state="idle")] == (pool["idle"])
    )
    assert (
        samples["crmcache_pool_connections", labels(manager="crm", state="used")]
        == (pool["in_use"])
    )
    assert samples["crmcache_pool_max_connections", one] == 10
    timed = labels(manager="crm", operation="get_client_preferences")
    assert samples["crmcache_operation_duration_seconds_count", timed] == 1
    assert samples["crmcache_operation_duration_seconds_sum", timed] > 0


def test_opentelemetry_collection_equals_get_cache_stats(
    near_cache: CRMCacheManager, raw: redis.Redis
) -> None:
    """The same through OpenTelemetry: instruments named after the database-client
    semantic conventions where they apply, and exact hits and misses."""
    reader = InMemoryMetricReader()
    OpenTelemetryMetrics(
        near_cache, meter_provider=MeterProvider(metric_readers=[reader]), latency=True
    )
    workload(near_cache, raw)
    points = collect(reader)
    stats = near_cache.get_cache_stats()
    assert {name for name, _ in points} >= OTEL_NAMES
    for kind, figures in stats["by_kind"].items():
        at = {"crmcache.manager": "crm", "crmcache.kind": kind}
        near = points["crmcache.cache.hits", labels(**at, **{"crmcache.tier": "near"})]
        remote = points["crmcache.cache.hits", labels(**at, **{"crmcache.tier": "redis"})]
        misses = points["crmcache.cache.misses", labels(**at, **{"crmcache.tier": "redis"})]
        assert (near + remote, near, misses) == (
            figures["hits"],
            figures["near_hits"],
            figures["misses"],
        )
    one = labels(**{"crmcache.manager": "crm"})
    assert points["crmcache.stale_writes_refused", one] == 1
    assert points["crmcache.decode_errors_evicted", one] == 1
    refused = {
        "crmcache.manager": "crm",
        "crmcache.rate_limit.name": "whatsapp",
        "crmcache.rate_limit.decision": "refused",
    }
    assert points["crmcache.rate_limit.decisions", labels(**refused)] == 1
    pool = {"db.system.name": "redis", "db.client.connection.pool.name": "crm"}
    idle = labels(**pool, **{"db.client.connection.state": "idle"})
    assert points["db.client.connection.count", idle] == stats["connection_pool"]["idle"]
    assert points["db.client.connection.max", labels(**pool)] == 10
    # Every Redis call of the workload was timed, per operation.
    gets_key = labels(
        **{
            "db.system.name": "redis",
            "crmcache.manager": "crm",
            "db.operation.name": "get_client_preferences",
        }
    )
    gets = points["db.client.operation.duration", gets_key]
    prefs = stats["by_kind"]["preferences"]
    asked_redis = prefs["hits"] - prefs["near_hits"] + prefs["misses"]
    assert gets.count == sum(gets.bucket_counts) == asked_redis
    # A second collection adds only what was timed since (cumulative temporality).
    near_cache.get_client_preferences("nobody")
    again = collect(reader)
    key = next(k for name, k in again if name == "db.client.operation.duration" and k == gets_key)
    assert again["db.client.operation.duration", key].count == asked_redis + 1


def test_latency_histograms_are_off_unless_asked(redis_url: str, raw: redis.Redis) -> None:
    """A manager times nothing by default; metrics_latency=True times every Redis call
    per operation, failures included."""
    with CRMCacheManager(redis_url=redis_url) as cache:
        registry = CollectorRegistry()
        PrometheusCollector(cache).register(registry)
        for _ in range(5):
            cache.get_client_preferences("c")
        _, samples = scrape(registry)
        assert not [key for key in samples if key[0].startswith("crmcache_operation_duration")]
    with CRMCacheManager(redis_url=redis_url, metrics_latency=True, key_prefix="timed") as cache:
        registry = CollectorRegistry()
        PrometheusCollector(cache).register(registry)
        for _ in range(5):
            cache.get_client_preferences("c")
        cache.check_rate_limit("api", 5)
        _, samples = scrape(registry)
        prefs = labels(manager="timed", operation="get_client_preferences")
        assert samples["crmcache_operation_duration_seconds_count", prefs] == 5
        assert samples["crmcache_operation_duration_seconds_bucket", prefs | {("le", "+Inf")}] == 5
        buckets = sorted(
            (float(dict(key)["le"]), value)
            for (name, key), value in samples.items()
            if name == "crmcache_operation_duration_seconds_bucket"
            and ("operation", "get_client_preferences") in key
        )
        counts = [value for _, value in buckets]
        assert counts == sorted(counts)  # cumulative
        limits = labels(manager="timed", operation="check_rate_limit")
        assert samples["crmcache_operation_duration_seconds_count", limits] == 1


@pytest.mark.single_only  # holds the one pooled connection of one node with BLPOP
def test_pool_waits_and_wait_time(redis_url: str, raw: redis.Redis) -> None:
    """A call that waits for the only pooled connection in vain is counted as a wait and
    a timeout, and its wait lands in the wait-time histogram."""
    with CRMCacheManager(
        redis_url=redis_url, max_connections=1, pool_timeout=0.05, pipelining=False
    ) as cache:
        registry = CollectorRegistry()
        PrometheusCollector(cache).register(registry)
        lean = cache._transport
        assert lean is not None
        holder = threading.Thread(target=lean.execute, args=("BLPOP", "test:wake", 10))
        holder.start()
        try:
            poll(lambda: int(raw.info("clients")["blocked_clients"]) >= 1, what="blocked")
            _, during = scrape(registry)
            assert cache.get_template("t", "email") is None  # waits 50 ms, gives up
        finally:
            raw.lpush("test:wake", "x")
            holder.join(timeout=10)
        _, samples = scrape(registry)
    one = labels(manager="crm")
    assert during["crmcache_pool_connections", labels(manager="crm", state="used")] == 1
    assert samples["crmcache_pool_waits_total", one] == 1
    assert samples["crmcache_pool_timeouts_total", one] == 1
    assert samples["crmcache_pool_wait_seconds_count", one] == 1
    assert samples["crmcache_pool_wait_seconds_sum", one] >= 0.04
    assert samples["crmcache_reads_failed_total", one] == 1


@pytest.mark.single_only
def test_breaker_and_invalidation_replay(own_server: RedisServer) -> None:
    """While Redis hangs: the breaker opens (state and transitions), invalidations wait;
    when it answers again they are replayed and the breaker closes."""
    with CRMCacheManager(
        redis_url=own_server.url, socket_timeout=0.3, socket_connect_timeout=0.3
    ) as cache:
        registry = CollectorRegistry()
        PrometheusCollector(cache).register(registry)
        cache.get_template("warm", "email")
        own_server.pause_process()
        try:
            assert cache.invalidate_template("welcome", "email") is False
            while cache._breaker.state is BreakerState.CLOSED:
                assert cache.get_template("t", "email") is None
            _, down = scrape(registry)
        finally:
            own_server.resume_process()
        # The replay backs off up to 5 s between rounds while Redis is away.
        poll(lambda: cache.get_stats().pending_invalidations == 0, timeout=20)
        poll(
            lambda: (
                cache.get_template("t", "email") is None
                and cache._breaker.state is BreakerState.CLOSED
            ),
            timeout=20,
        )
        _, up = scrape(registry)
    one = labels(manager="crm")

    def state(samples: dict, name: str, value: str) -> float:  # type: ignore[type-arg]
        return samples[name, labels(manager="crm", state=value)]

    assert state(down, "crmcache_circuit_breaker_state", "open") == 1
    assert state(down, "crmcache_circuit_breaker_state", "closed") == 0
    assert state(down, "crmcache_circuit_breaker_transitions_total", "open") == 1
    assert down["crmcache_invalidations_pending", one] == 1
    assert down["crmcache_invalidations_failed_total", one] == 1
    assert state(up, "crmcache_circuit_breaker_state", "closed") == 1
    assert state(up, "crmcache_circuit_breaker_transitions_total", "closed") >= 1
    assert up["crmcache_invalidations_pending", one] == 0
    assert up["crmcache_invalidations_replayed_total", one] == 1


def test_several_managers_one_collector(redis_url: str, raw: redis.Redis) -> None:
    """One collector over two managers labels each by its key prefix (or given names)."""
    with (
        CRMCacheManager(redis_url=redis_url, key_prefix="one") as first,
        CRMCacheManager(redis_url=redis_url, key_prefix="two") as second,
    ):
        first.get_template("t", "email")
        second.get_template("t", "email")
        second.get_template("u", "email")
        registry = CollectorRegistry()
        PrometheusCollector(first, second).register(registry)
        _, samples = scrape(registry)
        missed = "crmcache_cache_misses_total"
        assert samples[missed, labels(manager="one", kind="templates", tier="redis")] == 1
        assert samples[missed, labels(manager="two", kind="templates", tier="redis")] == 2
        named = CollectorRegistry()
        PrometheusCollector(first, second, names=["a", "b"]).register(named)
        _, samples = scrape(named)
        assert samples[missed, labels(manager="b", kind="templates", tier="redis")] == 2


def test_rate_limit_sets_count_their_decisions_per_limit(redis_url: str) -> None:
    """A set's decision is counted once in the totals and once per limit it concerns:
    every limit of an allowed call, only the refusing ones of a refused call."""
    with CRMCacheManager(redis_url=redis_url) as cache:
        limits = [RateLimit("set-a", limit=5, window=60), RateLimit("set-b", limit=1, window=60)]
        assert cache.check_rate_limits(limits).allowed
        refused = cache.check_rate_limits(limits)
        assert not refused.allowed
        assert refused.blocked_by == limits[1]
        registry = CollectorRegistry()
        PrometheusCollector(cache).register(registry)
        _, samples = scrape(registry)

        def decisions(limit: str, decision: str) -> float:
            return samples.get(
                (
                    "crmcache_rate_limit_decisions_total",
                    labels(manager="crm", limit=limit, decision=decision),
                ),
                0.0,
            )

        assert (decisions("set-a", "allowed"), decisions("set-a", "refused")) == (1, 0)
        assert (decisions("set-b", "allowed"), decisions("set-b", "refused")) == (1, 1)
        counters = cache.get_cache_stats()["counters"]
        assert (counters["rate_limit_allowed"], counters["rate_limit_rejected"]) == (1, 1)
