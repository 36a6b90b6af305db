"""Concurrency primitives of the async facade (twin: ``crmcache/_sync/primitives.py``).

The two files offer the same names with the same meaning; generated code imports them
and never touches ``asyncio`` or ``threading`` for these purposes directly.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable

__all__ = ["Background", "Event", "FairSlots", "sleep", "spawn"]


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
        """Wait up to ``timeout`` seconds; True if the event is set."""
        if timeout is None:
            await self._event.wait()
            return True
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            return self._event.is_set()
        return True


class FairSlots:
    """A counting semaphore that hands a freed slot to the longest-waiting task."""

    def __init__(self, slots: int) -> None:
        self._free = slots
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self, timeout: float) -> bool:
        """Take a slot, waiting up to ``timeout`` seconds; False if none came free."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            await asyncio.wait_for(asyncio.shield(turn), timeout)
        except TimeoutError:
            if turn.done():
                return True  # handed a slot just as the wait timed out: keep it
            self._waiters.remove(turn)
            turn.cancel()
            return False
        return True

    def release(self) -> None:
        """Give the slot to the first waiter, or free it."""
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._free += 1

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
