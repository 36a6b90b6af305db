"""Concurrency primitives of the sync facade (twin: ``crmcache/_async/primitives.py``).

The two files offer the same names with the same meaning; generated code imports them
and never touches ``asyncio`` or ``threading`` for these purposes directly.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

__all__ = ["Background", "Event", "FairSlots", "finish", "sleep", "spawn"]


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

    def acquire(self, timeout: float) -> bool:
        """Take a slot, waiting up to ``timeout`` seconds; False if none came free."""
        with self._lock:
            if self._free > 0 and not self._waiters:
                self._free -= 1
                return True
            turn = threading.Event()
            self._waiters.append(turn)
            self.waits += 1
        try:
            if turn.wait(timeout):
                return True
        except BaseException:
            if not self._withdraw(turn):
                self.release()  # handed a slot as the interrupt came: pass it on
            raise
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
