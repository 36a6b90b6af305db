"""A lean connection pool for the hot calls, built on redis-py's own connection objects.

redis-py 8 spends more time per call in its pool (get/release with observability hooks and
a readiness poll) and its command wrapper (a retry closure per call) than the round trip
itself costs on loopback. The calls crmcache makes on hot paths are simple, so they run
here instead: a LIFO list of idle connections bounded by fair slots, one send, one read.

What is kept from redis-py: the connection class and its settings (TLS, auth, db,
timeouts, client name, periodic health checks), its error types, and its reconnect on
``connect()``. What is re-implemented, with the same meaning: the bounded wait for a free
connection (``ConnectionError("No connection available.")`` after ``timeout``), one retry
on a dropped connection (how a restarted Redis is reconnected), no retry on a timeout,
re-loading a script on ``NOSCRIPT``, and dropping inherited connections after ``fork()``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from .._guard import PoolClosedError, PoolExhaustedError
from .._stats import PoolAccounting
from .primitives import FairSlots, sleep

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection

    from .._scripts import ScriptLike

__all__ = ["AsyncLeanPool"]

#: Seconds between checks for calls still in flight while the pool closes.
_DRAIN_POLL = 0.005


class AsyncLeanPool:
    """At most ``max_connections`` redis-py connections, handed out LIFO.

    Cancellation-safe (and, in the sync twin, safe against ``KeyboardInterrupt``): a call
    that ends in any way but a complete reply never returns its connection to the pool.
    The connection is closed instead, because a reply may still be on its way and would
    be read by the next caller (the bug behind CVE-2023-28858/28859 in redis-py's asyncio
    client). The call's slot is always given back; a caller cancelled while it waits for a
    slot takes none.

    Args:
        factory: makes a new (unconnected) redis-py connection.
        max_connections: connections open at most; callers beyond wait.
        timeout: seconds a caller waits for a free connection.
        retry_dropped: send once more on a fresh connection when the first attempt finds
            the connection dropped (how a restarted Redis is reconnected).
        address: the node's ``host:port`` (or socket path), for logs and stats.
    """

    def __init__(
        self,
        factory: Callable[[], AbstractConnection],
        *,
        max_connections: int,
        timeout: float,
        retry_dropped: bool = True,
        address: str = "",
    ) -> None:
        self.address = address
        self._factory = factory
        self._retry_dropped = retry_dropped
        self.max_connections = max_connections
        self._timeout = timeout
        self._slots = FairSlots(max_connections)
        # list.append/list.pop are atomic: the slots bound how many connections exist,
        # the list only holds the idle ones.
        self._idle: list[AbstractConnection] = []
        self._all: list[AbstractConnection] = []
        self._discarded = 0
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._closed = False

    async def execute(self, *args: Any) -> Any:  # noqa: ANN401 - a raw Redis reply
        """Send one command and return its reply.

        Raises:
            PoolExhaustedError: no connection freed up within the timeout (a
                ``redis.exceptions.ConnectionError``, message ``"No connection available."``).
            PoolClosedError: the pool is closed.
            redis.exceptions.ConnectionError: Redis could not be reached twice in a row.
            redis.exceptions.TimeoutError: no reply within the socket timeout.
            redis.exceptions.ResponseError: Redis answered with an error.
        """
        if os.getpid() != self._pid:
            self._after_fork()
        if self._closed:
            raise PoolClosedError
        if not await self._slots.acquire(self._timeout):
            raise PoolExhaustedError
        try:
            if self._closed:
                raise PoolClosedError  # closed while this call waited for its slot
            # list.pop/list.append are atomic: the slots bound how many connections
            # exist, the list holds the idle ones.
            try:
                conn = self._idle.pop()
            except IndexError:
                conn = self._new()
            refusal: ResponseError | None = None
            try:
                reply = await self._call(conn, args)
            except ResponseError as exc:
                refusal = exc  # an error reply was read in full: the stream is in step
            except BaseException:
                # A timeout, a dropped connection, a cancellation or an interrupt: a reply
                # may still be on its way, so this connection is never used again.
                await self._discard(conn)
                raise
            if self._closed:
                await self._drop(conn)  # this call was its connection's last user
            else:
                self._idle.append(conn)
            if refusal is not None:
                raise refusal
            return reply
        finally:
            self._slots.release()

    async def _call(self, conn: AbstractConnection, args: Sequence[Any]) -> Any:  # noqa: ANN401
        try:
            await conn.send_command(*args)
            return await conn.read_response()
        except RedisConnectionError:
            if self._closed or not self._retry_dropped:
                raise
            # A connection dropped while idle (Redis restarted, or a proxy closed it):
            # reconnect and try once more, as redis-py's Retry(retries=1) would.
            await conn.disconnect(nowait=True)
            await conn.send_command(*args)
            return await conn.read_response()

    async def evalsha(self, script: ScriptLike, keys: Sequence[Any], args: Sequence[Any]) -> Any:  # noqa: ANN401
        """Run a registered script by SHA, loading it first if Redis answers ``NOSCRIPT``
        (after a restart or ``SCRIPT FLUSH``)."""
        try:
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.execute("SCRIPT", "LOAD", script.script)
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)

    def _new(self) -> AbstractConnection:
        conn = self._factory()
        with self._lock:
            self._all.append(conn)
        return conn

    async def _discard(self, conn: AbstractConnection) -> None:
        with self._lock:
            self._discarded += 1
        await self._drop(conn)

    async def _drop(self, conn: AbstractConnection) -> None:
        with self._lock:
            if conn in self._all:
                self._all.remove(conn)
        # nowait: the socket is closed without a suspension point, so a second
        # cancellation cannot leave it half closed.
        await conn.disconnect(nowait=True)

    def _after_fork(self) -> None:
        # The parent's sockets belong to the parent: forget them without closing them.
        with self._lock:
            if os.getpid() == self._pid:
                return
            self._idle = []
            self._all = []
            self._slots = FairSlots(self.max_connections)
            self._pid = os.getpid()

    def counts(self) -> tuple[int, int]:
        """``(created, idle)`` connections right now."""
        with self._lock:
            return len(self._all), len(self._idle)

    def accounting(self) -> PoolAccounting:
        """Where every slot and connection is (see :class:`PoolAccounting`)."""
        slots = self._slots
        with self._lock:
            created, idle = len(self._all), len(self._idle)
            return PoolAccounting(
                slots_held=slots.held,
                checked_out=created - idle,
                idle=idle,
                created=created,
                waiting=slots.waiting,
                waits=slots.waits,
                timeouts=slots.timeouts,
                discarded=self._discarded,
            )

    async def close(self, grace: float) -> None:
        """Close the pool: new calls fail at once with :class:`PoolClosedError`, idle
        connections close now, and calls in flight keep their connection for up to
        ``grace`` seconds to read their reply; whatever is still open then is closed."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            await self._drop(conn)
        deadline = time.monotonic() + grace
        while len(self._all) > len(self._idle) and time.monotonic() < deadline:
            await sleep(_DRAIN_POLL)  # shutdown only: a poll is simpler than a wake-up
        with self._lock:
            left, self._all, self._idle = self._all, [], []
        for conn in left:
            # A call still waiting on one of these sees a ConnectionError (not retried on a
            # closed pool) and degrades.
            await conn.disconnect(nowait=True)
