"""Statistics and health: counters, key counts and ``INFO`` on every primary, ``PING``."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from typing import Any, cast

from redis.exceptions import RedisError, ResponseError

from .._guard import FAILED, PoolClosedError
from .._latency import snapshot_series
from .._stats import (
    LOW_HIT_RATE_THRESHOLD,
    MIN_LOOKUPS_FOR_HIT_RATE_WARNING,
    SCAN_BUDGET,
    SCAN_COUNT,
    CacheStats,
    MetricsSnapshot,
    NodeStats,
    PoolStats,
    RedisServerStats,
    hit_rate,
    summarise,
)
from .core import AsyncCacheCore
from .transport import AsyncAdminNode

__all__ = ["AsyncStatsMixin"]

logger = logging.getLogger("crmcache")

#: Persistence kinds, weakest first.
_PERSISTENCE_ORDER = ("none", "unknown", "rdb", "aof")


async def _node_persistence(node: AsyncAdminNode) -> str | None:
    """``"aof"``, ``"rdb"``, ``"none"`` or ``"unknown"`` for one primary; None if it
    could not be asked. Asked directly, not through the breaker: a refused ``CONFIG``
    (renamed, ACL) is not an outage."""
    try:
        info = await node.execute("INFO", "persistence")
        if type(info) is not bytes:
            return None
        if b"aof_enabled:1" in info:
            return "aof"
        try:
            save = await node.execute("CONFIG", "GET", "save")
        except ResponseError:
            return "unknown"
    except (RedisError, OSError):
        return None
    if type(save) is not list or len(save) != 2:
        return "unknown"
    return "rdb" if save[1].strip() else "none"


class AsyncStatsMixin(AsyncCacheCore):
    """``health_check``, ``get_stats``, ``get_cache_stats``, ``reset_stats``,
    ``metrics_snapshot``."""

    #: The warning about quotas on a server without persistence was logged.
    _durability_warned: bool = False

    async def health_check(self) -> bool:
        """PING Redis; True if it answered. Never raises; bounded by the connect timeout.

        A disabled or closed manager is reported unhealthy (it serves nothing); check
        :attr:`enabled` to tell the cases apart. Once quota rate limits are in use, the
        first check also asks whether the server persists its data, and logs one WARNING
        if it does not (``CacheStats.quotas_without_persistence``).
        """
        return await self._health_failure() is None

    async def _health_failure(self) -> str | None:
        """Why :meth:`health_check` fails (one line, no password), or None if healthy.
        The ``crmcache health`` command prints it."""
        transport = self._active()
        closed = (
            "the cache manager is closed"
            if self.settings.enabled
            else "the cache is disabled (enabled=False or ENABLE_CACHING=false)"
        )
        if transport is None:
            return closed
        try:
            answered = await transport.ping()
        except PoolClosedError:
            return closed
        except Exception as exc:  # noqa: BLE001 - a health probe reports, it never raises
            reason = self._guard.describe(exc)
            logger.warning("health check failed: %s", reason)
            return reason
        if not answered:
            return "Redis did not answer PING (the circuit breaker may be open)"
        if self._quotas_in_use and not self._durability_warned:
            await self._persistence(transport.primaries())
        if not transport.topology.servable:
            # The node answers, but it is not what crmcache can serve (said at ERROR once
            # when it was found out): not healthy.
            reason = f"the node behind redis_url is a {transport.topology.value}"
            logger.warning("health check failed: %s", reason)
            return reason
        return None

    async def get_stats(self) -> CacheStats:
        """A typed snapshot of the statistics (see :class:`CacheStats`).

        Logs the summary at INFO, and a WARNING when the hit rate is below 50% over at
        least 100 lookups.
        """
        by_kind = self._stats.by_kind()
        total_keys: int | None = None
        exact = False
        info: RedisServerStats | None = None
        nodes: tuple[NodeStats, ...] = ()
        persistence: str | None = None
        transport = self._active()
        if transport is not None:
            await transport.refresh()  # a cluster's primaries, learnt if unknown
            nodes = tuple([await self._node_stats(node) for node in transport.primaries()])
            answered = [node for node in nodes if node.total_keys is not None]
            if answered:
                total_keys = sum(node.total_keys or 0 for node in answered)
                exact = len(answered) == len(nodes) and all(n.total_keys_exact for n in nodes)
            info = summarise([node.redis for node in nodes if node.redis is not None])
            persistence = await self._persistence(transport.primaries())
        stats = CacheStats(
            enabled=self.enabled,
            total_keys=total_keys,
            total_keys_exact=exact,
            by_kind=by_kind,
            counters=self._stats.counters(),
            connection_pool=self._pool_stats(),
            redis=info,
            pending_invalidations=len(self._replayer.pending),
            near_cache=(
                asdict(self._near.stats()) if self._near is not None else {"enabled": False}
            ),
            circuit_breaker=self._breaker.snapshot(),
            topology=transport.topology.value if transport is not None else None,
            nodes=nodes,
            persistence=persistence,
            quotas_without_persistence=self._quotas_in_use and persistence == "none",
        )
        hits, misses = stats.hits, stats.misses
        logger.info(
            "cache stats: hit rate %.2f%% (%d hits, %d misses), %s keys",
            hit_rate(hits, misses),
            hits,
            misses,
            total_keys,
        )
        if hits + misses >= MIN_LOOKUPS_FOR_HIT_RATE_WARNING and (
            stats.local_hit_rate < LOW_HIT_RATE_THRESHOLD
        ):
            logger.warning("Low cache hit rate: %.2f%%", stats.local_hit_rate)
        return stats

    async def get_cache_stats(self) -> dict[str, Any]:
        """The spec's statistics dict: ``enabled``, ``total_keys``, ``local_hit_rate``
        (percent), ``connection_pool`` (``max_connections``, ``in_use``, ``idle``), ``redis``
        (selected INFO fields), hits and misses per kind, counters, breaker state."""
        return (await self.get_stats()).as_dict()

    async def _persistence(self, primaries: Sequence[AsyncAdminNode]) -> str | None:
        """The weakest persistence among ``primaries`` (see ``CacheStats.persistence``);
        logs one WARNING per manager when quota limits are in use and it is ``"none"``."""
        found: list[str] = []
        for node in primaries:
            kind = await _node_persistence(node)
            if kind is not None:
                found.append(kind)
        if not found:
            return None
        weakest = min(found, key=_PERSISTENCE_ORDER.index)
        if weakest == "none" and self._quotas_in_use and not self._durability_warned:
            self._durability_warned = True
            logger.warning(
                "quota rate limits (calendar windows, windows of an hour or more) are in "
                "use, but the Redis server keeps no persistence (no AOF, no RDB "
                "snapshots): a restart zeroes their counters. Recommended: appendonly yes, "
                "appendfsync everysec (docs/guides/rate-limits.md, Durability)"
            )
        return weakest

    def reset_stats(self) -> None:
        """Zero the local hit/miss and event counters."""
        self._stats.reset()

    def metrics_snapshot(self) -> MetricsSnapshot:
        """The counters now, for a metrics exporter (``crmcache.metrics``): the same
        counters as :meth:`get_stats`, without asking Redis (no key count, no ``INFO``),
        so a scrape costs microseconds and never waits. Plain (not async) on both facades.
        """
        transport = self._transport
        books = transport.accounting() if transport is not None else None
        breaker = self._breaker
        return MetricsSnapshot(
            key_prefix=self.settings.key_prefix,
            enabled=self.enabled,
            by_kind=self._stats.by_kind(),
            counters=self._stats.counters(),
            rate_limits=self._stats.rate_limits(),
            breaker_state=breaker.state.value,
            breaker_transitions={state.value: n for state, n in breaker.transitions.items()},
            breaker_short_circuited=breaker.short_circuited,
            pool=books,
            max_connections=self.settings.max_connections,
            pending_invalidations=len(self._replayer.pending),
            near_cache=self._near.stats() if self._near is not None else None,
            latency=self._latency.snapshot(),
            pool_wait=snapshot_series(books.wait_time) if books and books.wait_time else None,
        )

    async def _node_stats(self, node: AsyncAdminNode) -> NodeStats:
        """One primary's key count and INFO (each through the breaker), or why not."""
        reasons: list[str] = []

        async def asked(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:  # noqa: ANN401
            try:
                return await fn(*args)
            except Exception as exc:
                reasons.append(self._guard.describe(exc))
                raise

        counted = await self._call("get_cache_stats", asked, self._count_keys, node)
        raw_info = await self._call("get_cache_stats", asked, node.execute, "INFO")
        info = None if raw_info is FAILED else RedisServerStats.from_reply(raw_info)
        error = None
        if counted is FAILED or raw_info is FAILED:
            error = reasons[0] if reasons else "not asked: the circuit breaker is open"
        if counted is FAILED:
            return NodeStats(node.address, None, False, info, error)
        return NodeStats(node.address, counted[0], counted[1], info, error)

    async def _count_keys(self, node: AsyncAdminNode) -> tuple[int, bool]:
        # SCAN in batches (never KEYS): Redis serves other clients between batches. Stop at
        # a time budget on a huge keyspace and say the count is a lower bound.
        deadline = time.monotonic() + SCAN_BUDGET
        cursor, total = b"0", 0
        pattern = self._keys.scan_pattern  # this manager's keys only
        while True:
            reply = await node.execute("SCAN", cursor, "MATCH", pattern, "COUNT", SCAN_COUNT)
            cursor, batch = cast("tuple[bytes, list[bytes]]", reply)
            total += len(batch)
            if cursor == b"0":
                return total, True
            if time.monotonic() > deadline:
                return total, False

    def _pool_stats(self) -> PoolStats:
        transport = self._transport
        if transport is None:
            return PoolStats(self.settings.max_connections, 0, 0, 0)
        # In use = slots held: a slot that leaked would show here, not as a phantom idle.
        books = transport.accounting()
        return PoolStats(
            max_connections=self.settings.max_connections,
            in_use=books.slots_held,
            idle=books.idle,
            created=books.created,
        )
