"""Reading what the metrics exporters publish: a Prometheus scrape and an OpenTelemetry
collection, each flattened to ``{(name, labels): value}``."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from crmcache import ClientPreferences, CRMCacheManager
from helpers import poll

Labels = frozenset[tuple[str, str]]


def parse_exposition(text: str) -> tuple[set[str], dict[tuple[str, Labels], float]]:
    """The family names and every sample of a Prometheus text exposition."""
    names: set[str] = set()
    samples: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return names, samples


def scrape(registry: CollectorRegistry) -> tuple[set[str], dict[tuple[str, Labels], float]]:
    """``generate_latest(registry)``, parsed."""
    return parse_exposition(generate_latest(registry).decode())


def labels(**pairs: str) -> Labels:
    return frozenset(pairs.items())


def collect(reader: InMemoryMetricReader) -> dict[tuple[str, Labels], Any]:
    """One OpenTelemetry collection: each point's value (a histogram point as itself)."""
    points: dict[tuple[str, Labels], Any] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    attributes = frozenset((k, str(v)) for k, v in point.attributes.items())
                    key = (metric.name, attributes)
                    points[key] = point if isinstance(point, HistogramDataPoint) else point.value
    return points


def near_hits(cache: CRMCacheManager, kind: str) -> int:
    """Lookups of ``kind`` the near cache answered so far, after one more lookup."""
    if kind == "preferences":
        assert cache.get_client_preferences("m1") is not None
    else:
        assert cache.get_template("welcome", "email") == "Hello"
    return int(cache.get_stats().by_kind[kind].near_hits)


def workload(cache: CRMCacheManager, raw: Any, key_prefix: str = "crm") -> None:
    """Lookups of both kinds at both tiers (near cache on and live), hits and misses, a
    stale write refused, an undecodable value evicted, rate-limit decisions allowed and
    refused, and invalidations."""
    assert cache.set_client_preferences(ClientPreferences(client_id="m1", version=3))
    # Redis, then the near cache once filled (Redis's message about this process's own
    # write may arrive after a read began, and that read's fill is then refused).
    poll(lambda: near_hits(cache, "preferences") >= 2 and cache.get_client_preferences("m1"))
    assert cache.get_client_preferences("nobody") is None
    assert cache.set_client_preferences(ClientPreferences(client_id="m1", version=2)) is False
    raw.set(f"{key_prefix}:prefs:garbled", b"\x00not json")
    assert cache.get_client_preferences("garbled") is None  # evicted
    assert cache.set_template("welcome", "email", "Hello")
    poll(lambda: near_hits(cache, "templates") >= 1 and cache.get_template("welcome", "email"))
    assert cache.get_template("missing", "sms") is None
    found = cache.get_templates([("welcome", "email"), ("other", "email")])
    assert found == {("welcome", "email"): "Hello", ("other", "email"): None}
    for _ in range(3):
        cache.check_rate_limit("whatsapp", 2, 60)
    cache.check_rate_limit("sms-gateway", 10, 60)
    assert cache.invalidate_client_preferences("m1", version=4)
    assert cache.invalidate_template("welcome", "email")
