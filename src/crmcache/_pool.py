"""A lean connection pool for the hot calls, built on redis-py's own ``Connection`` objects.

redis-py 8 spends more time per call in its pool (get/release with observability hooks and
a readiness poll) and its command wrapper (a retry closure per call) than the round trip
itself costs on loopback. The calls crmcache makes on hot paths are simple, so they run
here instead: a LIFO list of idle connections bounded by a semaphore, one send and one read.

What is kept from redis-py: the ``Connection`` class and its settings (TLS, auth, db,
timeouts, client name, periodic health checks), its error types, and its reconnect on
``connect()``. What is re-implemented, with the same meaning: the bounded wait for a free
connection (``ConnectionError("No connection available.")`` after ``timeout``), one retry
on a dropped connection (how a restarted Redis is reconnected), no retry on a timeout,
re-loading a script on ``NOSCRIPT``, and dropping inherited connections after ``fork()``.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

if TYPE_CHECKING:
    from redis.commands.core import Script
    from redis.connection import AbstractConnection

__all__ = ["POOL_EXHAUSTED", "FairSlots", "LeanPool"]

#: The message redis-py's BlockingConnectionPool uses when no connection freed up in time.
POOL_EXHAUSTED = "No connection available."


class FairSlots:
    """A counting semaphore that hands a freed slot to the longest-waiting thread.

    ``threading.Semaphore`` lets the releasing thread take the slot straight back on its
    next call, so under load one waiter can lose that race for its whole timeout (seen
    with 16 threads on 10 connections). Here a waiter queues, and release() passes the
    slot to the head of the queue instead of freeing it.
    """

    def __init__(self, slots: int) -> None:
        self._free = slots
        self._lock = threading.Lock()
        self._waiters: deque[threading.Event] = deque()

    def acquire(self, timeout: float) -> bool:
        """Take a slot, waiting up to ``timeout`` seconds; False if none came free."""
        with self._lock:
            if self._free > 0 and not self._waiters:
                self._free -= 1
                return True
            turn = threading.Event()
            self._waiters.append(turn)
        if turn.wait(timeout):
            return True
        with self._lock:
            try:
                self._waiters.remove(turn)
            except ValueError:
                return True  # handed a slot just as the wait timed out: keep it
            return False

    def release(self) -> None:
        """Give the slot to the first waiter, or free it."""
        with self._lock:
            if self._waiters:
                self._waiters.popleft().set()
            else:
                self._free += 1


class LeanPool:
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
        # list.append/list.pop are atomic under the GIL: the semaphore bounds how many
        # connections exist, the list only holds the idle ones.
        self._idle: list[AbstractConnection] = []
        self._all: list[AbstractConnection] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def execute(self, *args: Any) -> Any:  # noqa: ANN401 - a raw Redis reply
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
        if not self._slots.acquire(timeout=self._timeout):
            raise RedisConnectionError(POOL_EXHAUSTED)
        try:
            try:
                conn = self._idle.pop()
            except IndexError:
                conn = self._new()
            try:
                return self._call(conn, args)
            finally:
                self._idle.append(conn)
        finally:
            self._slots.release()

    @staticmethod
    def _call(conn: AbstractConnection, args: Sequence[Any]) -> Any:  # noqa: ANN401
        try:
            conn.send_command(*args)
            return conn.read_response()
        except RedisConnectionError:
            # A connection dropped while idle (Redis restarted, or a proxy closed it):
            # reconnect and try once more, as redis-py's Retry(retries=1) would.
            conn.disconnect()
            try:
                conn.send_command(*args)
                return conn.read_response()
            except BaseException:
                conn.disconnect()
                raise
        except ResponseError:
            raise  # an error reply was read in full: the connection is clean
        except BaseException:
            # A timeout (or Ctrl-C) mid-reply leaves unread bytes on the socket: only a
            # clean connection may go back to the pool.
            conn.disconnect()
            raise

    def evalsha(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> Any:  # noqa: ANN401
        """Run a registered script by SHA, loading it first if Redis answers ``NOSCRIPT``
        (after a restart or ``SCRIPT FLUSH``)."""
        try:
            return self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            self.execute("SCRIPT", "LOAD", script.script)
            return self.execute("EVALSHA", script.sha, len(keys), *keys, *args)

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

    def disconnect(self) -> None:
        """Close every connection (idle ones at once, busy ones when they next fail)."""
        with self._lock:
            conns = list(self._all)
        for conn in conns:
            conn.disconnect()
