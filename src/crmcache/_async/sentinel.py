"""The Sentinel transport: the primary of a Sentinel-monitored group
(``redis+sentinel://``, ``rediss+sentinel://``).

The sentinels are asked only where the primary is (redis-py's ``Sentinel.discover_master``);
the data path is the single-node transport's lean pool, whose new connections go to the
primary last discovered (the pools' ``locate`` hook). The primary is asked for again
(at most one discovery in flight, each bounded by the connect timeout and the call's
deadline, never raising to a caller):

* when a node answers ``READONLY``, or a new connection's handshake finds a replica: the
  call is sent once more, on a connection to the primary the sentinels name now;
* after a connection failure or a timeout (the next new connection asks first);
* in the background about once a second while calls are made, so a switch is seen even
  while the former primary still accepts writes (Sentinel demotes it seconds later); the
  same check closes idle connections still open to a former primary.

Each sentinel is given ``socket_connect_timeout / len(sentinels)`` to connect and as long
to answer, and an asyncio discovery is also cut at the connect timeout.

A change is logged once ("primary of <service> is now host:port"), idle connections to the
former primary are closed, and :attr:`on_primary_change` is told (the core replays the
invalidations the former primary may have taken after the switch). Scripts reload on
their own (``NOSCRIPT``).

The URL's password (and username) are the data nodes'; the sentinels are asked without
authentication (over TLS for ``rediss+sentinel://``, with the URL's ``ssl_*`` settings).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisError

from .._config import CacheSettings, sentinel_target
from .._guard import DEFAULT_LOG_INTERVAL, LogThrottle, PoolClosedError, PoolExhaustedError
from .._replies import Check
from .._topology import Topology, classify
from .node import AsyncNodeTransport
from .primitives import Background, Event, spawn, within

__all__ = ["VERIFY_INTERVAL", "AsyncSentinelTransport"]

logger = logging.getLogger("crmcache")

#: Seconds between background checks of the primary while calls are made.
VERIFY_INTERVAL = 1.0
#: Seconds a stale primary is not asked for again (a burst of READONLY asks once).
RETRY_INTERVAL = 0.05
#: The keyword arguments redis-py's ``Redis`` takes (the sentinels' TLS settings).
_REDIS_PARAMETERS = frozenset(inspect.signature(Redis.__init__).parameters)


class AsyncSentinelTransport(AsyncNodeTransport):
    """The primary of a Sentinel group, on the single-node transport's pools.

    Args:
        settings: the manager's settings; ``redis_url`` is a Sentinel URL.
        scrub: removes the password from a message.

    Raises:
        ConfigurationError: the URL cannot be used.
    """

    #: The transport's primary can change under it (see ``AsyncTransport``).
    may_fail_over = True

    def __init__(self, settings: CacheSettings, scrub: Callable[[str], str]) -> None:
        target = sentinel_target(settings.redis_url)
        self.service = target.service
        self._primary: tuple[str, int] | None = None
        self._stale = True
        #: When (monotonic) the sentinels last named the current primary.
        self._verified_at = 0.0
        self._asked_at = -RETRY_INTERVAL
        self._checked_at = 0.0
        self._discovery: Event | None = None
        self._discovery_lock = threading.Lock()
        self._verifier: Background | None = None
        self._changed_since = 0.0
        self._warnings = LogThrottle(DEFAULT_LOG_INTERVAL)
        node = dataclasses.replace(settings, redis_url=target.node_url)
        super().__init__(node, scrub, locate=self._locate)
        self._masked_url = settings.masked_url
        self._scrub = scrub
        self._discovery_timeout = settings.socket_connect_timeout
        # The sentinels are asked one after the other: each gets its share of the
        # connect timeout (for its connect, and again for its reply).
        each = max(0.1, settings.socket_connect_timeout / len(target.sentinels))
        sentinel_kwargs: dict[str, Any] = {
            "socket_timeout": each,
            "socket_connect_timeout": each,
            "retry": Retry(NoBackoff(), 0),
            "client_name": "crmcache-sentinel",
        }
        if target.node_url.startswith("rediss://"):
            sentinel_kwargs["ssl"] = True
            sentinel_kwargs.update(
                (key, value)
                for key, value in self.connection_kwargs.items()
                if key.startswith("ssl_") and key in _REDIS_PARAMETERS
            )
        # redis-py's sync Sentinel is untyped: used through Any.
        sentinel_class: Any = Sentinel
        self._sentinel: Any = sentinel_class(
            list(target.sentinels), sentinel_kwargs=sentinel_kwargs
        )

    @property
    def primary(self) -> tuple[str, int] | None:
        """The primary's ``(host, port)`` as last discovered (None before the first)."""
        return self._primary

    # -- the data path ----------------------------------------------------------------

    async def execute(self, *args: Any, check: Check | None = None) -> Any:  # noqa: ANN401 - a raw Redis reply
        """The lean pool's ``execute`` on the current primary; once more on the primary
        the sentinels name now if the node answered ``READONLY``."""
        return await self._on_primary(super().execute, *args, check=check)

    async def execute_large(self, *args: Any, check: Check | None = None) -> Any:  # noqa: ANN401 - a raw Redis reply
        """:meth:`execute` of a command whose reply may be large (on the pool's own
        connection for them, if it has one)."""
        return await self._on_primary(super().execute_large, *args, check=check)

    async def _on_primary(
        self,
        send: Callable[..., Awaitable[Any]],
        *args: Any,  # noqa: ANN401 - send's
        **kwargs: Any,  # noqa: ANN401 - send's
    ) -> Any:  # noqa: ANN401 - a raw Redis reply
        """``send(*args, **kwargs)`` on the current primary; once more on the primary the
        sentinels name now if the node answered ``READONLY``."""
        now = time.monotonic()
        if now - self._checked_at > VERIFY_INTERVAL and not self._closed:
            self._checked_at = now
            self._verify_soon()
        try:
            return await send(*args, **kwargs)
        except ReadOnlyError:
            self._stale = True
            await self._forget(None)
            return await send(*args, **kwargs)
        except (PoolExhaustedError, PoolClosedError):
            raise
        except (RedisConnectionError, TimeoutError):
            self._stale = True  # the next new connection asks the sentinels first
            raise

    def _learn(self, server: bytes, replication: bytes) -> None:
        """A new connection's INFO: a replica is no primary (the sentinels have not seen
        the switch yet, or the node was demoted): ask again and refuse the connection."""
        if classify(server, replication) is Topology.REPLICA:
            self._stale = True
            raise ReadOnlyError(
                f"{self.address} is a replica, not the primary of {self.service!r} (yet)"
            )
        super()._learn(server, replication)

    # -- discovery --------------------------------------------------------------------

    async def _locate(self, deadline: float) -> tuple[str, int]:
        """Where a new connection goes: the primary, discovered first if unknown or stale.

        Raises:
            redis.exceptions.ConnectionError: no sentinel named a primary (yet).
        """
        if self._stale or self._primary is None:
            await self._rediscover(deadline)
        primary = self._primary
        if primary is None:
            raise RedisConnectionError(
                f"no sentinel named the primary of {self.service!r} (see the log)"
            )
        return primary

    def _verify_soon(self) -> None:
        """Ask the sentinels in the background (at most one such job at a time)."""
        with self._discovery_lock:
            if self._discovery is not None or (
                self._verifier is not None and self._verifier.is_alive()
            ):
                return
            self._verifier = spawn(self._verify, "crmcache-sentinel-verify")

    async def _verify(self) -> None:
        await self._rediscover(time.monotonic() + self._discovery_timeout, force=True)
        primary = self._primary
        if primary is not None and await self._forget(primary):
            # Connections that were in use at the switch went back to the idle list and
            # may have served calls since: what they confirmed is replayed too.
            listener = self.on_primary_change
            if listener is not None:
                listener(self._changed_since)

    async def _rediscover(self, deadline: float, *, force: bool = False) -> None:
        """Ask the sentinels for the primary, or wait (until ``deadline``) for the
        discovery in flight. Never raises a Redis error: a failure is logged."""
        with self._discovery_lock:
            running = self._discovery
            if running is None:
                if (
                    not force
                    and self._primary is not None
                    and time.monotonic() - self._asked_at < RETRY_INTERVAL
                ):
                    return  # asked a moment ago: that answer stands
                mine = self._discovery = Event()
        if running is not None:
            await running.wait(max(0.0, deadline - time.monotonic()))
            return
        running = mine
        try:
            await self._discover(deadline)
        finally:
            with self._discovery_lock:
                self._discovery = None
            running.set()

    async def _discover(self, deadline: float) -> None:
        started = self._asked_at = time.monotonic()
        budget = min(deadline - started, self._discovery_timeout)
        if budget <= 0:
            return  # the caller's deadline passed: it will not connect either
        try:
            async with within(budget):
                host, port = await self._sentinel.discover_master(self.service)
        except Exception as exc:  # noqa: BLE001 - logged; a caller only sees no primary
            suppressed = self._warnings.ready()
            if suppressed is not None:
                logger.warning(
                    "no sentinel of %s named the primary of %r (%d more not logged): %s",
                    self._masked_url,
                    self.service,
                    suppressed,
                    self._scrub(f"{type(exc).__name__}: {exc}"),
                )
            return
        primary = (str(host), int(port))
        previous, since = self._primary, self._verified_at
        self._primary = primary
        self._verified_at = started
        self._stale = False
        if primary == previous:
            return
        self.address = self.admin.address = self.health.address = f"{host}:{port}"
        if previous is None:
            logger.info("primary of %s is now %s:%d", self.service, host, port)
            return
        logger.warning("primary of %s is now %s:%d", self.service, host, port)
        self._changed_since = since
        await self._forget(primary)
        listener = self.on_primary_change
        if listener is not None:
            listener(since)

    async def refresh(self) -> bool:
        """Discover the primary if it is unknown or stale; False if no sentinel named it."""
        try:
            await self._locate(time.monotonic() + self._discovery_timeout)
        except RedisError:
            return False
        return True

    def tracking_connection(self, node: str, *, protocol: int) -> Any:  # noqa: ANN401
        """A connection to the current primary (``node`` may name a former one) for the
        near cache's invalidation listener; the core reconnects it after a switch."""
        conn = super().tracking_connection(node, protocol=protocol)
        primary = self._primary
        if primary is not None:
            conn.host, conn.port = primary
        return conn

    async def _forget(self, primary: tuple[str, int] | None) -> int:
        """Close the idle connections not to ``primary`` (all of them for None); return
        how many were closed."""

        def keep(conn: Any) -> bool:  # noqa: ANN401 - a redis-py connection
            return primary is not None and (conn.host, int(conn.port)) == primary

        dropped = 0
        for pool in (self, self.admin, self.health):
            dropped += await pool.drop_idle(keep)
        return dropped

    async def close(self, grace: float) -> None:
        """Close the pools, wait for a background check, close the sentinel clients."""
        await super().close(grace)
        verifier = self._verifier
        if verifier is not None:
            await verifier.join(timeout=self._discovery_timeout)
        for client in self._sentinel.sentinels:
            await client.aclose()
