"""Auto-pipelining for the sync facade (``pipelining=True``): many threads, a few shared
connections, their commands written together (threads only; asyncio's twin is
``crmcache._mux``, the reply side both share is ``crmcache._muxcore``).

Each :class:`MuxPool` keeps ``connections`` redis-py connections open (opened, TLS,
``AUTH``/``INFO``/``SELECT``/``CLIENT SETNAME`` handshake and Sentinel ``locate`` exactly
as the lean pool opens them) and takes their sockets over:

* a call packs its command and, under the connection's lock, appends it to the outbox and
  its waiter to the waiting calls (so both keep one order). If no thread is writing on
  that connection, this one becomes the writer: it sends everything queued, in one
  ``sendall``, until the outbox is empty. Threads that queue meanwhile do not write:
  their commands go out with the writer's next batch. Under load the writes batch
  themselves; alone, a call writes its own command at once. No writer thread, no hop;
* one reader thread per connection feeds hiredis and hands each reply to the oldest
  waiting call (``_muxcore.MuxReplies.dispatch``: checked against its contract and its
  size budget), waking it through a one-shot lock;
* **safe against interrupts and timeouts by construction**: a call that gives up leaves
  its waiter behind; its reply is still read, in its turn, and dropped. No reply can
  reach another caller;
* **one deadline per call** (``socket_timeout``): a call with no reply by then closes the
  connection (as the lean pool closes a connection whose call timed out) and every call
  on it fails; the reader also checks the oldest call's deadline whenever the socket is
  quiet for ``socket_timeout``, and a write that cannot finish in time closes it too;
* a connection that drops fails its calls with ``ConnectionError``; a call sent on it is
  retried once on a new connection (how a restarted Redis is reconnected).
  ``NOSCRIPT`` reloads as on the pool (``evalsha`` is inherited);
* after ``fork()`` the child forgets the parent's connections (without closing them) and
  opens its own.

Measured (``benchmarks/test_bench_sync_mux.py``; docs/performance.md): about twice the
lean pool's throughput at 16 threads, slower at 4 threads and below, so it is opt-in on
the sync facade.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from queue import Empty, SimpleQueue
from typing import TYPE_CHECKING, Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from ._config import CacheSettings
from ._guard import CircuitBreaker, PoolClosedError
from ._muxcore import READ_SIZE, MuxBooks, MuxReplies
from ._replies import Check
from ._resp import pack
from ._sync.cluster_node import AskingMixin
from ._sync.node import NodeTransport
from ._sync.pool import LeanPool
from ._sync.primitives import sleep
from ._sync.sentinel import SentinelTransport

if TYPE_CHECKING:
    from redis.connection import AbstractConnection

__all__ = ["MuxClusterNodePool", "MuxNodeTransport", "MuxPool", "MuxSentinelTransport"]

#: Seconds between checks for calls still in flight while the pool closes.
_DRAIN_POLL = 0.005
_NO_REPLY = "no reply within socket_timeout: the connection is closed"


class _Waiter:
    """Where one thread waits for its reply: a lock taken at birth, released once the
    reply (or the failure) is in."""

    __slots__ = ("_done", "_error", "_lock", "_value")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        """True once answered, or given up by its caller."""
        return self._done

    def set_result(self, result: Any, /) -> None:  # noqa: ANN401 - a raw Redis reply
        """Hand the call its reply (from the reader: once per waiter)."""
        self._value = result
        self._done = True
        self._lock.release()

    def set_exception(self, exception: BaseException, /) -> None:
        """Hand the call its failure."""
        self._error = exception
        self._done = True
        self._lock.release()

    def abandon(self) -> None:
        """Its caller gave up: the reply, when it comes, is dropped."""
        self._done = True

    def wait(self, timeout: float) -> bool:
        """Block until answered, at most ``timeout`` seconds; True if answered."""
        return self._lock.acquire(timeout=max(0.0, timeout))

    def result(self) -> Any:  # noqa: ANN401 - a raw Redis reply
        """The reply, or its failure raised (once :meth:`wait` said True)."""
        if self._error is not None:
            raise self._error
        return self._value


class _MuxConnection(MuxReplies):
    """One shared connection: its outbox, its waiting calls (oldest first), its reader
    thread."""

    __slots__ = ("conn", "handoff", "lock", "outbox", "pool", "sock", "thread", "writing")

    def __init__(self, pool: MuxPool, conn: AbstractConnection) -> None:
        parser: Any = conn._parser
        super().__init__(parser._reader, pool.address, pool.max_value_bytes)
        self.pool = pool
        self.conn: Any = conn  # redis-py's sync connection is untyped
        sock: Any = conn._sock
        self.sock: socket.socket = sock
        # A write that cannot finish in a call's time fails; a quiet socket wakes the
        # reader to look at the oldest call's deadline.
        self.sock.settimeout(pool.call_timeout)
        self.lock = threading.Lock()
        self.outbox: list[bytes] = []
        self.writing = False
        #: The main thread's commands, for this connection's writer thread (started at
        #: the first).
        self.handoff: SimpleQueue[Any] | None = None
        self.thread = threading.Thread(
            target=self._read_loop, name=f"crmcache-mux-{pool.address}", daemon=True
        )
        self.thread.start()

    def submit(self, commands: Sequence[tuple[Any, ...]], entries: Sequence[Any]) -> None:
        """Queue ``commands`` (adjacent, in order) with their ``(waiter, check)``
        entries, and write unless another thread is writing on this connection.

        The main thread hands them to this connection's writer thread instead: it is
        the one thread a signal handler's exception (``KeyboardInterrupt``, a task
        runner's time limit) can land in, at any bytecode, and a command queued
        without its waiter, or a write cut in half, would shift every later reply.
        ``SimpleQueue.put`` is one step: the commands are handed over whole, or not.

        Raises:
            redis.exceptions.ConnectionError: the connection closed before they were
                queued (nothing was sent).
        """
        if not self.alive:
            raise RedisConnectionError(f"connection to {self.address} closed")
        packed = []
        for args in commands:
            try:
                packed.append(pack(args))
            except TypeError:  # an argument only redis-py knows how to send
                packed.append(b"".join(self.conn.pack_command(*args)))
        if threading.get_ident() == threading.main_thread().ident:
            handoff = self.handoff or self._start_writer()
            handoff.put((packed, commands, entries))
        else:
            self._queue(packed, commands, entries)

    def _queue(
        self, packed: list[bytes], commands: Sequence[tuple[Any, ...]], entries: Sequence[Any]
    ) -> None:
        with self.lock:
            if not self.alive:
                raise RedisConnectionError(f"connection to {self.address} closed")
            now = time.monotonic()
            for args, (waiter, check) in zip(commands, entries, strict=True):
                self.pending.append((waiter, args, check, now))
            self.outbox.extend(packed)
            self.pool.commands += len(packed)
            if self.writing:
                return  # the writer sends these with its next batch
            self.writing = True
        self._write()

    def _write(self) -> None:
        """Send the outbox until it is empty (this thread is the writer). A failed
        write (part of a command may be out) closes the connection: its calls fail."""
        outbox = self.outbox
        while True:
            with self.lock:
                if not outbox or not self.alive:
                    self.writing = False
                    return
                data = outbox[0] if len(outbox) == 1 else b"".join(outbox)
                outbox.clear()
            try:
                self.sock.sendall(data)
            except OSError as exc:  # a timeout included
                with self.lock:
                    self.writing = False
                self.kill(exc)
                return
            self.pool.writes += 1

    def _start_writer(self) -> SimpleQueue[Any]:
        with self.lock:
            if self.handoff is None:
                self.handoff = SimpleQueue()
                threading.Thread(
                    target=self._writer_loop,
                    args=(self.handoff,),
                    name=f"crmcache-mux-writer-{self.address}",
                    daemon=True,
                ).start()
            return self.handoff

    def _writer_loop(self, handoff: SimpleQueue[Any]) -> None:
        """Queue and write what the main thread handed over, until the connection
        closes; what is still handed over then fails at once."""
        while (item := handoff.get()) is not None:
            packed, commands, entries = item
            try:
                self._queue(packed, commands, entries)
            except RedisConnectionError as exc:
                for waiter, _ in entries:
                    waiter.set_exception(RedisConnectionError(str(exc)))
        closed = RedisConnectionError(f"connection to {self.address} closed")
        with contextlib.suppress(Empty):
            while True:
                item = handoff.get_nowait()
                for waiter, _ in item[2] if item is not None else ():
                    waiter.set_exception(RedisConnectionError(str(closed)))

    def _read_loop(self) -> None:
        # Bytes read since a reply last completed: what the oldest call's reply has
        # taken so far (give or take one chunk).
        since = 0
        tail = b""
        recv, feed = self.sock.recv, self.reader.feed
        try:
            while self.alive:
                try:
                    chunk = recv(READ_SIZE)
                except TimeoutError:
                    self._check()
                    continue
                since += len(chunk)
                self.screen(chunk, since, tail)
                feed(chunk)
                if self.dispatch():
                    since = 0
                tail = chunk[-24:]
        except BaseException as exc:  # noqa: BLE001 - every ending fails the waiting calls
            self.kill(exc)

    def _check(self) -> None:
        """The socket was quiet for a call's time: if the oldest waiting call is past its
        deadline, Redis hangs and the connection is closed."""
        pending = self.pending
        with contextlib.suppress(IndexError):  # answered meanwhile
            if time.monotonic() - pending[0][3] >= self.pool.call_timeout:
                self.kill(TimeoutError(_NO_REPLY))

    def kill(self, reason: BaseException) -> None:
        """Close the connection (for good); every call still waiting on it fails."""
        with self.lock:
            if not self.alive:
                return
            self.alive = False
            self.outbox.clear()
        with contextlib.suppress(OSError):  # wakes the reader (and a blocked writer)
            self.sock.shutdown(socket.SHUT_RDWR)
        self.fail_all(reason)
        if self.handoff is not None:
            self.handoff.put(None)  # the writer thread ends
        self.pool.count_discarded()
        if threading.current_thread() is not self.thread:
            self.thread.join(self.pool.call_timeout)
        with contextlib.suppress(Exception):  # closing a broken socket: nothing to do
            self.conn.disconnect()


class MuxPool(MuxBooks, LeanPool):
    """The lean pool's interface (``execute``, ``evalsha``, ``drop_idle``, ``close``,
    ``accounting``) on ``connections`` shared, auto-pipelined connections.

    Args:
        factory: makes a new (unconnected) redis-py connection.
        connections: shared connections (round robin).
        kwargs: the lean pool's (``call_timeout``, ``connect_timeout``, ``on_info``,
            ``locate``, ``max_value_bytes``, ``address``, ``retry_dropped``...).
    """

    _muxes: list[_MuxConnection | None]

    def __init__(
        self,
        factory: Callable[[], AbstractConnection],
        *,
        connections: int | None = None,
        **kwargs: Any,  # noqa: ANN401 - the lean pool's keyword arguments
    ) -> None:
        super().__init__(factory, **kwargs)
        self._count = self.open_books(connections)
        self._opening = [threading.Lock() for _ in range(self._count)]
        self._turns = itertools.count()

    def execute_large(self, *args: Any, check: Check | None = None) -> Any:  # noqa: ANN401 - a raw Redis reply
        """:meth:`execute`: on the sync facade large replies share the connections with
        the small ones (there is no lane of their own here)."""
        return self.execute(*args, check=check)

    def execute(self, *args: Any, check: Check | None = None) -> Any:  # noqa: ANN401 - a raw Redis reply
        """Queue one command on a shared connection and wait for its reply (checked)."""
        deadline = time.monotonic() + self._call_timeout
        try:
            return self._exchange_all((args,), (check,), deadline)[0]
        except RedisConnectionError:
            if self._closed or not self._retry_dropped:
                raise
            # The connection dropped (a restarted Redis, a proxy): once more, on a new one,
            # within the same deadline.
            return self._exchange_all((args,), (check,), deadline)[0]

    def _exchange_all(
        self,
        commands: Sequence[tuple[Any, ...]],
        checks: Sequence[Check | None],
        deadline: float,
        *,
        in_place: bool = False,
    ) -> list[Any]:
        """Send ``commands`` adjacent on one shared connection and wait for their replies
        before ``deadline``; ``in_place``: an error reply is returned in its place instead
        of raised."""
        waiters = self._send_all(commands, checks, deadline)
        return self._wait_all(waiters, deadline, in_place=in_place)

    def _send_all(
        self, commands: Sequence[tuple[Any, ...]], checks: Sequence[Check | None], deadline: float
    ) -> list[tuple[_MuxConnection, _Waiter]]:
        if os.getpid() != self._pid:
            self._after_fork()
        if self._closed:
            raise PoolClosedError
        index = next(self._turns) % self._count
        mux = self._muxes[index]
        if mux is None or not mux.alive:
            mux = self._open(index, deadline)
        waiters = [_Waiter() for _ in commands]
        mux.submit(commands, [(w, c) for w, c in zip(waiters, checks, strict=True)])
        return [(mux, waiter) for waiter in waiters]

    def _wait_all(
        self, waiters: Sequence[tuple[_MuxConnection, _Waiter]], deadline: float, *, in_place: bool
    ) -> list[Any]:
        replies: list[Any] = []
        for position, (mux, waiter) in enumerate(waiters):
            answered = False
            try:
                answered = waiter.wait(deadline - time.monotonic())
            finally:
                if not answered:  # timed out, or interrupted while it waited
                    for _, later in waiters[position:]:
                        later.abandon()
            if not answered:
                mux.kill(TimeoutError(_NO_REPLY))
                raise TimeoutError(_NO_REPLY)
            try:
                replies.append(waiter.result())
            except ResponseError as exc:
                if not in_place:
                    raise
                replies.append(exc)
        return replies

    def _open(self, index: int, deadline: float) -> _MuxConnection:
        """The shared connection ``index``, opened if needed: one thread opens it, the
        others wait for it (within their deadline)."""
        lock = self._opening[index]
        if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TimeoutError("the call's deadline passed while a connection was opened")
        try:
            mux = self._muxes[index]
            if mux is not None and mux.alive:
                return mux
            conn: Any = self._factory()  # redis-py's sync connection is untyped
            try:
                self._connect(conn, deadline)
            except BaseException:
                conn.disconnect()
                raise
            if self._closed:
                conn.disconnect()
                raise PoolClosedError
            mux = self._muxes[index] = _MuxConnection(self, conn)
            return mux
        finally:
            lock.release()

    def count_discarded(self) -> None:
        """One more connection closed after a failure."""
        with self._lock:
            self.discarded += 1

    def _after_fork(self) -> None:
        # The parent's sockets and reader threads belong to the parent: forget them
        # without closing them (a shutdown would cut the parent's connections).
        with self._lock:
            if os.getpid() == self._pid:
                return
            self._muxes = [None] * self._count
            self._opening = [threading.Lock() for _ in range(self._count)]
            self._pid = os.getpid()

    def drop_idle(self, keep: Callable[[AbstractConnection], bool]) -> int:
        """Close the shared connections ``keep`` rejects (those to a former primary)."""
        return self.kill_where(keep, RedisConnectionError("the primary changed"))

    def close(self, grace: float) -> None:
        """New calls fail at once; calls in flight get ``grace`` seconds for their
        replies; then every shared connection is closed."""
        self._closed = True
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self.in_flight():
            sleep(_DRAIN_POLL)  # shutdown only: a poll is simpler than a wake-up
        self.kill_where(lambda _: False, PoolClosedError())


class _Batch:
    """A batch handed out by :meth:`MuxClusterNodePool.lease`: the waiters of the
    commands it sent (no connection is held: the shared ones carry it)."""

    __slots__ = ("waiters",)

    def __init__(self) -> None:
        self.waiters: list[tuple[_MuxConnection, _Waiter]] = []


class MuxClusterNodePool(MuxPool, AskingMixin):
    """A cluster primary on shared connections, with the cluster node pool's interface
    (``crmcache._sync.cluster_node``): a batch's commands are queued adjacent on one shared
    connection, so ``ASKING`` travels right before its command."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401 - MuxPool's
        super().__init__(*args, **kwargs)
        self.breaker = CircuitBreaker()

    def lease(self) -> _Batch:
        """A batch to send commands with (see :meth:`send_batch`)."""
        if self._closed:
            raise PoolClosedError
        return _Batch()

    def give_back(self, batch: _Batch, *, intact: bool) -> None:
        """Nothing to return: an unread reply is dropped by the reader in its turn."""
        for _, waiter in batch.waiters:
            waiter.abandon()

    def send_batch(
        self, batch: _Batch, commands: Sequence[tuple[Any, ...]], deadline: float
    ) -> None:
        """Queue ``commands`` adjacent on one shared connection."""
        batch.waiters = self._send_all(commands, [None] * len(commands), deadline)

    def read_batch(
        self,
        batch: _Batch,
        commands: Sequence[tuple[Any, ...]],
        checks: Sequence[Check | None],
        deadline: float,
    ) -> list[Any]:
        """The replies, in order; an error reply in its place as a ``ResponseError``."""
        return self._wait_all(batch.waiters, deadline, in_place=True)

    def batch(
        self, commands: Sequence[tuple[Any, ...]], checks: Sequence[Check | None]
    ) -> list[Any]:
        """Queue ``commands`` adjacent on one shared connection and wait for their
        replies (an error reply in its place)."""
        deadline = time.monotonic() + self._call_timeout
        return self._exchange_all(commands, checks, deadline, in_place=True)


def _pipeline_connections(settings: CacheSettings) -> int:
    return settings.pipeline_connections


class MuxNodeTransport(NodeTransport, MuxPool):
    """The single-node transport with its data path on shared, auto-pipelined
    connections (admin and health keep their lean pools)."""

    def __init__(self, settings: CacheSettings, scrub: Callable[[str], str]) -> None:
        self.pipeline_connections = _pipeline_connections(settings)
        super().__init__(settings, scrub)


class MuxSentinelTransport(SentinelTransport, MuxPool):
    """The Sentinel transport with its data path on shared, auto-pipelined connections."""

    def __init__(self, settings: CacheSettings, scrub: Callable[[str], str]) -> None:
        self.pipeline_connections = _pipeline_connections(settings)
        super().__init__(settings, scrub)
