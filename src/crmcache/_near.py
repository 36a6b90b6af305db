"""The near cache: decoded values kept in the process, invalidated by Redis.

Opt-in (``near_cache=True``). A bounded LRU of decoded preferences and templates with a
local TTL. Redis keeps it coherent by server-assisted client-side caching: a listener
connection runs ``CLIENT TRACKING ON ... BCAST PREFIX crm:prefs: PREFIX crm:template:``
and receives the name of every such key that any client changes (RESP2: redirected to its
own ``__redis__:invalidate`` subscription; RESP3: push messages).

Coherence rules, each tested:

* The cache serves only while the listener is subscribed ("live"); losing the connection
  (Redis restarted, network cut) flushes it, and so does every (re)subscription.
* A read in flight while an invalidation arrives must not install the value it read:
  every read takes a token (the invalidation sequence number) before it asks Redis, and
  installs only if no invalidation of that key, and no flush, happened since.
* This process's own writes invalidate locally before and after the write, so it reads
  its own writes at once, without waiting for the message from Redis.
* Rate-limit counters are never cached here.
* A child process made by ``fork()`` inherits the cache but not the listener (a thread
  or a task of the parent): in the child every near cache is flushed and stops serving at
  once, and its listener starts afresh on the first read; the cache serves again when the
  child's own listener is subscribed (:func:`reset_after_fork`).

The bound: a value changed by another client stops being served as soon as Redis's
invalidation message arrives (measured in the tests), and in any case after ``ttl``.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from ._stats import Tally

__all__ = [
    "MISSING",
    "NEAR_RECONNECT_FIRST",
    "NEAR_RECONNECT_MAX",
    "NOT_AN_INVALIDATION",
    "NearCache",
    "NearCacheStats",
    "invalidated_keys",
    "reset_after_fork",
]

#: Returned by :meth:`NearCache.get` for a key it does not hold.
MISSING: Final = object()
#: Returned by :func:`invalidated_keys` for a message that invalidates nothing.
NOT_AN_INVALIDATION: Final = object()
#: Seconds before the invalidation listener reconnects, first and at most.
NEAR_RECONNECT_FIRST = 0.1
NEAR_RECONNECT_MAX = 5.0


def invalidated_keys(message: Any) -> Any:  # noqa: ANN401 - a raw RESP2/RESP3 message
    """The keys an invalidation message names: a list of str, None for "everything"
    (FLUSHDB/FLUSHALL), or :data:`NOT_AN_INVALIDATION` (a PONG, a subscribe reply ...).

    RESP2 (redirected to a subscription): ``[b"message", b"__redis__:invalidate", keys]``.
    RESP3 (push): ``[b"invalidate", keys]``.
    """
    if not isinstance(message, list) or not message:
        return NOT_AN_INVALIDATION
    kind = message[0]
    if kind == b"message" and len(message) == 3 and message[1] == b"__redis__:invalidate":
        keys = message[2]
    elif kind in (b"invalidate", "invalidate") and len(message) == 2:
        keys = message[1]
    else:
        return NOT_AN_INVALIDATION
    if keys is None:
        return None
    return [k.decode() if isinstance(k, bytes) else str(k) for k in keys]


class _ForkAware(Protocol):
    def _after_fork_in_child(self) -> None: ...


#: Near caches and their listeners, reset in a child process after ``fork()``. Held
#: weakly: registering costs nothing later, and a closed manager's objects go away.
_fork_aware: weakref.WeakSet[_ForkAware] = weakref.WeakSet()


def reset_after_fork(obj: _ForkAware) -> None:
    """Have ``obj._after_fork_in_child()`` run in every child process forked from now on
    (right after ``fork()``, before the child runs anything else). ``obj`` is held weakly."""
    _fork_aware.add(obj)


def _after_fork_in_child() -> None:
    for obj in list(_fork_aware):
        obj._after_fork_in_child()


if hasattr(os, "register_at_fork"):  # POSIX: where there is no fork, nothing to reset
    os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass(frozen=True, slots=True)
class NearCacheStats:
    """What the near cache did."""

    enabled: bool
    live: bool
    size: int
    max_entries: int
    hits: int
    misses: int
    invalidations: int
    flushes: int
    discarded_fills: int


class NearCache:
    """A bounded, thread-safe LRU with a local TTL and invalidation-safe fills.

    Args:
        max_entries: most values held; the least recently used go first.
        ttl: seconds a value is served at most, invalidation or not.
    """

    def __init__(
        self, max_entries: int, ttl: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._data: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self._seq = 0
        self._key_seq: dict[str, int] = {}
        self._flush_seq = 0
        self.live = False
        # Lock-free counters: the hit path takes no lock.
        self._hit_count = Tally()
        self._miss_count = Tally()
        self._invalidations = self._flushes = self._discarded = 0
        reset_after_fork(self)

    def _after_fork_in_child(self) -> None:
        """In a forked child: no listener tells this process about changes any more, so
        serve nothing until the child's own listener is subscribed, and forget every value
        (and refuse fills begun before the fork)."""
        # Another thread of the parent may have held the lock as it forked: a new one.
        self._lock = threading.Lock()
        self.live = False
        self._data = OrderedDict()
        self._key_seq = {}
        self._seq += 1
        self._flush_seq = self._seq
        self._flushes += 1

    def get(self, key: str) -> Any:  # noqa: ANN401 - whatever was stored
        """The value for ``key``, or :data:`MISSING`.

        Takes no lock: each OrderedDict operation is atomic under the GIL, and a value
        read just before a concurrent invalidation is one that was current when the read
        began. Expiry and eviction, which change the dict, do lock.
        """
        if not self.live:
            return MISSING
        entry = self._data.get(key)
        if entry is None:
            self._miss_count.add()
            return MISSING
        if entry[0] <= self._clock():
            with self._lock:
                if self._data.get(key) is entry:
                    del self._data[key]
            self._miss_count.add()
            return MISSING
        try:  # noqa: SIM105 - contextlib.suppress costs more than the lookup it guards
            self._data.move_to_end(key)
        except KeyError:
            pass  # invalidated meanwhile: still the value current when this read began
        self._hit_count.add()
        return entry[1]

    def token(self) -> int:
        """Take before asking Redis; pass to :meth:`put` with what came back."""
        return self._seq

    def put(self, key: str, value: Any, token: int) -> bool:  # noqa: ANN401
        """Store ``value`` unless ``key`` was invalidated (or the cache flushed) since
        ``token`` was taken, or the cache is not live. Returns whether it was stored."""
        with self._lock:
            if not self.live or self._flush_seq > token or self._key_seq.get(key, -1) > token:
                self._discarded += 1
                return False
            self._data[key] = (self._clock() + self.ttl, value)
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)
            return True

    def invalidate(self, keys: Iterable[str] | None) -> None:
        """Drop ``keys`` (None: everything) and refuse fills begun before now."""
        with self._lock:
            self._seq += 1
            if keys is None:
                self._data.clear()
                self._flush_seq = self._seq
                self._flushes += 1
                return
            for key in keys:
                self._data.pop(key, None)
                self._key_seq[key] = self._seq
                self._invalidations += 1
            # Remember recent invalidations only: past the bound, forget them all and
            # refuse every fill begun before now instead (the same safety, coarser).
            if len(self._key_seq) > 4 * self.max_entries + 1024:
                self._key_seq.clear()
                self._flush_seq = self._seq

    def set_live(self, live: bool) -> None:
        """Start or stop serving; either way, flush (nothing held before can be trusted)."""
        with self._lock:
            self._seq += 1
            self._flush_seq = self._seq
            self._data.clear()
            self._key_seq.clear()
            self._flushes += 1
            self.live = live

    def stats(self, *, enabled: bool = True) -> NearCacheStats:
        """A snapshot of the counters."""
        with self._lock:
            return NearCacheStats(
                enabled=enabled,
                live=self.live,
                size=len(self._data),
                max_entries=self.max_entries,
                hits=self._hit_count.value,
                misses=self._miss_count.value,
                invalidations=self._invalidations,
                flushes=self._flushes,
                discarded_fills=self._discarded,
            )
