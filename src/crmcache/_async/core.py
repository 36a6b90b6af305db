"""The core under the manager's mixins: state, the transport, the guarded call, lifecycle.

``AsyncCRMCacheManager`` is composed of one mixin per concern (``preferences.py``,
``templates.py``, ``ratelimits.py``, ``leases.py``, ``sendguards.py``, ``health.py``), each a
subclass of :class:`AsyncCacheCore`, as redis-py composes ``Redis`` from its command
mixins: a mixin method is a plain method, so the split costs nothing per call. The core
owns what they share: the settings, the counters, the breaker and its guard, the
transport (every byte goes through it, see ``transport.py``), the near cache with its
listener, and the invalidation replayer; and the one way to call Redis,
:meth:`AsyncCacheCore._call`.
"""

from __future__ import annotations

import functools
import logging
import secrets
import threading
from collections.abc import Awaitable, Callable
from time import perf_counter_ns
from types import TracebackType
from typing import Any, Self

from redis.exceptions import RedisError

from .._config import CacheSettings, is_cluster_url, is_sentinel_url, url_password
from .._guard import (
    DEFAULT_LOG_INTERVAL,
    FAILED,
    Guard,
    LogThrottle,
    PoolClosedError,
    is_topology_moved,
    new_breaker,
    slow_call_threshold,
)
from .._keys import KeySpace, TemplateRef
from .._latency import SUM, LatencyHistograms
from .._near import NearCache
from .._pending import PendingKind
from .._ratelimit import LocalRateLimiter
from .._replies import ProtocolError
from .._stats import Counter, StatsRecorder
from .cluster import AsyncClusterTransport
from .listener import AsyncNearCacheListener
from .node import AsyncNodeTransport
from .primitives import PIPELINING_DEFAULT, Event, finish, multiplexer
from .replay import AsyncInvalidationReplayer
from .sentinel import AsyncSentinelTransport
from .transport import AsyncTransport

__all__ = ["AsyncCacheCore", "open_transport"]

logger = logging.getLogger("crmcache")


def open_transport(settings: CacheSettings, scrub: Callable[[str], str]) -> AsyncTransport:
    """The transport for ``settings.redis_url``, chosen by its scheme, with its data path
    on the lean pool or, when pipelining, on shared auto-pipelined connections.

    Raises:
        ConfigurationError: the URL cannot be used.
    """
    pipelining = PIPELINING_DEFAULT if settings.pipelining is None else settings.pipelining
    mux = multiplexer() if pipelining else None
    url = settings.redis_url
    if is_cluster_url(url):
        if mux is None:
            return AsyncClusterTransport(settings, scrub)
        # One set of shared connections per primary (a duck-typed cluster node pool).
        node_pool = functools.partial(
            mux.AsyncMuxClusterNodePool, connections=settings.pipeline_connections
        )
        return AsyncClusterTransport(settings, scrub, node_pool=node_pool)
    if is_sentinel_url(url):
        if mux is not None:
            return mux.AsyncMuxSentinelTransport(settings, scrub)  # type: ignore[no-any-return]
        return AsyncSentinelTransport(settings, scrub)
    # redis://, rediss:// and unix:// (validated by the settings) name one node.
    if mux is not None:
        return mux.AsyncMuxNodeTransport(settings, scrub)  # type: ignore[no-any-return]
    return AsyncNodeTransport(settings, scrub)


class AsyncCacheCore:
    """What every concern of the manager shares (see the module docstring)."""

    #: True once a quota limit (a calendar window, or a window of an hour or more) was
    #: used: health checks and stats then say whether the server persists its counters.
    _quotas_in_use: bool = False

    def __init__(self, settings: CacheSettings) -> None:
        self.settings = s = settings
        self._ttl_ms = s.cache_ttl * 1000
        self._tombstone_ms = s.tombstone_ttl * 1000
        self._max_id = s.max_id_length
        #: Every key and pattern, under ``key_prefix``; the hot paths read its strings
        #: from plain attributes.
        self._keys = keys = KeySpace(s.key_prefix)
        self._prefs_prefix = keys.prefs_prefix
        self._template_prefix = keys.template_prefix
        #: Template pairs validated before, and their keys (_keys.template_keys).
        self._template_keys: dict[TemplateRef, str] = {}
        self._stats = StatsRecorder()
        #: Per-operation latency of Redis calls, recorded only once enabled.
        self._latency = LatencyHistograms()
        self._latency_series = self._latency.series
        if s.metrics_latency:
            self._enable_latency()  # before the replayer takes ``_call``
        self._closed = False
        self._close_lock = threading.Lock()
        self._stopping = Event()
        self._breaker = new_breaker(s.breaker_failures, s.breaker_max_backoff)
        self._guard = Guard(
            breaker=self._breaker,
            on_error=self._count_error,
            secret=url_password(s.redis_url),
            on_recovered=self._recovered,
            slow_call=slow_call_threshold(s.socket_timeout),
        )
        self._local_limiter = LocalRateLimiter(s.rate_limit_local_share)
        #: Throttles the warning about impossible rate-limit replies.
        self._corrupt_reply_log = LogThrottle(DEFAULT_LOG_INTERVAL)
        self._rate_limit_keys: dict[tuple[str, int], str] = {}
        #: The value of this manager's send claims (``release_send`` deletes only those),
        #: and the throttle of the warning about claims answered without Redis.
        self._send_token = secrets.token_hex(16).encode()
        self._send_guard_log = LogThrottle(DEFAULT_LOG_INTERVAL)
        self._transport: AsyncTransport | None = (
            open_transport(s, self._guard.scrub) if s.enabled else None
        )
        self._replayer = AsyncInvalidationReplayer(
            self._transport,
            call=self._call,
            stats=self._stats,
            settings=s,
            keys=keys,
            stopping=self._stopping,
            forget=self._near_forget,
        )
        if self._transport is not None and self._transport.may_fail_over:
            self._replayer.remember_confirmed()
            self._transport.on_primary_change = self._primary_changed
        self._near: NearCache | None = None
        self._listener: AsyncNearCacheListener | None = None
        if s.near_cache and self._transport is not None:
            self._near = NearCache(s.near_cache_size, s.near_cache_ttl)
            self._listener = AsyncNearCacheListener(
                self._near,
                self._transport,
                protocol=s.near_cache_protocol,
                tracked_prefixes=keys.tracked_prefixes,
                stopping=self._stopping,
                scrub=self._guard.scrub,
            )

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """True if the cache is on (and the manager not closed)."""
        return self.settings.enabled and not self._closed

    async def aclose(self) -> None:
        """Close the manager. Idempotent; later calls behave as disabled.

        Background work stops, a last replay sends the invalidations still pending, and
        calls in flight keep their connection for up to ``socket_timeout`` to read their
        reply. Safe to cancel: the connections are closed all the same (only the last
        replay may then be skipped, which is logged with the number lost).
        """
        with self._close_lock:
            if self._stopping.is_set():
                return  # closed, or being closed by another task or thread
            self._stopping.set()
        replayer = self._replayer
        try:
            wait = self.settings.socket_timeout + 1
            await replayer.stop(wait)
            if self._listener is not None:
                await self._listener.stop(wait)
            if replayer.pending and self._transport is not None:
                # A last attempt: these are the invalidations that would otherwise be lost.
                await replayer.replay_once()
        finally:
            with self._close_lock:
                self._closed = True
            replayer.report_lost()
            transport = self._transport
            if transport is not None:
                await finish(lambda: transport.close(self.settings.socket_timeout))
        logger.info("crmcache closed: url=%s", self.settings.masked_url)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("enabled" if self.settings.enabled else "disabled")
        return f"<CRMCacheManager url={self.settings.masked_url!r} {state}>"

    # -- the guarded call ----------------------------------------------------------------

    def _active(self) -> AsyncTransport | None:
        """The transport, or None when the cache is disabled or closed."""
        if self._closed:
            return None
        return self._transport

    async def _call(self, op: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:  # noqa: ANN401
        """Run one Redis call under the circuit breaker.

        Returns:
            ``fn``'s result, or ``FAILED`` when the breaker is open or ``fn`` raised
            (counted and logged by the guard, never re-raised); a cancellation or an
            interrupt is re-raised.
        """
        guard = self._guard
        token = guard.begin()
        if token is None:
            return FAILED
        try:
            result = await fn(*args)
        except BaseException as exc:  # noqa: BLE001 - degraded or re-raised by _degraded
            return self._degraded(op, exc)
        guard.succeeded(token)
        return result

    async def _timed_call(self, op: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:  # noqa: ANN401
        """:meth:`_call`, timed into the operation's latency histogram: what ``_call`` is
        on a manager with latency metrics on (:meth:`_enable_latency`), so a manager
        without them pays nothing. Short-circuited calls are not timed."""
        guard = self._guard
        token = guard.begin()
        if token is None:
            return FAILED
        start = perf_counter_ns()
        try:
            result = await fn(*args)
        except BaseException as exc:  # noqa: BLE001 - degraded or re-raised by _degraded
            self._latency.record(op, perf_counter_ns() - start)
            return self._degraded(op, exc)
        ns = perf_counter_ns() - start
        # crmcache._latency.record, inlined: a dict lookup and two list increments.
        try:
            series = self._latency_series[op]
        except KeyError:
            series = self._latency.add(op)
        series[ns.bit_length()] += 1
        series[SUM] += ns
        guard.succeeded(token)
        return result

    def _degraded(self, op: str, exc: BaseException) -> Any:  # noqa: ANN401
        """What a call that raised ``exc`` returns: ``FAILED`` (counted and logged by the
        guard); a cancellation or an interrupt is re-raised."""
        guard = self._guard
        if isinstance(exc, PoolClosedError):
            guard.abandoned()  # the manager is closing: not an outage
        elif isinstance(exc, RedisError | OSError):
            guard.failed(op, exc)
        elif isinstance(exc, Exception):
            guard.unexpected(op, exc)  # degraded, counted and logged by the guard
        else:
            # Cancelled or interrupted: never swallowed, but a half-open probe must not
            # stay taken by a call that will never report back.
            guard.abandoned()
            self._stats.count(Counter.CANCELLED)
            raise exc
        return FAILED

    def _enable_latency(self) -> None:
        """Time every Redis call from now on, per operation (``metrics_latency``)."""
        self._call = self._timed_call  # type: ignore[method-assign]

    def _count_error(self, op: str, exc: BaseException) -> None:
        if is_topology_moved(exc):
            self._stats.count(Counter.TOPOLOGY_ERRORS)
        elif isinstance(exc, ProtocolError):
            self._stats.count(Counter.PROTOCOL_ERRORS)
        elif isinstance(exc, RedisError | OSError):
            self._stats.count(Counter.REDIS_ERRORS)
        else:
            self._stats.count(Counter.UNEXPECTED_ERRORS)

    def _recovered(self) -> None:
        """Redis answers again: send what it missed."""
        self._replayer.start()

    def _primary_changed(self, since: float) -> None:
        """The primary changed (failover): the former one may have confirmed
        invalidations since ``since`` that the new one never got; send them again."""
        self._replayer.requeue_confirmed(since)
        if self._listener is not None:
            self._listener.reconnect()

    # -- shared by the concerns -------------------------------------------------------

    def _near_forget(self, *keys: str) -> None:
        """Drop keys this process is about to write (and has written) from the near cache:
        it reads its own writes at once, and a read in flight cannot put the old value
        back."""
        if self._near is not None:
            self._near.invalidate(keys)

    def _start_listener(self) -> None:
        """The near cache is not live: start (or restart) its listener. Called only then,
        so a live near cache costs its hits one attribute read."""
        if self._listener is not None:
            self._listener.ensure()

    async def _invalidate(
        self,
        op: str,
        kind: PendingKind,
        key: str,
        version: int | None,
        fn: Callable[..., Awaitable[Any]],
        *args: Any,  # noqa: ANN401 - fn's arguments
    ) -> bool:
        """Send one invalidation and record how it ended: confirmed (True), failed (False,
        queued for the replay) or cancelled (re-raised, queued for the replay: Redis may
        or may not have it). The near cache forgets the key before and after."""
        self._near_forget(key)
        try:
            reply = await self._call(op, fn, *args)
        except BaseException:
            self._replayer.deferred(kind, key, version)
            raise
        self._near_forget(key)
        if reply is FAILED:
            self._replayer.failed(kind, key, version)
            return False
        self._replayer.confirmed(kind, key, version)
        self._stats.count(Counter.INVALIDATIONS)
        logger.debug("invalidated %s (reply %s)", key, reply)
        return True

    def _defer_invalidation(self, kind: PendingKind, key: str, version: int | None) -> None:
        """Queue an invalidation whose caller was cancelled before Redis confirmed it."""
        self._replayer.deferred(kind, key, version)

    async def _evict(self, key: str, raw: bytes | None, reason: str) -> None:
        """Delete a value that failed to decode (only if unchanged) and count it."""
        self._near_forget(key)
        self._stats.count(Counter.CORRUPT_VALUES)
        self._stats.count(Counter.DECODE_ERRORS_EVICTED)
        logger.warning("undecodable value at %s (%s): deleted, treated as a miss", key, reason)
        transport = self._active()
        if transport is not None:
            args = ["wrongtype", b""] if raw is None else ["value", raw]
            await self._call(
                "evict", transport.evalsha, transport.scripts.delete_if_equals, [key], args
            )
