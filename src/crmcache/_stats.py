"""Statistics: thread-safe counters and the typed, frozen snapshot ``get_cache_stats`` returns.

``CacheStats.as_dict()`` gives the spec's dict shape (``enabled``, ``total_keys``,
``local_hit_rate`` in percent, ``connection_pool`` ...).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from redis._parsers.helpers import parse_info

if TYPE_CHECKING:
    from ._latency import HistogramSnapshot
    from ._near import NearCacheStats

__all__ = [
    "LOW_HIT_RATE_THRESHOLD",
    "MAX_RATE_LIMIT_NAMES",
    "MIN_LOOKUPS_FOR_HIT_RATE_WARNING",
    "OTHER_RATE_LIMITS",
    "SCAN_BUDGET",
    "SCAN_COUNT",
    "CacheStats",
    "Counter",
    "Kind",
    "KindStats",
    "MetricsSnapshot",
    "NodeStats",
    "PoolStats",
    "RedisServerStats",
    "RepositoryStats",
    "StatsRecorder",
    "Tally",
    "Tier",
    "hit_rate",
]


#: Below this many lookups a low hit rate says nothing and is not logged.
MIN_LOOKUPS_FOR_HIT_RATE_WARNING = 100
#: Hit rate (percent) under which get_cache_stats logs a WARNING (spec: 50).
LOW_HIT_RATE_THRESHOLD = 50.0
#: Time budget for counting a manager's keys (``<key_prefix>:*``) with SCAN in get_cache_stats,
#: in seconds.
SCAN_BUDGET = 2.0
#: Keys asked per SCAN step.
SCAN_COUNT = 1000
#: Rate-limit names counted one by one (per manager); decisions for names seen after
#: these many are counted together under :data:`OTHER_RATE_LIMITS`, so a caller with
#: endless names cannot grow the counters (or a metrics backend's series) without bound.
MAX_RATE_LIMIT_NAMES = 64
#: The name the decisions of the names past :data:`MAX_RATE_LIMIT_NAMES` are counted under.
OTHER_RATE_LIMITS = "__other__"
#: The counters of rate-limit decisions, in the order of a per-name row.
RATE_LIMIT_DECISIONS = (
    "RATE_LIMIT_ALLOWED",
    "RATE_LIMIT_REJECTED",
    "RATE_LIMIT_DEGRADED",
)


class Kind(StrEnum):
    """What a cache lookup was for."""

    PREFERENCES = "preferences"
    TEMPLATES = "templates"


class Tier(StrEnum):
    """Where a lookup was answered: the in-process near cache or Redis. A miss is answered
    by the last tier asked, Redis (also when Redis could not be asked)."""

    NEAR = "near"
    REDIS = "redis"


class Counter(StrEnum):
    """Events counted besides hits and misses."""

    #: Values in Redis that did not decode (evicted), and rate-limit replies no correct
    #: run of the script gives (the call degraded by the failure policy).
    CORRUPT_VALUES = "corrupt_values"
    #: Values in Redis that did not decode and were deleted (the first part of
    #: ``corrupt_values``).
    DECODE_ERRORS_EVICTED = "decode_errors_evicted"
    STALE_WRITES_REFUSED = "stale_writes_refused"
    WRITES = "writes"
    WRITES_FAILED = "writes_failed"
    INVALIDATIONS = "invalidations"
    INVALIDATIONS_FAILED = "invalidations_failed"
    INVALIDATIONS_REPLAYED = "invalidations_replayed"
    READS_FAILED = "reads_failed"
    REDIS_ERRORS = "redis_errors"
    RATE_LIMIT_ALLOWED = "rate_limit_allowed"
    RATE_LIMIT_REJECTED = "rate_limit_rejected"
    RATE_LIMIT_DEGRADED = "rate_limit_degraded"
    #: ``claim_send``: claims won (send), claims refused (a duplicate: someone claimed the
    #: key first), and answers given without Redis (by ``send_guard_policy``).
    SEND_CLAIMS_WON = "send_claims_won"
    SEND_CLAIMS_REFUSED = "send_claims_refused"
    SEND_CLAIMS_DEGRADED = "send_claims_degraded"
    #: ``release_send`` calls that deleted this manager's claim.
    SEND_CLAIMS_RELEASED = "send_claims_released"
    #: Calls whose caller was cancelled (or, sync, interrupted) while Redis was asked.
    CANCELLED = "cancelled"
    #: Calls that failed with an error that is neither Redis's nor a cancellation.
    UNEXPECTED_ERRORS = "unexpected_errors"
    #: Calls a node answered with MOVED, ASK, READONLY, TRYAGAIN or CLUSTERDOWN: the
    #: topology changed under the call (not an outage, not a refusal).
    TOPOLOGY_ERRORS = "topology_errors"
    #: Replies that broke their command's contract (wrong type, size or count): the call
    #: degraded and its connection was closed.
    PROTOCOL_ERRORS = "protocol_errors"


def hit_rate(hits: int, misses: int) -> float:
    """Hits as a percentage of lookups, rounded to 2 decimals; 0.0 with no lookups."""
    total = hits + misses
    return round(100.0 * hits / total, 2) if total else 0.0


@dataclass(frozen=True, slots=True)
class KindStats:
    """Hits and misses of one kind of lookup."""

    hits: int
    misses: int
    #: The part of ``hits`` the near cache answered (the rest came from Redis).
    near_hits: int = 0

    @property
    def hit_rate(self) -> float:
        """Hit rate in percent."""
        return hit_rate(self.hits, self.misses)

    def as_dict(self) -> dict[str, Any]:
        """``{"hits", "misses", "hit_rate", "near_hits"}``."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hit_rate,
            "near_hits": self.near_hits,
        }


@dataclass(frozen=True, slots=True)
class PoolStats:
    """Connection pool utilisation."""

    max_connections: int
    in_use: int
    idle: int
    created: int


@dataclass(frozen=True, slots=True)
class PoolAccounting:
    """Where every slot and connection of the data-path pool is, at one moment.

    At rest (no call running) ``slots_held == checked_out == 0`` and ``created == idle``;
    during calls ``slots_held >= checked_out`` (a slot is taken just before a connection).
    """

    slots_held: int
    checked_out: int
    idle: int
    created: int
    waiting: int  # callers queued for a slot now
    waits: int  # acquisitions that had to queue, since start
    timeouts: int  # ... and gave up at the pool timeout
    discarded: int  # connections closed instead of reused (timeouts, drops, cancellations)
    #: How long the acquisitions that queued waited: a ``crmcache._latency`` series
    #: (counts per power-of-two bucket of nanoseconds, then the sum); empty if none did.
    wait_time: tuple[int, ...] = ()

    @classmethod
    def total(cls, books: Sequence[PoolAccounting]) -> PoolAccounting:
        """Several pools' books as one (a cluster's node pools): every figure summed."""
        waited = [b.wait_time for b in books if b.wait_time]
        return cls(
            slots_held=sum(b.slots_held for b in books),
            checked_out=sum(b.checked_out for b in books),
            idle=sum(b.idle for b in books),
            created=sum(b.created for b in books),
            waiting=sum(b.waiting for b in books),
            waits=sum(b.waits for b in books),
            timeouts=sum(b.timeouts for b in books),
            discarded=sum(b.discarded for b in books),
            wait_time=tuple(map(sum, zip(*waited, strict=True))) if waited else (),
        )


@dataclass(frozen=True, slots=True)
class RedisServerStats:
    """Selected fields of Redis ``INFO``."""

    redis_version: str
    uptime_in_seconds: int
    connected_clients: int
    used_memory: int
    used_memory_human: str
    keyspace_hits: int
    keyspace_misses: int

    @classmethod
    def from_reply(cls, reply: bytes) -> RedisServerStats | None:
        """Parse a raw ``INFO`` reply (redis-py's parser) and pick the fields.

        Returns:
            None if the reply is not an INFO reply (no ``redis_version``) or a numeric
            field is not a number: a buggy server's text is not reported as its state.
        """
        text = reply.decode("utf-8", "replace")
        try:
            info = parse_info(text)  # type: ignore[no-untyped-call]
            if not isinstance(info, Mapping) or "redis_version" not in info:
                return None
            return cls.from_info(info)
        except (ValueError, TypeError, AttributeError):
            return None

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> RedisServerStats:
        """Pick the fields from an ``INFO`` reply (missing ones become 0 / "")."""
        return cls(
            redis_version=str(info.get("redis_version", "")),
            uptime_in_seconds=int(info.get("uptime_in_seconds", 0)),
            connected_clients=int(info.get("connected_clients", 0)),
            used_memory=int(info.get("used_memory", 0)),
            used_memory_human=str(info.get("used_memory_human", "")),
            keyspace_hits=int(info.get("keyspace_hits", 0)),
            keyspace_misses=int(info.get("keyspace_misses", 0)),
        )


@dataclass(frozen=True, slots=True)
class NodeStats:
    """One primary's figures in :class:`CacheStats` (one entry per node of a cluster).

    Attributes:
        address: the node's ``host:port``.
        total_keys: this manager's keys on the node (``SCAN``), None if it did not answer.
        total_keys_exact: False when counting stopped at its time budget, or failed.
        redis: its ``INFO`` fields, None if it did not answer.
        error: why the node could not be asked (None when it answered).
    """

    address: str
    total_keys: int | None
    total_keys_exact: bool
    redis: RedisServerStats | None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The node's entry in ``get_cache_stats()['nodes']``."""
        return {
            "address": self.address,
            "total_keys": self.total_keys,
            "total_keys_exact": self.total_keys_exact,
            "redis": asdict(self.redis) if self.redis is not None else None,
            "error": self.error,
        }


def summarise(infos: Sequence[RedisServerStats]) -> RedisServerStats | None:
    """Several nodes' INFO as one: memory, clients and keyspace counters summed, the
    lowest version and uptime (the oldest server and the latest restart)."""
    if not infos:
        return None
    if len(infos) == 1:
        return infos[0]
    used = sum(i.used_memory for i in infos)
    return RedisServerStats(
        redis_version=min(infos, key=lambda i: _version_key(i.redis_version)).redis_version,
        uptime_in_seconds=min(i.uptime_in_seconds for i in infos),
        connected_clients=sum(i.connected_clients for i in infos),
        used_memory=used,
        used_memory_human=f"{used / (1024 * 1024):.2f}M",
        keyspace_hits=sum(i.keyspace_hits for i in infos),
        keyspace_misses=sum(i.keyspace_misses for i in infos),
    )


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) if part.isdigit() else 0 for part in version.split("."))


@dataclass(frozen=True, slots=True)
class CacheStats:
    """A snapshot of one manager's statistics.

    ``total_keys`` is ``None`` and ``redis`` is ``None`` when Redis could not be asked.
    ``total_keys_exact`` is False when counting stopped at its time budget.
    """

    enabled: bool
    total_keys: int | None
    total_keys_exact: bool
    by_kind: Mapping[Kind, KindStats]
    counters: Mapping[Counter, int]
    connection_pool: PoolStats
    redis: RedisServerStats | None
    circuit_breaker: Mapping[str, Any] = field(default_factory=dict)
    pending_invalidations: int = 0
    near_cache: Mapping[str, Any] = field(default_factory=dict)
    #: What ``redis_url`` points at (``crmcache._topology.Topology``): ``"standalone"``,
    #: ``"replica"``, ``"cluster-node"``, ``"sentinel"``, or ``"unknown"`` before the first
    #: connection; None when the cache is disabled or closed. ``"cluster"`` for a
    #: ``redis+cluster://`` URL.
    topology: str | None = None
    #: Each primary's figures (one on a single node; every primary of a cluster).
    #: ``total_keys`` sums those that answered, exact only if every one answered, and
    #: ``redis`` summarises their INFO.
    nodes: tuple[NodeStats, ...] = ()
    #: The weakest persistence among the primaries: ``"aof"``, ``"rdb"`` (snapshots
    #: only), ``"none"``, ``"unknown"`` (``CONFIG GET save`` refused, AOF off), or None
    #: when no primary answered.
    persistence: str | None = None
    #: True when quota limits (calendar windows, windows of an hour or more) were used by
    #: this manager and a primary has no persistence: a restart would zero them.
    quotas_without_persistence: bool = False

    @property
    def hits(self) -> int:
        """Hits over all kinds."""
        return sum(k.hits for k in self.by_kind.values())

    @property
    def misses(self) -> int:
        """Misses over all kinds."""
        return sum(k.misses for k in self.by_kind.values())

    @property
    def local_hit_rate(self) -> float:
        """Hit rate over all kinds, in percent."""
        return hit_rate(self.hits, self.misses)

    def as_dict(self) -> dict[str, Any]:
        """The spec's dict: ``stats['enabled']``, ``stats['total_keys']``,
        ``stats['local_hit_rate']``, ``stats['connection_pool']['max_connections']`` ..."""
        return {
            "enabled": self.enabled,
            "total_keys": self.total_keys,
            "total_keys_exact": self.total_keys_exact,
            "local_hit_rate": self.local_hit_rate,
            "hits": self.hits,
            "misses": self.misses,
            "by_kind": {kind.value: s.as_dict() for kind, s in self.by_kind.items()},
            "counters": {c.value: n for c, n in self.counters.items()},
            "connection_pool": asdict(self.connection_pool),
            "redis": asdict(self.redis) if self.redis is not None else None,
            "circuit_breaker": dict(self.circuit_breaker),
            "pending_invalidations": self.pending_invalidations,
            "near_cache": dict(self.near_cache),
            "topology": self.topology,
            "nodes": [node.as_dict() for node in self.nodes],
            "persistence": self.persistence,
            "quotas_without_persistence": self.quotas_without_persistence,
        }


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """One manager's counters at one moment, as the exporters (``crmcache.metrics``) read
    them: taken without asking Redis (``metrics_snapshot()``), from the counters
    ``get_cache_stats()`` reports.

    Attributes:
        key_prefix: the manager's key prefix (the default ``manager`` label).
        enabled: the cache is on and the manager open.
        by_kind: hits (``near_hits`` of them from the near cache) and misses per kind.
        counters: every :class:`Counter`.
        rate_limits: decisions per limit name (``MAX_RATE_LIMIT_NAMES`` names at most,
            the rest under ``OTHER_RATE_LIMITS``), each ``RATE_LIMIT_ALLOWED``,
            ``RATE_LIMIT_REJECTED`` and ``RATE_LIMIT_DEGRADED``.
        breaker_state: the circuit breaker's state (a ``BreakerState`` value).
        breaker_transitions: how many times each state was entered.
        breaker_short_circuited: calls refused by the open breaker.
        pool: the data path's pool books (None when disabled).
        max_connections: the pool's size setting.
        pending_invalidations: invalidations waiting to be replayed.
        near_cache: the near cache's figures (None when off).
        latency: per operation, the latency of its Redis calls (empty unless
            ``metrics_latency``).
        pool_wait: how long the acquisitions that queued for a connection waited (None
            when none did).
    """

    key_prefix: str
    enabled: bool
    by_kind: Mapping[Kind, KindStats]
    counters: Mapping[Counter, int]
    rate_limits: Mapping[str, Mapping[Counter, int]]
    breaker_state: str
    breaker_transitions: Mapping[str, int]
    breaker_short_circuited: int
    pool: PoolAccounting | None
    max_connections: int
    pending_invalidations: int
    near_cache: NearCacheStats | None
    latency: Mapping[str, HistogramSnapshot]
    pool_wait: HistogramSnapshot | None


@dataclass(frozen=True, slots=True)
class RepositoryStats:
    """What a repository did: cache hits, database loads, and how stampedes were held."""

    cache_hits: int
    db_loads: int
    single_flight_joins: int
    lease_waits: int
    lease_wait_hits: int
    saves: int
    #: Retries of update_client_preferences after a StaleVersionError.
    update_retries: int = 0


class Tally:
    """A counter cheap enough for a near-cache hit: one C-level ``next()`` per +1.

    ``next(itertools.count())`` is a single call into C, so concurrent threads never lose
    an increment, and it costs a fifth of taking a lock. Larger steps take the lock.
    """

    __slots__ = ("_extra", "_lock", "_ones")

    def __init__(self) -> None:
        self._ones = itertools.count()
        self._extra = 0
        self._lock = threading.Lock()

    def add(self, n: int = 1) -> None:
        """Add ``n``."""
        if n == 1:
            next(self._ones)
        elif n:
            with self._lock:
                self._extra += n

    @property
    def value(self) -> int:
        """The total so far."""
        # count() exposes its next value only through its repr: "count(41)".
        return int(repr(self._ones)[6:-1]) + self._extra


class StatsRecorder:
    """Thread-safe counters updated on the hot path.

    Hits are counted per kind and per tier (:class:`Tier`): a near-cache hit with
    :meth:`near_hit`, a Redis hit with :meth:`hit`; misses are always Redis's. Rate-limit
    decisions are counted in total and per limit name (:meth:`rate_limit`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fresh()

    def _fresh(self) -> None:
        self._hits = {k: Tally() for k in Kind}
        self._near_hits = {k: Tally() for k in Kind}
        self._misses = {k: Tally() for k in Kind}
        self._counters = {c: Tally() for c in Counter}
        #: Per limit name: its decisions (allowed, rejected, degraded), at most
        #: MAX_RATE_LIMIT_NAMES names and OTHER_RATE_LIMITS.
        self._limits: dict[str, dict[Counter, Tally]] = {}

    def hit(self, kind: Kind, n: int = 1) -> None:
        """Count ``n`` hits answered by Redis."""
        self._hits[kind].add(n)

    def near_hit(self, kind: Kind, n: int = 1) -> None:
        """Count ``n`` hits answered by the near cache."""
        self._near_hits[kind].add(n)

    def miss(self, kind: Kind, n: int = 1) -> None:
        """Count ``n`` misses."""
        self._misses[kind].add(n)

    def count(self, counter: Counter, n: int = 1) -> None:
        """Add ``n`` to ``counter``."""
        self._counters[counter].add(n)

    def rate_limit(self, name: str, decision: Counter) -> None:
        """Count one rate-limit decision (``RATE_LIMIT_ALLOWED``, ``_REJECTED`` or
        ``_DEGRADED``) for the limit ``name``."""
        # Tally.add(1), inline: once per check, two calls fewer.
        next(self._counters[decision]._ones)
        row = self._limits.get(name)
        if row is None:
            row = self._limit_row(name)
        next(row[decision]._ones)

    def rate_limit_set(self, decision: Counter, names: Iterable[str]) -> None:
        """Count one decision on a set of limits: once in the totals, and once for each
        limit it concerns (``names``: every limit of an allowed or degraded call, the
        refusing ones of a refused call)."""
        self._counters[decision].add()
        for name in names:
            row = self._limits.get(name)
            if row is None:
                row = self._limit_row(name)
            row[decision].add()

    def _limit_row(self, name: str) -> dict[Counter, Tally]:
        with self._lock:
            limits = self._limits
            row = limits.get(name)
            if row is None:
                if len(limits) >= MAX_RATE_LIMIT_NAMES:
                    name = OTHER_RATE_LIMITS
                row = limits.get(name)
                if row is None:
                    row = limits[name] = {Counter[d]: Tally() for d in RATE_LIMIT_DECISIONS}
            return row

    def by_kind(self) -> dict[Kind, KindStats]:
        """Current hits (Redis's and the near cache's) and misses per kind."""
        stats = {}
        for k in Kind:
            near = self._near_hits[k].value
            stats[k] = KindStats(self._hits[k].value + near, self._misses[k].value, near)
        return stats

    def counters(self) -> dict[Counter, int]:
        """Current values of the other counters."""
        return {c: t.value for c, t in self._counters.items()}

    def rate_limits(self) -> dict[str, dict[Counter, int]]:
        """Decisions per limit name (see :data:`MAX_RATE_LIMIT_NAMES`)."""
        with self._lock:
            rows = list(self._limits.items())
        return {name: {d: t.value for d, t in row.items()} for name, row in rows}

    def reset(self) -> None:
        """Zero every counter."""
        with self._lock:
            self._fresh()
