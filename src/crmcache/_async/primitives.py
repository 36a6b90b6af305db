"""Concurrency primitives of the async facade (twin: ``crmcache/_sync/primitives.py``).

The two files offer the same names with the same meaning; generated code imports them
and never touches ``asyncio`` or ``threading`` for these purposes directly.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from time import perf_counter_ns
from types import ModuleType
from typing import Any, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError

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
        self._event = asyncio.Event()

    def set(self) -> None:
        """Set the event, waking every waiter."""
        self._event.set()

    def is_set(self) -> bool:
        """True once set."""
        return self._event.is_set()

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds; True if the event is set.

        A cancellation of the waiter is always raised (``asyncio.wait_for`` on Python 3.11
        swallows one that arrives as the event is set).
        """
        if timeout is None:
            await self._event.wait()
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._event.wait()
        except TimeoutError:
            return self._event.is_set()
        return True


class FairSlots:
    """A counting semaphore that hands a freed slot to the longest-waiting task.

    Cancellation-safe: a caller cancelled while it waits takes no slot, and one cancelled
    just after a slot was handed to it passes that slot on, so no cancellation storm can
    shrink the pool.
    """

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._free = slots
        # Each waiter's turn resolves to True (handed a slot) or False (timed out).
        self._waiters: deque[asyncio.Future[bool]] = deque()
        #: Acquisitions that had to queue, and those that gave up at their timeout.
        self.waits = 0
        self.timeouts = 0
        #: How long those waited (``crmcache._latency`` series; cancelled waits left out).
        self.wait_time = new_series()
        #: Slots given back (calls done): how a caller that gave up tells a pool too
        #: small for its load (slots came free, too few) from calls stuck on the server
        #: (none did).
        self.released = 0

    async def acquire(self, timeout: float) -> bool:
        """Take a slot, waiting up to ``timeout`` seconds; False if none came free."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(turn)
        self.waits += 1
        started = perf_counter_ns()
        expiry = loop.call_later(timeout, self._expire, turn)
        try:
            got = await turn
        except BaseException:
            # Cancelled (awaiting ``turn`` cancels it too, unless it already resolved).
            if turn.done() and not turn.cancelled() and turn.result():
                self.release()  # a slot was handed over as the cancellation came: pass it on
            else:
                self._forget(turn)
            raise
        finally:
            expiry.cancel()
        record(self.wait_time, perf_counter_ns() - started)
        if not got:
            self.timeouts += 1
        return got

    def _expire(self, turn: asyncio.Future[bool]) -> None:
        if not turn.done():
            turn.set_result(False)
            self._forget(turn)

    def _forget(self, turn: asyncio.Future[bool]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(turn)

    def release(self) -> None:
        """Give the slot to the first waiter, or free it."""
        self.released += 1
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(True)
                return
        self._free += 1

    @property
    def held(self) -> int:
        """Slots taken (by callers, or handed to a waiter that has yet to resume)."""
        return self.slots - self._free

    @property
    def waiting(self) -> int:
        """How many callers wait for a slot."""
        return len(self._waiters)


class Background:
    """A background job started by :func:`spawn`."""

    def __init__(self, task: asyncio.Task[None]) -> None:
        self._task = task

    def is_alive(self) -> bool:
        """True while the job runs."""
        return not self._task.done()

    async def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the job to end (it is not cancelled)."""
        if not self._task.done():
            await asyncio.wait([self._task], timeout=timeout)

    def cancel(self) -> None:
        """Ask the job to stop at its next wait."""
        self._task.cancel()


def spawn(job: Callable[[], Awaitable[None]], name: str) -> Background:
    """Run ``job()`` in the background (a task on the running event loop)."""
    return Background(asyncio.get_running_loop().create_task(_run(job), name=name))


async def _run(job: Callable[[], Awaitable[None]]) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        await job()


async def sleep(seconds: float) -> None:
    """Sleep without blocking other tasks."""
    await asyncio.sleep(seconds)


async def finish(work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work()`` to its end even if the caller is cancelled meanwhile (the caller
    still sees its cancellation): for clean-up that must not stop half way."""
    return await asyncio.shield(work())


# -- the wire: one call's bytes on a redis-py connection, under one deadline ---------------
# The lean pool sends and reads itself (see pool.py) so that a call has one deadline over
# its handshake, every write, every read and its retry. asyncio: the whole call runs under
# one ``asyncio.timeout`` (``within``), so the reads below need no timeout of their own.


def within(seconds: float) -> contextlib.AbstractAsyncContextManager[object]:
    """The scope of one call: it raises ``TimeoutError`` once ``seconds`` have passed."""
    return asyncio.timeout(seconds)


def connected(conn: Any) -> bool:  # noqa: ANN401 - a redis-py connection
    """True if ``conn`` has a live socket."""
    return bool(conn.is_connected)


async def send(conn: Any, chunks: list[bytes], deadline: float) -> None:  # noqa: ANN401
    """Write one packed command."""
    writer = conn._writer
    writer.writelines(chunks)
    await writer.drain()


async def receive(conn: Any, deadline: float) -> bytes:  # noqa: ANN401
    """Read what has arrived on ``conn`` (at least one byte).

    Raises:
        redis.exceptions.ConnectionError: the server closed the connection.
    """
    parser = conn._parser
    data: bytes = await parser._stream.read(parser._read_size)
    if not data:
        raise RedisConnectionError("Connection closed by server.")
    return data


def dirty(conn: Any) -> bool:  # noqa: ANN401
    """True if an open idle connection holds bytes nobody asked for (an unrequested reply,
    or the end of the stream): it must not be reused, or every later read would be
    shifted. False for a connection that is not open."""
    if not conn.is_connected:
        return False
    parser = conn._parser
    stream = parser._stream
    return bool(parser._reader.has_data() or stream._buffer or stream.at_eof())


# -- auto-pipelining ----------------------------------------------------------------------

#: The async facade pipelines its data path unless told otherwise (measured:
#: docs/performance.md, "Pipelining: 100 asyncio tasks on one manager").
PIPELINING_DEFAULT = True


def multiplexer() -> ModuleType:
    """The auto-pipelining transports (``crmcache._mux``; the sync twin's are
    ``crmcache._mux_sync``)."""
    from .. import _mux  # noqa: PLC0415 - imported only when a manager pipelines

    return _mux
