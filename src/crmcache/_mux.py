"""Auto-pipelining for the async facade: many concurrent callers, a few shared
connections, one write per event-loop turn (asyncio; the sync facade's opt-in twin is
``crmcache._mux_sync``; see docs/guides/pipelining.md).

Each :class:`AsyncMuxPool` keeps ``connections`` redis-py connections open (opened, TLS,
``AUTH``/``INFO``/``SELECT``/``CLIENT SETNAME`` handshake and Sentinel ``locate`` exactly
as the lean pool opens them) and takes their sockets over:

* a call packs its command, appends it to the next connection's outbox (round robin)
  with a future, and awaits the future. The first call of an event-loop turn schedules
  one flush (``loop.call_soon``): every command queued in that turn goes out in one
  ``write``;
* one reader task per connection feeds hiredis and hands each reply to the oldest
  waiting future, in order, after checking it against its command's contract
  (``crmcache._replies``) and its size budget;
* **cancellation-safe by construction**: a caller that is cancelled (or gives up) leaves
  its future behind; its reply is still read, in its turn, and dropped. No reply can
  reach another caller (the bug behind CVE-2023-28858/28859 was a cancelled reader
  leaving a reply on a shared connection);
* **one deadline per call** (``socket_timeout``) without a timer per call: a watchdog
  fires at the oldest waiting call's deadline; if that call still has no reply, the
  connection is closed and every call on it fails (Redis hangs, or the network
  stalled), as the lean pool closes a connection whose call timed out. The next call
  opens a new connection;
* a connection that drops fails its calls with ``ConnectionError``; a call sent on it is
  retried once on a new connection (the lean pool's rule: how a restarted Redis is
  reconnected). ``NOSCRIPT`` reloads as on the pool (``evalsha`` queues its first try
  itself, then goes on as the pool's does).

The reader handles replies as they arrive, so a large value delays only the replies
queued behind it on the same connection, by its transfer time (docs/performance.md,
"Pipelining: 100 asyncio tasks on one manager", has the measurement).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from ._async.cluster_node import AsyncAskingMixin
from ._async.node import AsyncNodeTransport
from ._async.pool import AsyncLeanPool
from ._async.sentinel import AsyncSentinelTransport
from ._config import CacheSettings
from ._guard import CircuitBreaker, PoolClosedError
from ._muxcore import READ_SIZE, MuxBooks, MuxReplies
from ._replies import Check
from ._resp import pack

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection

    from ._scripts import ScriptLike


__all__ = [
    "AsyncMuxClusterNodePool",
    "AsyncMuxNodeTransport",
    "AsyncMuxPool",
    "AsyncMuxSentinelTransport",
]


class _MuxConnection(MuxReplies):
    """One shared connection: its outbox, its waiting calls (oldest first), its reader
    task."""

    __slots__ = ("conn", "loop", "outbox", "pool", "scheduled", "task", "watchdog", "writer")

    def __init__(self, pool: AsyncMuxPool, conn: AbstractConnection) -> None:
        parser: Any = conn._parser
        super().__init__(parser._reader, pool.address, pool.max_value_bytes)
        self.pool = pool
        self.conn = conn
        #: The loop its reader runs on, where its calls' futures live (asking for the
        #: running loop costs a getpid() system call: a fifth of a call's own work).
        self.loop = asyncio.get_running_loop()
        self.writer: Any = conn._writer
        self.outbox: list[bytes] = []
        self.scheduled = False
        self.watchdog: asyncio.TimerHandle | None = None
        self.task = self.loop.create_task(
            self._read_loop(parser._stream), name=f"crmcache-mux-{pool.address}"
        )

    def submit(
        self, args: tuple[Any, ...], check: Check | None, future: asyncio.Future[Any]
    ) -> None:
        """Queue one command; the turn's first queues the flush."""
        now = time.monotonic()
        if self.watchdog is None:  # one watchdog per connection, at the oldest deadline
            self._arm(now + self.pool.call_timeout)
        self.pending.append((future, args, check, now))
        try:
            self.outbox.append(pack(args))
        except TypeError:  # an argument only redis-py knows how to send
            self.outbox.extend(self.conn.pack_command(*args))
        self.pool.commands += 1
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.scheduled = False
        if not self.alive or not self.outbox:
            return
        data = b"".join(self.outbox)
        self.outbox.clear()
        self.writer.write(data)
        self.pool.writes += 1

    def _arm(self, when: float) -> None:
        loop = self.loop
        self.watchdog = loop.call_at(loop.time() + max(0.0, when - time.monotonic()), self._check)

    def _check(self) -> None:
        """The oldest waiting call's deadline: still unanswered, the connection is dead.
        With nobody waiting the watchdog rests until the next call arms it."""
        self.watchdog = None
        if not self.alive or not self.pending:
            return
        deadline = self.pending[0][3] + self.pool.call_timeout
        if time.monotonic() >= deadline:
            self.kill(TimeoutError("no reply within socket_timeout: the connection is closed"))
        else:
            self._arm(deadline)

    async def _read_loop(self, stream: asyncio.StreamReader) -> None:
        # Bytes read since a reply last completed: what the oldest call's reply has
        # taken so far (give or take one chunk).
        since = 0
        tail = b""
        try:
            while True:
                chunk = await stream.read(READ_SIZE)
                since += len(chunk)
                self.screen(chunk, since, tail)
                self.reader.feed(chunk)
                if self.dispatch():
                    since = 0
                tail = bytes(chunk[-24:])
        except asyncio.CancelledError:
            self.kill(PoolClosedError())
            raise
        except BaseException as exc:  # noqa: BLE001 - every ending fails the waiting calls
            self.kill(exc)

    def kill(self, reason: BaseException) -> None:
        """Close the connection; every call still waiting on it fails."""
        if not self.alive:
            return
        self.alive = False
        if self.watchdog is not None:
            self.watchdog.cancel()
        self.outbox.clear()
        conn: Any = self.conn
        with contextlib.suppress(Exception):  # closing a broken socket: nothing to do
            conn._close()  # the writer closed, the connection marked closed
        self.fail_all(reason)
        self.pool.discarded += 1
        task = self.task
        if task is not asyncio.current_task() and not task.done():
            task.cancel()


#: A call's future, made directly (``loop.create_future`` is one Python call more).
_Future = asyncio.Future


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


class AsyncMuxPool(MuxBooks, AsyncLeanPool):
    """The lean pool's interface (``execute``, ``evalsha``, ``drop_idle``, ``close``,
    ``accounting``) on ``connections`` shared, auto-pipelined connections.

    Args:
        factory: makes a new (unconnected) redis-py connection.
        connections: shared connections, which calls take in turn (round robin); a
            command sent with :meth:`execute_large` takes one more, of its own
            (``large_lane``).
        kwargs: the lean pool's (``call_timeout``, ``connect_timeout``, ``on_info``,
            ``locate``, ``max_value_bytes``, ``address``, ``retry_dropped``...).
    """

    _muxes: list[_MuxConnection | None]
    #: One more connection, for :meth:`execute_large`.
    large_lane = True

    def __init__(
        self,
        factory: Callable[[], AbstractConnection],
        *,
        connections: int | None = None,
        **kwargs: Any,  # noqa: ANN401 - the lean pool's keyword arguments
    ) -> None:
        super().__init__(factory, **kwargs)
        #: Connections the calls take turns on; the large lane, if any, comes after them.
        self._lanes = self.open_books(connections)
        if self.large_lane:
            self._muxes.append(None)
        self._opening: list[asyncio.Future[_MuxConnection] | None] = [None] * len(self._muxes)
        self._turn = 0

    async def execute(
        self,
        *args: Any,  # noqa: ANN401 - a command's arguments
        check: Check | None = None,
        large: bool = False,
        retry: bool = True,
    ) -> Any:  # noqa: ANN401 - a raw Redis reply
        """Queue one command on a shared connection and await its reply (checked).

        Args:
            args: the command and its arguments.
            check: the reply's contract, when it is not the command's own (a script's).
            large: on the connection for large replies (:meth:`execute_large`).
            retry: once more on a new connection if this one drops.
        """
        if self._closed:
            raise PoolClosedError
        # One coroutine, not a call deeper: a frame per call costs as much as the rest.
        if large:
            index = self._lanes
        else:
            index = self._turn
            self._turn = (index + 1) % self._lanes
        mux = self._muxes[index]
        if mux is None or not mux.alive:
            mux = await self._open(index)
        future: asyncio.Future[Any] = _Future(loop=mux.loop)
        mux.submit(args, check, future)
        try:
            return await future
        except RedisConnectionError:
            if not retry or self._closed or not self._retry_dropped:
                raise
        # The connection dropped (a restarted Redis, a proxy): once more, on a new one
        # (this class's own execute: a subclass's, Sentinel's, wraps the whole call).
        return await AsyncMuxPool.execute(self, *args, check=check, large=large, retry=False)

    async def evalsha(self, script: ScriptLike, keys: Sequence[Any], args: Sequence[Any]) -> Any:  # noqa: ANN401 - a raw Redis reply
        """The lean pool's ``evalsha`` (a registered script by SHA, its reply checked
        against the script's contract, loaded on ``NOSCRIPT``), its first try queued right
        here: every rate-limit check is one, and :meth:`execute`'s frame and keyword call
        cost 100 tasks' checks about 6 % of their throughput (measured)."""
        if self._closed:
            raise PoolClosedError
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        index = self._turn
        self._turn = (index + 1) % self._lanes
        mux = self._muxes[index]
        if mux is None or not mux.alive:
            mux = await self._open(index)
        future: asyncio.Future[Any] = _Future(loop=mux.loop)
        mux.submit(command, script.check, future)
        # From here as the lean pool's evalsha goes on, on this class's own execute (a
        # Sentinel transport wraps the whole evalsha, not each command of it).
        try:
            return await future
        except NoScriptError:
            pass
        except RedisConnectionError:
            if self._closed or not self._retry_dropped:
                raise
            # The connection dropped: the one retry, on a new connection (to a restarted
            # Redis, which may not know the script yet).
            try:
                return await AsyncMuxPool.execute(self, *command, check=script.check, retry=False)
            except NoScriptError:
                pass
        await AsyncMuxPool.execute(self, "SCRIPT", "LOAD", script.script)
        return await AsyncMuxPool.execute(self, *command, check=script.check)

    async def execute_large(self, *args: Any, check: Check | None = None) -> Any:  # noqa: ANN401 - a raw Redis reply
        """:meth:`execute` for a command whose reply may be large (a template read): on
        a connection of its own (opened on first use), so that its transfer never holds
        up the small calls' replies queued behind it on theirs."""
        return await AsyncMuxPool.execute(self, *args, check=check, large=self.large_lane)

    async def _open(self, index: int) -> _MuxConnection:
        """The shared connection ``index``, opened if needed: one opening at a time, in a
        task of its own (a caller cancelled while it waits does not cancel it)."""
        opening = self._opening[index]
        if opening is None:
            opening = self._opening[index] = asyncio.get_running_loop().create_task(
                self._open_now(index), name=f"crmcache-mux-open-{self.address}"
            )
            # Its failure reaches every caller waiting; none may be left (all cancelled).
            opening.add_done_callback(_retrieve)
        return await asyncio.shield(opening)

    async def _open_now(self, index: int) -> _MuxConnection:
        try:
            conn = self._factory()
            try:
                # The socket, TLS and the handshake within one call's deadline.
                async with asyncio.timeout(self._call_timeout):
                    await self._connect(conn, time.monotonic() + self._call_timeout)
            except BaseException:
                await conn.disconnect(nowait=True)
                raise
            if self._closed:
                await conn.disconnect(nowait=True)
                raise PoolClosedError
            mux = self._muxes[index] = _MuxConnection(self, conn)
            return mux
        finally:
            self._opening[index] = None

    async def drop_idle(self, keep: Callable[[AbstractConnection], bool]) -> int:
        """Close the shared connections ``keep`` rejects (those to a former primary)."""
        return self.kill_where(keep, RedisConnectionError("the primary changed"))

    async def close(self, grace: float) -> None:
        """New calls fail at once; calls in flight get ``grace`` seconds for their
        replies; then every shared connection is closed."""
        self._closed = True
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self.in_flight():
            await asyncio.sleep(0.005)  # shutdown only: a poll is simpler than a wake-up
        self.kill_where(lambda _: False, PoolClosedError())


async def _in_place(futures: list[asyncio.Future[Any]]) -> list[Any]:
    """The futures' results in order, an error reply in its place."""
    replies: list[Any] = []
    for future in futures:
        try:
            replies.append(await future)
        except ResponseError as exc:
            replies.append(exc)
    return replies


class _Batch:
    """A batch handed out by :meth:`AsyncMuxClusterNodePool.lease`: the futures of the
    commands it sent (no connection is held: the shared ones carry it)."""

    __slots__ = ("futures",)

    def __init__(self) -> None:
        self.futures: list[asyncio.Future[Any]] = []


class AsyncMuxClusterNodePool(AsyncMuxPool, AsyncAskingMixin):
    """A cluster primary on shared connections, with the cluster node pool's interface
    (``crmcache._async.cluster_node``): batches are queued on one shared connection in one
    turn, so they go out in one write like any other calls, and ``ASKING`` travels right
    before its command on the same connection."""

    #: A cluster sends a template read to its slot's primary like any other command.
    large_lane = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401 - AsyncMuxPool's
        super().__init__(*args, **kwargs)
        self.breaker = CircuitBreaker()

    async def lease(self) -> _Batch:
        """A batch to send commands with (see :meth:`send_batch`)."""
        if self._closed:
            raise PoolClosedError
        return _Batch()

    async def give_back(self, batch: _Batch, *, intact: bool) -> None:
        """Nothing to return: an unread reply is dropped by the reader in its turn."""

    async def send_batch(
        self, batch: _Batch, commands: Sequence[tuple[Any, ...]], deadline: float
    ) -> None:
        """Queue ``commands`` on one shared connection, in this turn."""
        batch.futures = await self._submit_all(commands, [None] * len(commands))

    async def read_batch(
        self,
        batch: _Batch,
        commands: Sequence[tuple[Any, ...]],
        checks: Sequence[Check | None],
        deadline: float,
    ) -> list[Any]:
        """The replies, in order; an error reply in its place as a ``ResponseError``."""
        return await _in_place(batch.futures)

    async def batch(
        self, commands: Sequence[tuple[Any, ...]], checks: Sequence[Check | None]
    ) -> list[Any]:
        """Queue ``commands`` together on one shared connection and await their replies
        (an error reply in its place)."""
        return await _in_place(await self._submit_all(commands, checks))

    async def _submit_all(
        self, commands: Sequence[tuple[Any, ...]], checks: Sequence[Check | None]
    ) -> list[asyncio.Future[Any]]:
        index = self._turn
        self._turn = (index + 1) % self._lanes
        mux = self._muxes[index]
        if mux is None or not mux.alive:
            mux = await self._open(index)
        loop = mux.loop
        futures = []
        for command, check in zip(commands, checks, strict=True):
            future: asyncio.Future[Any] = _Future(loop=loop)
            mux.submit(command, check, future)
            futures.append(future)
        return futures


def _pipeline_connections(settings: CacheSettings) -> int:
    return settings.pipeline_connections


class AsyncMuxNodeTransport(AsyncNodeTransport, AsyncMuxPool):
    """The single-node transport with its data path on shared, auto-pipelined
    connections (admin and health keep their lean pools)."""

    def __init__(self, settings: CacheSettings, scrub: Callable[[str], str]) -> None:
        self.pipeline_connections = _pipeline_connections(settings)
        super().__init__(settings, scrub)


# Sentinel's execute takes no ``large``/``retry``: the pool's own keywords, which only
# AsyncMuxPool itself passes (to AsyncMuxPool.execute, by name).
class AsyncMuxSentinelTransport(AsyncSentinelTransport, AsyncMuxPool):  # type: ignore[misc]
    """The Sentinel transport with its data path on shared, auto-pipelined connections."""

    def __init__(self, settings: CacheSettings, scrub: Callable[[str], str]) -> None:
        self.pipeline_connections = _pipeline_connections(settings)
        super().__init__(settings, scrub)

    async def evalsha(self, script: ScriptLike, keys: Sequence[Any], args: Sequence[Any]) -> Any:  # noqa: ANN401 - a raw Redis reply
        """The shared connections' evalsha, on the current primary (it queues its first
        try itself, past :meth:`execute`)."""
        return await self._on_primary(super().evalsha, script, keys, args)
