"""Invalidations Redis never confirmed, replayed until it does (off the hot path).

An invalidation that fails (Redis away) or whose caller was cancelled before Redis
confirmed it is recorded in :class:`~crmcache._pending.PendingInvalidations`; a background
task (a thread in the sync facade) sends them again with backoff until none is left, and
the core starts it again whenever Redis recovers. Sending one twice is harmless: a
tombstone keeps the higher version.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, cast

from .._config import CacheSettings
from .._guard import FAILED, LogThrottle
from .._keys import KeySpace
from .._pending import REPLAY_FIRST_DELAY, REPLAY_MAX_DELAY, PendingInvalidations, PendingKind
from .._stats import SCAN_COUNT, Counter, StatsRecorder
from .primitives import Background, Event, spawn
from .transport import AsyncAdminNode, AsyncTransport

__all__ = ["AsyncInvalidationReplayer"]

logger = logging.getLogger("crmcache")

#: Seconds between two "could not invalidate" warnings during an outage.
_WARNING_INTERVAL = 30.0
#: Confirmed invalidations remembered for a failover (the newest), and the seconds
#: before the sentinels' last word on the primary that count as "maybe not replicated".
_REMEMBERED = 10_000
REPLICATION_MARGIN = 1.0


class AsyncInvalidationReplayer:
    """Records invalidations Redis did not confirm and replays them in the background.

    Args:
        transport: where to send them; None when the cache is disabled.
        call: the core's guarded call (breaker, logging, degradation).
        stats: the manager's counters.
        settings: the manager's settings (tombstone TTL, cache TTL).
        keys: the manager's key space (whose preferences an overflow shortens).
        stopping: set when the manager closes; the replay then stops.
        forget: drops keys from the near cache.
    """

    def __init__(
        self,
        transport: AsyncTransport | None,
        *,
        call: Callable[..., Awaitable[Any]],
        stats: StatsRecorder,
        settings: CacheSettings,
        keys: KeySpace,
        stopping: Event,
        forget: Callable[..., None],
    ) -> None:
        self.pending = PendingInvalidations()
        self._transport = transport
        self._call = call
        self._stats = stats
        self._settings = settings
        self._tombstone_ms = settings.tombstone_ttl * 1000
        self._prefs_pattern = keys.prefs_scan_pattern
        self._stopping = stopping
        self._forget = forget
        self._lock = threading.Lock()
        self._task: Background | None = None
        self._warnings = LogThrottle(_WARNING_INTERVAL)
        self._unservable = LogThrottle(REPLAY_MAX_DELAY * 10)
        self._recent: deque[tuple[float, PendingKind, str, int | None]] | None = None
        self._recent_lock = threading.Lock()

    def remember_confirmed(self) -> None:
        """Keep the newest confirmed invalidations (for :meth:`requeue_confirmed`): the
        transport's primary can change, and the former one may have confirmed writes
        the new one never got."""
        self._recent = deque(maxlen=_REMEMBERED)

    def requeue_confirmed(self, since: float) -> None:
        """The primary changed: replay the invalidations confirmed since ``since`` (less
        :data:`REPLICATION_MARGIN`), which the former primary may have taken alone."""
        recent = self._recent
        if recent is None:
            return
        cutoff = since - REPLICATION_MARGIN
        with self._recent_lock:
            entries = list(recent)
        if len(entries) == recent.maxlen and entries[0][0] >= cutoff:
            # Older ones in the window were forgotten: shorten every cached preference.
            self.pending.overflow()
            logger.error(
                "primary changed after more than %d invalidations in %.1fs: the TTL of "
                "every cached preference is shortened; templates invalidated then may "
                "stay stale",
                len(entries),
                time.monotonic() - cutoff,
            )
        count = 0
        for confirmed_at, kind, key, version in entries:
            if confirmed_at >= cutoff:
                self.pending.add(kind, key, version)
                count += 1
        if count:
            logger.info("primary changed: replaying %d recent invalidation(s)", count)
        self.start()

    def failed(self, kind: PendingKind, key: str, version: int | None) -> None:
        """Count, log (throttled) and remember an invalidation Redis refused or missed."""
        self._stats.count(Counter.INVALIDATIONS_FAILED)
        if not self.pending.add(kind, key, version) and kind is PendingKind.TEMPLATE:
            logger.error("invalidation of %s lost: too many pending while Redis is away", key)
        # A lost invalidation can leave a stale value for up to its TTL: say so, but do not
        # write one line per call during an outage.
        suppressed = self._warnings.ready()
        if suppressed is not None:
            logger.warning(
                "could not invalidate %s: Redis unavailable; will retry when it is back "
                "(%d more not logged)",
                key,
                suppressed,
            )
        self.start()

    def deferred(self, kind: PendingKind, key: str, version: int | None) -> None:
        """Queue an invalidation whose caller was cancelled (or interrupted) before Redis
        confirmed it: Redis may or may not have it, so the replay sends it (again).
        Sending it twice is harmless (a tombstone keeps the higher version); losing it
        could serve a stale value for up to its TTL."""
        self._forget(key)
        if self._stopping.is_set():
            return
        self.pending.add(kind, key, version)
        logger.debug("invalidation of %s interrupted; queued for replay", key)
        self.start()

    def confirmed(self, kind: PendingKind, key: str, version: int | None) -> None:
        """Redis confirmed an invalidation of ``key``: nothing older needs replaying."""
        self.pending.discard(key)
        recent = self._recent
        if recent is not None:
            with self._recent_lock:
                recent.append((time.monotonic(), kind, key, version))

    def start(self) -> None:
        """Run the replay in the background if invalidations are pending and none runs."""
        if not self.pending or self._stopping.is_set():
            return
        with self._lock:
            if self._task is not None and self._task.is_alive():
                return
            self._task = spawn(self._loop, "crmcache-invalidation-replay")

    @property
    def task(self) -> Background | None:
        """The background replay, if one was started."""
        return self._task

    async def stop(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the background replay to end (the manager
        sets ``stopping`` first, which ends its wait between tries)."""
        task = self._task
        if task is not None:
            await task.join(timeout=timeout)

    def report_lost(self) -> None:
        """At close: log what Redis never received (the last replay could not send it)."""
        if self.pending:
            logger.error(
                "closing with %d invalidation(s) Redis never received: the affected "
                "preferences may stay stale for up to %ds",
                len(self.pending),
                self._settings.cache_ttl,
            )

    async def _loop(self) -> None:
        delay = REPLAY_FIRST_DELAY
        while not await self._stopping.wait(delay):
            if await self.replay_once():
                return
            delay = min(delay * 2, REPLAY_MAX_DELAY)

    async def replay_once(self) -> bool:
        """Send every pending invalidation; True when none is left."""
        transport = self._transport
        if transport is None:
            return True
        if not transport.topology.servable:
            # Every send would be refused (a replica's READONLY, a Sentinel's unknown
            # command): keep them, say so (the topology itself was logged at ERROR).
            suppressed = self._unservable.ready()
            if suppressed is not None:
                logger.error(
                    "%d invalidation(s) cannot be replayed: redis_url points at a %s; they "
                    "are kept (up to the cap) until it points at what serves the keys",
                    len(self.pending),
                    transport.topology.value,
                )
            return False
        scripts = transport.scripts
        failed = False
        started = time.monotonic()
        replayed = 0
        for entry in self.pending.snapshot():
            if entry.kind is PendingKind.PREFERENCES:
                args = ["" if entry.version is None else entry.version, self._tombstone_ms]
                reply = await self._call(
                    "replay_invalidation",
                    transport.evalsha,
                    scripts.prefs_invalidate,
                    [entry.key],
                    args,
                )
            else:
                reply = await self._call(
                    "replay_invalidation", transport.execute, "DEL", entry.key
                )
            if reply is FAILED:
                # On a cluster, another primary may answer: try every entry each round
                # (on one node an outage opens the breaker, and the rest fail in µs).
                failed = True
                continue
            self.pending.done(entry)
            self._stats.count(Counter.INVALIDATIONS_REPLAYED)
            replayed += 1
            logger.debug("replayed invalidation of %s", entry.key)
        if replayed:
            # One line per run, not per key: an outage can leave thousands pending.
            logger.info(
                "replayed %d invalidation(s) in %.3fs (%d still pending)",
                replayed,
                time.monotonic() - started,
                len(self.pending),
            )
        if failed:
            return False
        if self.pending.prefs_overflowed:
            shortened = 0
            for node in transport.primaries():
                count = await self._call("replay_invalidation", self._shorten_all, node)
                if count is FAILED:
                    return False
                shortened += count
            self.pending.clear_overflow()
            logger.warning(
                "too many invalidations were pending: shortened the TTL of %d cached "
                "preferences to %ds",
                shortened,
                self._settings.tombstone_ttl,
            )
        return not self.pending

    async def _shorten_all(self, node: AsyncAdminNode) -> int:
        count, cursor = 0, b"0"
        while True:
            reply = await node.execute(
                "SCAN", cursor, "MATCH", self._prefs_pattern, "COUNT", SCAN_COUNT
            )
            cursor, batch = cast("tuple[bytes, list[bytes]]", reply)
            for key in batch:
                # PEXPIRE ... LT would be exact but needs Redis 7; a longer TTL is only
                # shortened to the tombstone TTL, a shorter one lengthened to it at most.
                await node.execute("PEXPIRE", key, self._tombstone_ms)
                count += 1
            if cursor == b"0":
                return count
