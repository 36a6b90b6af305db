"""Prometheus and OpenTelemetry metrics over crmcache managers (sync and async).

Both exporters read one set of counters: each manager's :meth:`metrics_snapshot`, the
counters ``get_cache_stats()`` reports (so hits and misses agree with it exactly), taken
without asking Redis, so a scrape costs microseconds and never waits on the network.

Prometheus (``pip install 'crmcache[prometheus]'``)::

    from prometheus_client import REGISTRY
    from crmcache.metrics import PrometheusCollector

    PrometheusCollector(cache).register(REGISTRY)       # any CollectorRegistry
    app.mount("/metrics", prometheus_asgi_app(cache))   # or: a ready-made ASGI app

OpenTelemetry (``pip install 'crmcache[otel]'``)::

    from crmcache.metrics import OpenTelemetryMetrics

    OpenTelemetryMetrics(cache)  # the global MeterProvider, or meter_provider=...

Every Prometheus metric is named ``crmcache_*`` and labelled ``manager`` (the manager's
``key_prefix`` unless ``names`` are given); OpenTelemetry instruments follow the
semantic conventions for database clients where one applies (``db.client.*``) and are
named ``crmcache.*`` otherwise. :data:`SPECS` lists them all.

Latency histograms (``crmcache_operation_duration_seconds`` /
``db.client.operation.duration``) time every Redis call per operation. They are off
unless asked for, with the manager's ``metrics_latency=True`` or an exporter's
``latency=True``; on, they cost about 0.2 µs a call (``benchmarks/test_bench_metrics.py``),
off nothing. Near-cache hits never reach Redis and are not timed.

Rate-limit decisions are labelled with the limit's name: the first
:data:`~crmcache._stats.MAX_RATE_LIMIT_NAMES` (64) names a manager sees are counted one by
one, later ones together under ``__other__``, so the number of series stays bounded.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, Self

from ._latency import BOUNDS_NS, HistogramSnapshot
from ._stats import OTHER_RATE_LIMITS, Counter, Kind, MetricsSnapshot, Tier

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Histogram, MeterProvider, Observation
    from prometheus_client.registry import CollectorRegistry

__all__ = [
    "OTHER_RATE_LIMITS",
    "SPECS",
    "MetricSpec",
    "MetricsSource",
    "OpenTelemetryMetrics",
    "PrometheusCollector",
    "prometheus_asgi_app",
    "prometheus_wsgi_app",
]


class MetricsSource(Protocol):
    """What the exporters need of a manager (both facades' managers have it)."""

    def metrics_snapshot(self) -> MetricsSnapshot: ...

    def _enable_latency(self) -> None: ...


Value = float | HistogramSnapshot
Sample = tuple[tuple[str, ...], Value]
MetricKind = Literal["counter", "updown", "gauge", "histogram"]


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric, as both exporters name it.

    Attributes:
        name: the Prometheus name, without ``crmcache_`` and a counter's ``_total``.
        otel: the OpenTelemetry instrument name.
        kind: ``counter`` (only goes up, but for ``reset_stats()``), ``updown`` (a count
            of things now: a Prometheus gauge, an OpenTelemetry up-down counter),
            ``gauge`` (a state), ``histogram`` (seconds).
        unit: the OpenTelemetry unit.
        doc: the help text.
        labels: the Prometheus labels after ``manager``.
        attributes: the OpenTelemetry attributes for ``labels``, in order.
        samples: ``snapshot -> [(label values, value)]``.
        manager_attribute: the OpenTelemetry attribute naming the manager.
        constant: OpenTelemetry attributes every point carries.
    """

    name: str
    otel: str
    kind: MetricKind
    unit: str
    doc: str
    labels: tuple[str, ...]
    attributes: tuple[str, ...]
    samples: Callable[[MetricsSnapshot], Iterable[Sample]]
    manager_attribute: str = "crmcache.manager"
    constant: Mapping[str, str] = field(default_factory=dict)


# -- what each metric reads from a snapshot ----------------------------------------------

_DECISIONS: Final = (
    (Counter.RATE_LIMIT_ALLOWED, "allowed"),
    (Counter.RATE_LIMIT_REJECTED, "refused"),
    (Counter.RATE_LIMIT_DEGRADED, "degraded"),
)
#: Counters with a metric of their own elsewhere (rate-limit decisions, by name).
_SHOWN_ELSEWHERE: Final = frozenset(c for c, _ in _DECISIONS)
_COUNTER_DOCS: Final = {
    Counter.CORRUPT_VALUES: "Values in Redis that did not decode, and impossible "
    "rate-limit replies",
    Counter.DECODE_ERRORS_EVICTED: "Values in Redis that did not decode and were deleted",
    Counter.STALE_WRITES_REFUSED: "Preference writes refused as older than what is cached",
    Counter.WRITES: "Values written",
    Counter.WRITES_FAILED: "Writes that failed (Redis unavailable)",
    Counter.INVALIDATIONS: "Invalidations Redis confirmed",
    Counter.INVALIDATIONS_FAILED: "Invalidations that failed and were queued for replay",
    Counter.INVALIDATIONS_REPLAYED: "Queued invalidations sent again once Redis answered",
    Counter.READS_FAILED: "Reads that failed (Redis unavailable) and returned a miss",
    Counter.REDIS_ERRORS: "Calls that failed with a Redis or connection error",
    Counter.CANCELLED: "Calls whose caller was cancelled or interrupted",
    Counter.UNEXPECTED_ERRORS: "Calls that failed with an unexpected error",
    Counter.TOPOLOGY_ERRORS: "Calls answered MOVED, ASK, READONLY, TRYAGAIN or CLUSTERDOWN",
    Counter.PROTOCOL_ERRORS: "Replies that broke their command's contract",
    Counter.SEND_CLAIMS_WON: "claim_send calls that won the claim (send)",
    Counter.SEND_CLAIMS_REFUSED: "claim_send calls refused: the key was claimed first",
    Counter.SEND_CLAIMS_DEGRADED: "claim_send answers given by send_guard_policy without Redis",
    Counter.SEND_CLAIMS_RELEASED: "release_send calls that deleted this manager's claim",
}


def _hits(s: MetricsSnapshot) -> Iterator[Sample]:
    for kind in Kind:
        stats = s.by_kind[kind]
        yield (kind.value, Tier.NEAR.value), stats.near_hits
        yield (kind.value, Tier.REDIS.value), stats.hits - stats.near_hits


def _misses(s: MetricsSnapshot) -> Iterator[Sample]:
    # Every miss is answered by the last tier asked: Redis.
    for kind in Kind:
        yield (kind.value, Tier.REDIS.value), s.by_kind[kind].misses


def _counter(counter: Counter) -> Callable[[MetricsSnapshot], Iterable[Sample]]:
    return lambda s: [((), s.counters[counter])]


def _decisions(s: MetricsSnapshot) -> Iterator[Sample]:
    for name, row in s.rate_limits.items():
        for counter, label in _DECISIONS:
            yield (name, label), row[counter]


def _breaker_state(s: MetricsSnapshot) -> Iterator[Sample]:
    for state in s.breaker_transitions:
        yield (state,), 1.0 if state == s.breaker_state else 0.0


def _pool(read: Callable[[MetricsSnapshot], float]) -> Callable[[MetricsSnapshot], list[Sample]]:
    return lambda s: [] if s.pool is None else [((), read(s))]


def _connections(s: MetricsSnapshot) -> list[Sample]:
    if s.pool is None:
        return []
    return [(("used",), s.pool.slots_held), (("idle",), s.pool.idle)]


def _near(name: str) -> Callable[[MetricsSnapshot], list[Sample]]:
    return lambda s: [] if s.near_cache is None else [((), float(getattr(s.near_cache, name)))]


def _latency(s: MetricsSnapshot) -> Iterator[Sample]:
    for op, histogram in sorted(s.latency.items()):
        yield (op,), histogram


_POOL: Final = "db.client.connection.pool.name"
_REDIS: Final = {"db.system.name": "redis"}

SPECS: Final[tuple[MetricSpec, ...]] = (
    MetricSpec("cache_hits", "crmcache.cache.hits", "counter", "{hit}",
               "Lookups answered with a value, by kind and by the tier that answered",
               ("kind", "tier"), ("crmcache.kind", "crmcache.tier"), _hits),
    MetricSpec("cache_misses", "crmcache.cache.misses", "counter", "{miss}",
               "Lookups answered with nothing (by Redis, the last tier asked), by kind",
               ("kind", "tier"), ("crmcache.kind", "crmcache.tier"), _misses),
    *(
        MetricSpec(c.value, f"crmcache.{c.value}", "counter", "{event}", _COUNTER_DOCS[c],
                   (), (), _counter(c))
        for c in Counter
        if c not in _SHOWN_ELSEWHERE
    ),
    MetricSpec("rate_limit_decisions", "crmcache.rate_limit.decisions", "counter",
               "{decision}",
               "Rate-limit checks by limit name (64 names, then __other__) and decision "
               "(allowed, refused, or degraded: Redis could not decide, the policy did)",
               ("limit", "decision"),
               ("crmcache.rate_limit.name", "crmcache.rate_limit.decision"), _decisions),
    MetricSpec("circuit_breaker_state", "crmcache.circuit_breaker.state", "gauge", "1",
               "1 for the circuit breaker's current state, 0 for the others",
               ("state",), ("crmcache.circuit_breaker.state",), _breaker_state),
    MetricSpec("circuit_breaker_transitions", "crmcache.circuit_breaker.transitions",
               "counter", "{transition}", "Circuit breaker transitions, by state entered",
               ("state",), ("crmcache.circuit_breaker.state",),
               lambda s: [((st,), n) for st, n in s.breaker_transitions.items()]),
    MetricSpec("circuit_breaker_short_circuited", "crmcache.circuit_breaker.short_circuited",
               "counter", "{call}", "Calls the open circuit breaker answered without Redis",
               (), (), lambda s: [((), s.breaker_short_circuited)]),
    MetricSpec("pool_connections", "db.client.connection.count", "updown", "{connection}",
               "Data-path connections by state: used (held by a call) or idle",
               ("state",), ("db.client.connection.state",), _connections, _POOL, _REDIS),
    MetricSpec("pool_max_connections", "db.client.connection.max", "updown", "{connection}",
               "The pool's size (max_connections)", (), (),
               _pool(lambda s: s.max_connections), _POOL, _REDIS),
    MetricSpec("pool_waiting", "db.client.connection.pending_requests", "updown",
               "{request}", "Calls waiting for a free pooled connection now", (), (),
               _pool(lambda s: s.pool.waiting if s.pool else 0), _POOL, _REDIS),
    MetricSpec("pool_waits", "crmcache.pool.waits", "counter", "{wait}",
               "Calls that had to wait for a free pooled connection", (), (),
               _pool(lambda s: s.pool.waits if s.pool else 0), _POOL),
    MetricSpec("pool_timeouts", "db.client.connection.timeouts", "counter", "{timeout}",
               "Calls that waited pool_timeout for a connection in vain", (), (),
               _pool(lambda s: s.pool.timeouts if s.pool else 0), _POOL, _REDIS),
    MetricSpec("pool_wait_seconds", "db.client.connection.wait_time", "histogram", "s",
               "How long the calls that waited for a pooled connection waited", (), (),
               lambda s: [] if s.pool_wait is None else [((), s.pool_wait)], _POOL, _REDIS),
    MetricSpec("invalidations_pending", "crmcache.invalidations.pending", "updown",
               "{invalidation}", "Invalidations waiting to be replayed to Redis", (), (),
               lambda s: [((), s.pending_invalidations)]),
    MetricSpec("near_cache_entries", "crmcache.near_cache.size", "updown", "{entry}",
               "Values held in the near cache", (), (), _near("size")),
    MetricSpec("near_cache_max_entries", "crmcache.near_cache.max_size", "updown", "{entry}",
               "The near cache's bound (near_cache_size)", (), (), _near("max_entries")),
    MetricSpec("near_cache_invalidations", "crmcache.near_cache.invalidations", "counter",
               "{invalidation}", "Keys dropped from the near cache by an invalidation",
               (), (), _near("invalidations")),
    MetricSpec("near_cache_flushes", "crmcache.near_cache.flushes", "counter", "{flush}",
               "Times the near cache was emptied (listener lost or (re)subscribed)", (), (),
               _near("flushes")),
    MetricSpec("near_cache_live", "crmcache.near_cache.live", "gauge", "1",
               "1 while the near cache serves (its invalidation listener is subscribed)",
               (), (), _near("live")),
    MetricSpec("operation_duration_seconds", "db.client.operation.duration", "histogram",
               "s", "Duration of Redis calls by operation (metrics_latency only)",
               ("operation",), ("db.operation.name",), _latency, constant=_REDIS),
    MetricSpec("enabled", "crmcache.enabled", "gauge", "1",
               "1 if the cache is on and the manager open", (), (),
               lambda s: [((), 1.0 if s.enabled else 0.0)]),
)  # fmt: skip


# -- managers and their names ------------------------------------------------------------


def _named(
    managers: Sequence[MetricsSource], names: Sequence[str] | None
) -> list[tuple[str, MetricsSource]]:
    if not managers:
        raise TypeError("managers: pass at least one CRMCacheManager or AsyncCRMCacheManager")
    for manager in managers:
        if not callable(getattr(manager, "metrics_snapshot", None)):
            raise TypeError(
                "managers must be CRMCacheManager or AsyncCRMCacheManager, "
                f"not {type(manager).__name__}"
            )
    if names is None:
        labels = [m.metrics_snapshot().key_prefix for m in managers]
        if len(set(labels)) != len(labels):
            raise ValueError("names: several managers share a key_prefix; name them (names=[...])")
    else:
        if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
            raise TypeError("names must be a sequence of non-empty str, one per manager")
        labels = list(names)
        if len(labels) != len(managers) or len(set(labels)) != len(labels):
            raise ValueError("names must name each manager once, in order, all different")
    return list(zip(labels, managers, strict=True))


def _enable_latency(managers: Iterable[tuple[str, MetricsSource]]) -> None:
    for _, manager in managers:
        manager._enable_latency()


# -- Prometheus --------------------------------------------------------------------------


def _import_prometheus() -> Any:  # noqa: ANN401 - the module
    try:
        import prometheus_client  # noqa: PLC0415 - an optional dependency
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError(
            "crmcache's Prometheus metrics need prometheus-client: "
            "pip install 'crmcache[prometheus]'"
        ) from exc
    return prometheus_client


class PrometheusCollector:
    """A ``prometheus_client`` collector over one or more managers.

    Args:
        managers: ``CRMCacheManager`` and/or ``AsyncCRMCacheManager`` instances.
        names: the ``manager`` label of each, in order; default their ``key_prefix``
            (which must then differ).
        latency: turn the managers' latency histograms on (as ``metrics_latency=True``).

    Raises:
        ImportError: prometheus-client is not installed.
        TypeError, ValueError: bad ``managers`` or ``names``.
    """

    def __init__(
        self, *managers: MetricsSource, names: Sequence[str] | None = None, latency: bool = False
    ) -> None:
        self._prometheus = _import_prometheus()
        self._managers = _named(managers, names)
        if latency:
            _enable_latency(self._managers)

    def register(self, registry: CollectorRegistry | None = None) -> Self:
        """Register on ``registry`` (default ``prometheus_client.REGISTRY``); returns self."""
        (self._prometheus.REGISTRY if registry is None else registry).register(self)
        return self

    def collect(self) -> Iterator[Any]:
        """The metric families now (called by the registry at each scrape)."""
        from prometheus_client import core  # noqa: PLC0415 - optional, imported in __init__

        snapshots = [(name, manager.metrics_snapshot()) for name, manager in self._managers]
        for spec in SPECS:
            name = f"crmcache_{spec.name}"
            labels = ["manager", *spec.labels]
            family: Any
            if spec.kind == "counter":
                family = core.CounterMetricFamily(name, spec.doc, labels=labels)
            elif spec.kind == "histogram":
                family = core.HistogramMetricFamily(name, spec.doc, labels=labels)
            else:
                family = core.GaugeMetricFamily(name, spec.doc, labels=labels)
            for manager, snapshot in snapshots:
                for values, value in spec.samples(snapshot):
                    if isinstance(value, HistogramSnapshot):
                        family.add_metric([manager, *values], _buckets(value), value.sum)
                    else:
                        family.add_metric([manager, *values], value)
            yield family


def _buckets(histogram: HistogramSnapshot) -> list[tuple[str, float]]:
    from prometheus_client.utils import floatToGoString  # noqa: PLC0415 - optional

    cumulative = histogram.cumulative()
    bounds = [floatToGoString(b) for b in histogram.bounds]  # type: ignore[no-untyped-call]
    return [*zip(bounds, cumulative, strict=False), ("+Inf", histogram.count)]


def _registry_with(
    managers: Sequence[MetricsSource],
    registry: CollectorRegistry | None,
    names: Sequence[str] | None,
    latency: bool,
) -> CollectorRegistry:
    prometheus = _import_prometheus()
    if registry is None:
        registry = prometheus.CollectorRegistry()
    PrometheusCollector(*managers, names=names, latency=latency).register(registry)
    return registry


def prometheus_asgi_app(
    *managers: MetricsSource,
    registry: CollectorRegistry | None = None,
    names: Sequence[str] | None = None,
    latency: bool = False,
) -> Callable[..., Any]:
    """An ASGI app serving the managers' metrics in the Prometheus text format, to mount
    in any ASGI framework (``app.mount("/metrics", prometheus_asgi_app(cache))``).

    Args:
        registry: where to register the collector; default a new registry of its own
            (the process's default ``REGISTRY`` is left alone).
        names, latency: as for :class:`PrometheusCollector`.
    """
    prometheus = _import_prometheus()
    return prometheus.make_asgi_app(_registry_with(managers, registry, names, latency))  # type: ignore[no-any-return]


def prometheus_wsgi_app(
    *managers: MetricsSource,
    registry: CollectorRegistry | None = None,
    names: Sequence[str] | None = None,
    latency: bool = False,
) -> Callable[..., Any]:
    """A WSGI app serving the managers' metrics (as :func:`prometheus_asgi_app`)."""
    prometheus = _import_prometheus()
    return prometheus.make_wsgi_app(_registry_with(managers, registry, names, latency))  # type: ignore[no-any-return]


# -- OpenTelemetry -----------------------------------------------------------------------


class OpenTelemetryMetrics:
    """OpenTelemetry instruments over one or more managers, on a ``MeterProvider``.

    Counts and states are observable instruments: read from the managers' counters when
    a reader collects, never on the hot path. The two histograms
    (``db.client.operation.duration``, ``db.client.connection.wait_time``) are
    synchronous instruments the collection brings up to date: the calls timed since the
    last collection are recorded then, each at its bucket's midpoint (the bucket bounds
    are crmcache's, given as the advisory boundaries, so counts per bucket are exact;
    sums are approximate). That costs about a microsecond per timed call, at collection.

    Args:
        managers: ``CRMCacheManager`` and/or ``AsyncCRMCacheManager`` instances.
        meter_provider: default the global one (``opentelemetry.metrics``).
        names: the ``crmcache.manager`` (``db.client.connection.pool.name``) attribute of
            each, in order; default their ``key_prefix``.
        latency: turn the managers' latency histograms on.

    Raises:
        ImportError: opentelemetry-api is not installed.
        TypeError, ValueError: bad ``managers`` or ``names``.
    """

    def __init__(
        self,
        *managers: MetricsSource,
        meter_provider: MeterProvider | None = None,
        names: Sequence[str] | None = None,
        latency: bool = False,
    ) -> None:
        try:
            from opentelemetry import metrics  # noqa: PLC0415 - an optional dependency
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise ImportError(
                "crmcache's OpenTelemetry metrics need opentelemetry-api: "
                "pip install 'crmcache[otel]'"
            ) from exc
        from . import __version__  # noqa: PLC0415 - the package imports this module lazily

        self._managers = _named(managers, names)
        if latency:
            _enable_latency(self._managers)
        provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
        meter = provider.get_meter("crmcache", __version__)
        self._lock = threading.Lock()
        #: What each histogram already recorded: (spec name, manager, label values) ->
        #: the buckets seen.
        self._seen: dict[tuple[str, str, tuple[str, ...]], tuple[int, ...]] = {}
        self._histograms: list[tuple[MetricSpec, Histogram]] = []
        boundaries = [b / 1e9 for b in BOUNDS_NS]
        for spec in SPECS:
            if spec.kind == "histogram":
                histogram = meter.create_histogram(
                    spec.otel,
                    unit=spec.unit,
                    description=spec.doc,
                    explicit_bucket_boundaries_advisory=boundaries,
                )
                self._histograms.append((spec, histogram))
        for spec in SPECS:
            callback = functools.partial(self._observe, spec)
            if spec.kind == "counter":
                meter.create_observable_counter(spec.otel, [callback], spec.unit, spec.doc)
            elif spec.kind == "updown":
                meter.create_observable_up_down_counter(spec.otel, [callback], spec.unit, spec.doc)
            elif spec.kind == "gauge":
                meter.create_observable_gauge(spec.otel, [callback], spec.unit, spec.doc)

    def _attributes(self, spec: MetricSpec, manager: str, values: tuple[str, ...]) -> Any:  # noqa: ANN401
        return {
            **spec.constant,
            spec.manager_attribute: manager,
            **dict(zip(spec.attributes, values, strict=True)),
        }

    def _observe(self, spec: MetricSpec, options: CallbackOptions) -> list[Observation]:
        from opentelemetry.metrics import Observation  # noqa: PLC0415 - optional

        if spec is SPECS[0]:
            # The first instrument's callback runs first at each collection (the SDK calls
            # callbacks in creation order, then reads the synchronous instruments).
            self._replay_histograms()
        observed = []
        for manager, instance in self._managers:
            for values, value in spec.samples(instance.metrics_snapshot()):
                if isinstance(value, HistogramSnapshot):  # not in an observable's SPECS
                    continue
                observed.append(Observation(value, self._attributes(spec, manager, values)))
        return observed

    def _replay_histograms(self) -> None:
        """Record the durations timed since the last collection into the histograms."""
        with self._lock:
            for manager, instance in self._managers:
                snapshot = instance.metrics_snapshot()
                for spec, histogram in self._histograms:
                    for values, value in spec.samples(snapshot):
                        if not isinstance(value, HistogramSnapshot):  # not a histogram spec
                            continue
                        key = (spec.name, manager, values)
                        seen = self._seen.get(key, (0,) * len(value.buckets))
                        self._seen[key] = value.buckets
                        attributes = self._attributes(spec, manager, values)
                        for i, (now, before) in enumerate(zip(value.buckets, seen, strict=True)):
                            point = _midpoint(value.bounds, i)
                            for _ in range(max(0, now - before)):
                                histogram.record(point, attributes)


def _midpoint(bounds: Sequence[float], i: int) -> float:
    """A value inside bucket ``i`` (above ``bounds[i - 1]``, at most ``bounds[i]``)."""
    if i == 0:
        return bounds[0] / 2
    if i >= len(bounds):
        return bounds[-1] * 1.5
    return math.sqrt(bounds[i - 1] * bounds[i])
