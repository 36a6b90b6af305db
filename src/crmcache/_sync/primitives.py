"""Concurrency primitives of the sync facade (twin: ``crmcache/_async/primitives.py``).

The two files offer the same names with the same meaning; generated code imports them
and never touches ``asyncio`` or ``threading`` for these purposes directly.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from time import perf_counter_ns
from types import ModuleType
from typing import Any, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._latency import new_series, record

T = TypeVar("T")

__all__ = [
    "PIPELINING_DEFAULT",
    "Background",
    "Event",
    "FairSlots",
    "connected",
    "dirty",
    "finish",
    "multiplexer",
    "receive",
    "send",
    "sleep",
    "spawn",
    "within",
]


class Event:
    """An event whose ``wait`` takes a timeout and says whether it was set."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        """Set the event, waking every waiter."""
        self._event.set()

    def is_set(self) -> bool:
        """True once set."""
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds; True if the event is set."""
        return self._event.wait(timeout)


class FairSlots:
    """A counting semaphore that hands a freed slot to the longest-waiting thread.

    ``threading.Semaphore`` lets the releasing thread take the slot straight back on its
    next call, so under load one waiter can lose that race for its whole timeout (seen
    with 16 threads on 10 connections). Here a waiter queues, and release() passes the
    slot to the head of the queue instead of freeing it.

    Interrupt-safe: a thread that a ``KeyboardInterrupt`` (or any exception) stops while it
    waits takes no slot, and passes on one handed to it as the interrupt came.
    """

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._free = slots
        self._lock = threading.Lock()
        # A waiter's event is set when a slot is handed to it; handing it over also takes
        # the waiter off the queue, so "still queued" means "no slot".
        self._waiters: deque[threading.Event] = deque()
        #: Acquisitions that had to queue, and those that gave up at their timeout.
        self.waits = 0
        self.timeouts = 0
        #: How long those waited (``crmcache._latency`` series; interrupted waits left out).
        self.wait_time = new_series()
        #: Slots given back (calls done): how a caller that gave up tells a pool too
        #: small for its load (slots came free, too few) from calls stuck on the server
        #: (none did).
        self.released = 0

    def acquire(self, timeout: float) -> bool:
        """Take a slot, waiting up to ``timeout`` seconds; False if none came free."""
        with self._lock:
            if self._free > 0 and not self._waiters:
                self._free -= 1
                return True
            turn = threading.Event()
            self._waiters.append(turn)
            self.waits += 1
        started = perf_counter_ns()
        try:
            got = turn.wait(timeout)
        except BaseException:
            if not self._withdraw(turn):
                self.release()  # handed a slot as the interrupt came: pass it on
            raise
        waited = perf_counter_ns() - started
        with self._lock:
            record(self.wait_time, waited)
        if got:
            return True
        if self._withdraw(turn):
            with self._lock:
                self.timeouts += 1
            return False
        return True  # handed a slot just as the wait timed out: keep it

    def _withdraw(self, turn: threading.Event) -> bool:
        """Take ``turn`` off the queue; False if it was already handed a slot."""
        with self._lock:
            try:
                self._waiters.remove(turn)
            except ValueError:
                return False
            return True

    def release(self) -> None:
        """Give the slot to the first waiter, or free it."""
        with self._lock:
            self.released += 1
            if self._waiters:
                self._waiters.popleft().set()
            else:
                self._free += 1

    @property
    def held(self) -> int:
        """Slots taken (by callers, or handed to a waiter that has yet to resume)."""
        with self._lock:
            return self.slots - self._free

    @property
    def waiting(self) -> int:
        """How many callers wait for a slot."""
        with self._lock:
            return len(self._waiters)


class Background:
    """A background job started by :func:`spawn`."""

    def __init__(self, thread: threading.Thread) -> None:
        self._thread = thread

    def is_alive(self) -> bool:
        """True while the job runs."""
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the job to end."""
        self._thread.join(timeout)

    def cancel(self) -> None:
        """Threads cannot be cancelled: jobs stop when they see the manager stopping."""


def spawn(job: Callable[[], None], name: str) -> Background:
    """Run ``job()`` in the background (a daemon thread)."""
    thread = threading.Thread(target=job, name=name, daemon=True)
    thread.start()
    return Background(thread)


def sleep(seconds: float) -> None:
    """Sleep (blocks the calling thread)."""
    time.sleep(seconds)


def finish(work: Callable[[], T]) -> T:
    """Run ``work()`` (the sync twin of the async ``finish``, which shields it from
    cancellation)."""
    return work()


# -- the wire: one call's bytes on a redis-py connection, under one deadline ---------------
# The lean pool sends and reads itself (see pool.py) so that a call has one deadline over
# its handshake, every write, every read and its retry: before each send and each receive
# the socket's timeout is set to the time left, so a reply dripped byte by byte cannot
# stretch the call (a per-recv timeout would restart with every byte).


def within(seconds: float) -> contextlib.AbstractContextManager[object]:
    """The scope of one call (the deadline is enforced by each send and receive)."""
    return contextlib.nullcontext()


def connected(conn: Any) -> bool:  # noqa: ANN401 - a redis-py connection
    """True if ``conn`` has a live socket."""
    return conn._sock is not None


#: Seconds a socket operation may overrun the call's deadline rather than pay a system
#: call to set the socket's timeout to the exact time left.
_TIMEOUT_TOLERANCE = 0.01


def _arm(sock: socket.socket, deadline: float, usual: float | None) -> None:
    """Bound the next socket operation by the time left. Setting a timeout costs a
    system call, so the socket keeps the connection's usual timeout while more than that
    is left, and gets the time left only near the deadline."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise RedisTimeoutError("Timeout: the call's deadline passed")
    # A call's deadline is its start plus the usual timeout, so at the first send and
    # read the time left is a hair under it: within the tolerance, keep the usual one.
    if usual is not None and left >= usual - _TIMEOUT_TOLERANCE:
        if sock.gettimeout() != usual:
            sock.settimeout(usual)
    else:
        sock.settimeout(left)


def send(conn: Any, chunks: list[bytes], deadline: float) -> None:  # noqa: ANN401
    """Write one packed command before ``deadline``."""
    sock = conn._sock
    if sock is None:
        raise RedisConnectionError("Connection closed.")
    try:
        _arm(sock, deadline, conn.socket_timeout)
        for chunk in chunks:
            sock.sendall(chunk)
    except TimeoutError:
        raise RedisTimeoutError("Timeout writing to socket") from None
    except OSError as exc:
        raise RedisConnectionError(f"Error while writing to socket: {exc}") from None


def receive(conn: Any, deadline: float) -> bytes:  # noqa: ANN401
    """Read what has arrived on ``conn`` (at least one byte) before ``deadline``, as
    bytes (the screens search them faster than a view of the parser's buffer).

    Raises:
        redis.exceptions.TimeoutError: nothing arrived before the deadline.
        redis.exceptions.ConnectionError: the server closed the connection.
    """
    parser = conn._parser
    sock = parser._sock
    if sock is None:
        raise RedisConnectionError("Connection closed.")
    try:
        _arm(sock, deadline, conn.socket_timeout)
        chunk: bytes = sock.recv(len(parser._buffer))
    except TimeoutError:
        raise RedisTimeoutError("Timeout reading from socket") from None
    except OSError as exc:
        raise RedisConnectionError(f"Error while reading from socket: {exc}") from None
    if not chunk:
        raise RedisConnectionError("Connection closed by server.")
    return chunk


def dirty(conn: Any) -> bool:  # noqa: ANN401
    """True if an open idle connection holds bytes nobody asked for (an unrequested reply,
    or the end of the stream): it must not be reused, or every later read would be
    shifted. False for a connection that is not open."""
    sock = conn._sock
    if sock is None:
        return False
    parser = conn._parser
    if parser._reader.has_data():
        return True
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


# -- auto-pipelining (opt-in for threads) ----------------------------------------------

#: Threads keep the lean pool unless asked: shared connections win from 4 threads on but
#: lose a little for one (docs/guides/pipelining.md, "Pipelining for threads").
PIPELINING_DEFAULT = False


def multiplexer() -> ModuleType:
    """The auto-pipelining transports for threads (``crmcache._mux_sync``)."""
    from .. import _mux_sync  # noqa: PLC0415 - imported only when a manager pipelines

    return _mux_sync
