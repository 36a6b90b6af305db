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
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from .primitives import FairSlots

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection

    from .._scripts import ScriptLike

__all__ = ["POOL_EXHAUSTED", "AsyncLeanPool"]

#: The message redis-py's BlockingConnectionPool uses when no connection freed up in time.
POOL_EXHAUSTED = "No connection available."


class AsyncLeanPool:
    """At most ``max_connections`` redis-py connections, handed out LIFO.

    Args:
        factory: makes a new (unconnected) redis-py connection.
        max_connections: connections open at most; callers beyond wait.
        timeout: seconds a caller waits for a free connection.
    """

    def __init__(
        self,
        factory: Callable[[], AbstractConnection],
        *,
        max_connections: int,
        timeout: float,
    ) -> None:
        self._factory = factory
        self.max_connections = max_connections
        self._timeout = timeout
        self._slots = FairSlots(max_connections)
        # list.append/list.pop are atomic: the slots bound how many connections exist,
        # the list only holds the idle ones.
        self._idle: list[AbstractConnection] = []
        self._all: list[AbstractConnection] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()

    async def execute(self, *args: Any) -> Any:  # noqa: ANN401 - a raw Redis reply
        """Send one command and return its reply.

        Raises:
            redis.exceptions.ConnectionError: no connection freed up within the timeout
                (message ``"No connection available."``), or Redis could not be reached
                twice in a row.
            redis.exceptions.TimeoutError: no reply within the socket timeout.
            redis.exceptions.ResponseError: Redis answered with an error.
        """
        if os.getpid() != self._pid:
            self._after_fork()
        if not await self._slots.acquire(self._timeout):
            raise RedisConnectionError(POOL_EXHAUSTED)
        try:
            try:
                conn = self._idle.pop()
            except IndexError:
                conn = self._new()
            try:
                return await self._call(conn, args)
            finally:
                self._idle.append(conn)
        finally:
            self._slots.release()

    @staticmethod
    async def _call(conn: AbstractConnection, args: Sequence[Any]) -> Any:  # noqa: ANN401
        try:
            await conn.send_command(*args)
            return await conn.read_response()
        except RedisConnectionError:
            # A connection dropped while idle (Redis restarted, or a proxy closed it):
            # reconnect and try once more, as redis-py's Retry(retries=1) would.
            await conn.disconnect()
            try:
                await conn.send_command(*args)
                return await conn.read_response()
            except BaseException:
                await conn.disconnect()
                raise
        except ResponseError:
            raise  # an error reply was read in full: the connection is clean
        except BaseException:
            # A timeout (or a cancellation) mid-reply leaves unread bytes on the socket:
            # only a clean connection may go back to the pool.
            await conn.disconnect()
            raise

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

    async def disconnect(self) -> None:
        """Close every connection (idle ones at once, busy ones when they next fail)."""
        with self._lock:
            conns = list(self._all)
        for conn in conns:
            await conn.disconnect()
