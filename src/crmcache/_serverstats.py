"""The figures of ``crmcache stats`` (and ``stats --watch``): what Redis says about itself
and about the cache's keys, seen from outside the service. Pure logic, no I/O: the
samples are taken by ``crmcache._sync.server_view.sample_server``.

A :class:`ServerSample` is one look at every primary: selected ``INFO`` fields and the
cache's keys per kind (``SCAN`` within a time budget, never ``KEYS``). Figures come
from up to three samples of the same server (:func:`server_figures`):

- ``ops_per_sec``: the delta of ``total_commands_processed`` over the time between the
  previous sample and this one; without a previous sample (the one-shot ``stats``, the
  first refresh of a watch, a node just back), Redis's own ``instantaneous_ops_per_sec``
  (``ops_per_sec_source`` says which);
- memory: ``used_memory`` against ``maxmemory`` (0: no limit) and ``maxmemory_policy``;
- evictions: ``evicted_keys`` (since the server's counters began) and its delta since
  the previous sample;
- hit ratio (percent) from ``keyspace_hits`` / ``keyspace_misses``: over the last interval,
  since the first sample (the watch began), and over the server's counters' lifetime
  (since it started or ``CONFIG RESETSTAT``). These count every GET-like lookup on the
  server, not only crmcache's;
- keys per kind, from the key prefixes of :mod:`crmcache._keys`. A preferences key that
  holds an invalidation tombstone is counted as a tombstone. When SCAN stopped at its
  budget the counts are a sample (``keys_exact`` False): lower bounds.

A counter that went down (a restart, ``CONFIG RESETSTAT``) gives no delta: the rate falls
back to Redis's own estimate for that refresh.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from redis._parsers.helpers import parse_info

from ._keys import KeySpace

__all__ = [
    "INFO_FIELDS",
    "KeyKind",
    "NodeFigures",
    "NodeSample",
    "ServerFigures",
    "ServerSample",
    "info_fields",
    "key_kind",
    "node_figures",
    "server_figures",
]


class KeyKind(StrEnum):
    """What a key of the cache holds, told by its prefix (and, for preferences, whether
    the value is a tombstone)."""

    PREFERENCES = "preferences"
    TOMBSTONES = "tombstones"
    TEMPLATES = "templates"
    RATE_LIMITS = "rate_limits"
    SEND_CLAIMS = "send_claims"
    LEASES = "leases"
    #: Under the prefix but of no known kind (another version's keys, a user's).
    OTHER = "other"


#: The ``INFO`` fields a sample keeps (numbers unless noted).
INFO_FIELDS = (
    "redis_version",  # str
    "role",  # str
    "uptime_in_seconds",
    "connected_clients",
    "used_memory",
    "maxmemory",
    "maxmemory_policy",  # str
    "evicted_keys",
    "keyspace_hits",
    "keyspace_misses",
    "total_commands_processed",
    "instantaneous_ops_per_sec",
)
_TEXT_FIELDS = frozenset({"redis_version", "role", "maxmemory_policy"})


def info_fields(reply: bytes | str) -> dict[str, Any] | None:
    """The :data:`INFO_FIELDS` of a raw ``INFO`` reply (missing numbers are 0), or None
    if it is not an INFO reply or a number is not one."""
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    try:
        info = parse_info(text)  # type: ignore[no-untyped-call]
        if not isinstance(info, Mapping) or "redis_version" not in info:
            return None
        return {
            name: str(info.get(name, "")) if name in _TEXT_FIELDS else int(info.get(name, 0))
            for name in INFO_FIELDS
        }
    except (ValueError, TypeError, AttributeError):
        return None


def key_kind(key: bytes, keys: KeySpace) -> KeyKind:
    """The kind of a key under ``keys``' prefix (preferences for a preferences key: a
    tombstone is told by its value)."""
    text = key.decode("utf-8", "replace")
    if text.startswith(keys.prefs_prefix):
        return KeyKind.PREFERENCES
    if text.startswith(keys.template_root):
        return KeyKind.TEMPLATES
    if text.startswith(keys.rate_limit_prefix):
        return KeyKind.RATE_LIMITS
    if text.startswith(keys.send_prefix):
        return KeyKind.SEND_CLAIMS
    if text.startswith(keys.lease_prefix):
        return KeyKind.LEASES
    return KeyKind.OTHER


@dataclass(frozen=True, slots=True)
class NodeSample:
    """One primary, at one moment.

    Attributes:
        address: ``host:port``.
        at: when it was taken (``time.monotonic()``).
        info: the :data:`INFO_FIELDS`, None when the node did not answer.
        keys: the cache's keys per kind seen by SCAN.
        keys_exact: SCAN went through the whole keyspace within its budget.
        error: why the node could not be asked (None when it answered).
        own_hits, own_misses: the lookups the sampler itself made on the node (reading
            preferences keys to tell tombstones), after its INFO: they show in the next
            sample's ``keyspace_hits`` / ``keyspace_misses`` and are taken out of them.
    """

    address: str
    at: float
    info: Mapping[str, Any] | None
    keys: Mapping[KeyKind, int] = field(default_factory=dict)
    keys_exact: bool = False
    error: str | None = None
    own_hits: int = 0
    own_misses: int = 0


@dataclass(frozen=True, slots=True)
class ServerSample:
    """Every primary, at one moment (``wall``: ``time.time()`` then)."""

    at: float
    wall: float
    topology: str | None
    nodes: tuple[NodeSample, ...]

    @property
    def reachable(self) -> bool:
        """At least one node answered."""
        return any(node.info is not None for node in self.nodes)

    @property
    def error(self) -> str | None:
        """The first node's error, when no node answered (or there is no node)."""
        if self.reachable:
            return None
        errors = [node.error for node in self.nodes if node.error]
        return errors[0] if errors else "no node to ask"


@dataclass(frozen=True, slots=True)
class NodeFigures:
    """What :func:`node_figures` makes of one node's samples (or a cluster's total).
    None: not known (the node did not answer, or the figure needs an earlier sample)."""

    address: str
    error: str | None = None
    redis_version: str | None = None
    role: str | None = None
    ops_per_sec: float | None = None
    #: ``"delta"`` (``total_commands_processed`` between samples) or ``"redis"``
    #: (``instantaneous_ops_per_sec``).
    ops_per_sec_source: str | None = None
    connected_clients: int | None = None
    used_memory: int | None = None
    #: 0: no limit.
    maxmemory: int | None = None
    maxmemory_policy: str | None = None
    evicted_keys: int | None = None
    evicted_keys_delta: int | None = None
    hit_ratio_interval: float | None = None
    hit_ratio_since_start: float | None = None
    hit_ratio_lifetime: float | None = None
    keys: Mapping[str, int] = field(default_factory=dict)
    total_keys: int | None = None
    keys_exact: bool = False

    @property
    def memory_used_ratio(self) -> float | None:
        """``used_memory`` in percent of ``maxmemory``; None without a limit."""
        if not self.maxmemory or self.used_memory is None:
            return None
        return round(100.0 * self.used_memory / self.maxmemory, 2)

    def as_dict(self) -> dict[str, Any]:
        """The figures as JSON-ready values."""
        return {
            "address": self.address,
            "error": self.error,
            "redis_version": self.redis_version,
            "role": self.role,
            "ops_per_sec": self.ops_per_sec,
            "ops_per_sec_source": self.ops_per_sec_source,
            "connected_clients": self.connected_clients,
            "used_memory": self.used_memory,
            "maxmemory": self.maxmemory,
            "maxmemory_policy": self.maxmemory_policy,
            "memory_used_ratio": self.memory_used_ratio,
            "evicted_keys": self.evicted_keys,
            "evicted_keys_delta": self.evicted_keys_delta,
            "hit_ratio_interval": self.hit_ratio_interval,
            "hit_ratio_since_start": self.hit_ratio_since_start,
            "hit_ratio_lifetime": self.hit_ratio_lifetime,
            "keys": dict(self.keys),
            "total_keys": self.total_keys,
            "keys_exact": self.keys_exact,
        }


@dataclass(frozen=True, slots=True)
class ServerFigures:
    """Per node and in total (the sum over the nodes that answered)."""

    topology: str | None
    nodes: tuple[NodeFigures, ...]
    total: NodeFigures

    @property
    def keys_exact(self) -> bool:
        """Every node's keys were counted in full."""
        return all(node.keys_exact for node in self.nodes)


def _ratio(hits: int, misses: int) -> float | None:
    lookups = hits + misses
    return round(100.0 * hits / lookups, 2) if lookups > 0 else None


def _delta(now: Mapping[str, Any], then: Mapping[str, Any] | None, name: str) -> int | None:
    """``now[name] - then[name]``; None without ``then`` or when the counter went down."""
    if then is None:
        return None
    delta = int(now[name]) - int(then[name])
    return delta if delta >= 0 else None


def _interval_ratio(now: Mapping[str, Any], then: Mapping[str, Any] | None) -> float | None:
    hits = _delta(now, then, "keyspace_hits")
    misses = _delta(now, then, "keyspace_misses")
    if hits is None or misses is None:
        return None
    return _ratio(hits, misses)


def node_figures(
    current: NodeSample, previous: NodeSample | None = None, first: NodeSample | None = None
) -> NodeFigures:
    """One node's figures from its latest sample, the one before (rates, deltas) and the
    first one (since the watch began). Samples of another address are ignored."""
    keys = {kind.value: current.keys.get(kind, 0) for kind in KeyKind}
    info = current.info
    if info is None:
        return NodeFigures(address=current.address, error=current.error or "no answer")
    before = _same_node(current, previous)
    start = _same_node(current, first)
    commands = _delta(info, before.info if before else None, "total_commands_processed")
    elapsed = current.at - before.at if before else 0.0
    if commands is not None and elapsed > 0 and before is not None:
        ops, source = round(commands / elapsed, 1), "delta"
    else:
        ops, source = float(info["instantaneous_ops_per_sec"]), "redis"
    return NodeFigures(
        address=current.address,
        error=current.error,
        redis_version=str(info["redis_version"]),
        role=str(info["role"]),
        ops_per_sec=ops,
        ops_per_sec_source=source,
        connected_clients=int(info["connected_clients"]),
        used_memory=int(info["used_memory"]),
        maxmemory=int(info["maxmemory"]),
        maxmemory_policy=str(info["maxmemory_policy"]),
        evicted_keys=int(info["evicted_keys"]),
        evicted_keys_delta=_delta(info, before.info if before else None, "evicted_keys"),
        hit_ratio_interval=_interval_ratio(info, before.info if before else None),
        hit_ratio_since_start=_interval_ratio(info, start.info if start else None),
        hit_ratio_lifetime=_ratio(int(info["keyspace_hits"]), int(info["keyspace_misses"])),
        keys=keys,
        total_keys=sum(keys.values()),
        keys_exact=current.keys_exact,
    )


def _same_node(current: NodeSample, other: NodeSample | None) -> NodeSample | None:
    if other is None or other.address != current.address or other.info is None:
        return None
    return other


def _by_address(sample: ServerSample | None) -> dict[str, NodeSample]:
    return {node.address: node for node in sample.nodes} if sample is not None else {}


def server_figures(
    current: ServerSample,
    previous: ServerSample | None = None,
    first: ServerSample | None = None,
) -> ServerFigures:
    """Every node's figures (matched by address across samples) and their total."""
    before, start = _by_address(previous), _by_address(first)
    nodes = tuple(
        node_figures(node, before.get(node.address), start.get(node.address))
        for node in current.nodes
    )
    total = total_figures(nodes, current.nodes, before, start)
    return ServerFigures(current.topology, nodes, total)


def _sum(values: Sequence[int | float | None]) -> Any:  # noqa: ANN401 - int or float
    known = [value for value in values if value is not None]
    return sum(known) if known else None


def _summed_ratio(
    samples: Sequence[NodeSample], earlier: Mapping[str, NodeSample] | None
) -> float | None:
    """The hit ratio of several nodes' summed keyspace counters: over their lifetime
    (``earlier`` None), else since ``earlier`` (the nodes with a usable earlier sample)."""
    hits = misses = 0
    for sample in samples:
        if sample.info is None:
            continue
        if earlier is None:
            hits += int(sample.info["keyspace_hits"])
            misses += int(sample.info["keyspace_misses"])
            continue
        then = _same_node(sample, earlier.get(sample.address))
        dh = _delta(sample.info, then.info if then else None, "keyspace_hits")
        dm = _delta(sample.info, then.info if then else None, "keyspace_misses")
        if dh is not None and dm is not None:
            hits, misses = hits + dh, misses + dm
    return _ratio(hits, misses)


def total_figures(
    nodes: Sequence[NodeFigures],
    samples: Sequence[NodeSample],
    previous: Mapping[str, NodeSample] | None = None,
    first: Mapping[str, NodeSample] | None = None,
) -> NodeFigures:
    """The nodes that answered, summed: rates, memory, evictions, keys, and the hit
    ratios of their summed counters. One node is its own total."""
    if len(nodes) == 1:
        return nodes[0]
    up = [node for node in nodes if node.used_memory is not None]
    if not up:
        return NodeFigures(address="total", error=nodes[0].error if nodes else "no node")
    keys = {kind.value: sum(node.keys.get(kind.value, 0) for node in up) for kind in KeyKind}
    limits = [node.maxmemory or 0 for node in up]
    policies = {node.maxmemory_policy for node in up}
    return NodeFigures(
        address="total",
        error=None if len(up) == len(nodes) else f"{len(nodes) - len(up)} node(s) unreachable",
        ops_per_sec=_sum([node.ops_per_sec for node in up]),
        ops_per_sec_source=(
            "delta" if all(n.ops_per_sec_source == "delta" for n in up) else "redis"
        ),
        connected_clients=_sum([node.connected_clients for node in up]),
        used_memory=_sum([node.used_memory for node in up]),
        maxmemory=sum(limits) if all(limits) else 0,
        maxmemory_policy=policies.pop() if len(policies) == 1 else "mixed",
        evicted_keys=_sum([node.evicted_keys for node in up]),
        evicted_keys_delta=_sum([node.evicted_keys_delta for node in up]),
        hit_ratio_interval=_summed_ratio(samples, previous or {}),
        hit_ratio_since_start=_summed_ratio(samples, first or {}),
        hit_ratio_lifetime=_summed_ratio(samples, None),
        keys=keys,
        total_keys=sum(keys.values()),
        keys_exact=all(node.keys_exact for node in nodes),
    )
