"""The metrics' pure parts, without Redis: latency histograms, the bounded rate-limit
names, pooled books summed, the exporters' arguments, and a disabled manager's metrics."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from prometheus_client import CollectorRegistry

from crmcache import CRMCacheManager
from crmcache._latency import BOUNDS_NS, SUM, LatencyHistograms, new_series, snapshot_series
from crmcache._stats import (
    MAX_RATE_LIMIT_NAMES,
    OTHER_RATE_LIMITS,
    Counter,
    Kind,
    PoolAccounting,
    StatsRecorder,
)
from crmcache.metrics import SPECS, PrometheusCollector, prometheus_asgi_app
from metrics_helpers import labels, parse_exposition, scrape


def test_latency_buckets_fold_powers_of_two() -> None:
    """A duration lands under the first bound above it (a power of two itself one bucket
    up: within 1 ns); below 4 µs in the first bucket, from 8.6 s in the last; the count
    and sum are exact."""
    series = new_series()
    durations = [1, 4095, 4096, 10_000, 2**33 - 1, 2**33, 60 * 10**9]
    for ns in durations:
        series[ns.bit_length()] += 1
        series[SUM] += ns
    histogram = snapshot_series(series)
    assert histogram.bounds[0] == BOUNDS_NS[0] / 1e9 == 4.096e-6
    assert len(histogram.buckets) == len(BOUNDS_NS) + 1
    assert histogram.count == len(durations)
    assert histogram.sum == pytest.approx(sum(durations) / 1e9)
    assert histogram.buckets[0] == 2  # 1 ns and 4095 ns (< 2**12)
    assert histogram.buckets[1] == 1  # 4096 ns
    assert histogram.buckets[2] == 1  # 10 µs (<= 2**14)
    assert histogram.buckets[-2] == 1  # 2**33 ns, at the last bound
    assert histogram.buckets[-1] == 2  # beyond it
    assert histogram.cumulative()[-1] == histogram.count


def test_latency_histograms_make_series_on_first_use() -> None:
    histograms = LatencyHistograms()
    histograms.record("get", 5000)
    histograms.record("get", 5000)
    histograms.record("set", 10**9)
    snapshot = histograms.snapshot()
    assert sorted(snapshot) == ["get", "set"]
    assert snapshot["get"].count == 2
    assert snapshot["set"].sum == pytest.approx(1.0)


def test_rate_limit_names_are_bounded() -> None:
    """The first MAX_RATE_LIMIT_NAMES names are counted apart, later ones together."""
    stats = StatsRecorder()
    extra = 10
    for i in range(MAX_RATE_LIMIT_NAMES + extra):
        stats.rate_limit(f"api-{i}", Counter.RATE_LIMIT_ALLOWED)
    stats.rate_limit("api-0", Counter.RATE_LIMIT_REJECTED)
    stats.rate_limit("api-70", Counter.RATE_LIMIT_DEGRADED)
    rows = stats.rate_limits()
    assert len(rows) == MAX_RATE_LIMIT_NAMES + 1
    assert rows[OTHER_RATE_LIMITS][Counter.RATE_LIMIT_ALLOWED] == extra
    assert rows[OTHER_RATE_LIMITS][Counter.RATE_LIMIT_DEGRADED] == 1
    assert rows["api-0"] == {
        Counter.RATE_LIMIT_ALLOWED: 1,
        Counter.RATE_LIMIT_REJECTED: 1,
        Counter.RATE_LIMIT_DEGRADED: 0,
    }
    totals = stats.counters()
    assert totals[Counter.RATE_LIMIT_ALLOWED] == MAX_RATE_LIMIT_NAMES + extra
    stats.reset()
    assert stats.rate_limits() == {}


def test_near_hits_count_as_hits_of_their_kind() -> None:
    stats = StatsRecorder()
    stats.hit(Kind.PREFERENCES)
    stats.near_hit(Kind.PREFERENCES, 3)
    stats.miss(Kind.PREFERENCES)
    figures = stats.by_kind()[Kind.PREFERENCES]
    assert (figures.hits, figures.near_hits, figures.misses) == (4, 3, 1)
    assert figures.as_dict()["near_hits"] == 3


def test_pool_books_sum_with_their_wait_times() -> None:
    def books(waits: int, wait_time: tuple[int, ...]) -> PoolAccounting:
        return PoolAccounting(1, 1, 2, 3, 0, waits, 0, 0, wait_time)

    first = tuple(range(65))
    total = PoolAccounting.total([books(1, first), books(0, ()), books(2, first)])
    assert (total.waits, total.created, total.idle) == (3, 9, 6)
    assert total.wait_time == tuple(2 * n for n in first)
    assert PoolAccounting.total([books(0, ())]).wait_time == ()


def test_every_metric_is_named_for_both_exporters() -> None:
    names = [spec.name for spec in SPECS]
    assert len(names) == len(set(names))
    assert len({spec.otel for spec in SPECS}) == len(SPECS)
    for spec in SPECS:
        assert len(spec.labels) == len(spec.attributes)
        assert not spec.name.endswith("_total")


def test_collector_arguments_are_checked() -> None:
    with pytest.raises(TypeError, match="managers"):
        PrometheusCollector()
    with pytest.raises(TypeError, match="managers"):
        PrometheusCollector(object())  # type: ignore[arg-type]
    with (
        CRMCacheManager(enabled=False) as first,
        CRMCacheManager(enabled=False) as second,
    ):
        with pytest.raises(ValueError, match="names"):
            PrometheusCollector(first, second)
        with pytest.raises(ValueError, match="names"):
            PrometheusCollector(first, second, names=["a", "a"])
        with pytest.raises(ValueError, match="names"):
            PrometheusCollector(first, second, names=["a"])
        with pytest.raises(TypeError, match="names"):
            PrometheusCollector(first, names="a")
        PrometheusCollector(first, second, names=["a", "b"])


def test_disabled_manager_metrics() -> None:
    """A disabled manager publishes that it is off, no pool, and its degraded decisions."""
    with CRMCacheManager(enabled=False, key_prefix="off") as cache:
        cache.check_rate_limit("whatsapp", 5)
        assert cache.get_template("t", "email") is None
        registry = CollectorRegistry()
        PrometheusCollector(cache).register(registry)
        _, samples = scrape(registry)
    one = labels(manager="off")
    assert samples["crmcache_enabled", one] == 0
    assert not [key for key in samples if key[0].startswith("crmcache_pool_connections")]
    decided = labels(manager="off", limit="whatsapp", decision="degraded")
    assert samples["crmcache_rate_limit_decisions_total", decided] == 1
    missed = labels(manager="off", kind="templates", tier="redis")
    assert samples["crmcache_cache_misses_total", missed] == 1


def test_asgi_app_serves_the_metrics() -> None:
    """prometheus_asgi_app is a ready ASGI app (for app.mount("/metrics", ...))."""
    with CRMCacheManager(enabled=False, key_prefix="asgi") as cache:
        cache.get_template("t", "email")
        app = prometheus_asgi_app(cache)

        async def get() -> httpx.Response:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await client.get("/")

        response = asyncio.run(get())
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    names, samples = parse_exposition(response.text)
    assert "crmcache_cache_misses" in names
    missed = labels(manager="asgi", kind="templates", tier="redis")
    assert samples["crmcache_cache_misses_total", missed] == 1
