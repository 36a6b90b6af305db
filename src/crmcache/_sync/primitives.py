"""Concurrency primitives of the sync facade (twin: ``crmcache/_async/primitives.py``).

The two files offer the same names with the same meaning; generated code imports them
and never touches ``asyncio`` or ``threading`` for these purposes directly.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

__all__ = ["Background", "Event", "FairSlots", "sleep", "spawn"]


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
