"""Invalidations that could not reach Redis, kept until they can.

A failed invalidation is the one cache failure that can serve wrong data later: the old
value stays in Redis for up to its TTL. So the manager records it here and replays it as
soon as Redis answers again (a background thread retries with backoff). The record is
bounded; past the bound, preference invalidations collapse into one flag that makes the
replay shorten the TTL of every cached preference to the tombstone TTL, and template
invalidations are counted as lost (and logged at ERROR).

Invalidations pending in a process that dies are lost with it: then the bound on a stale
preference is its TTL (``cache_ttl``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "DEFAULT_MAX_PENDING",
    "REPLAY_FIRST_DELAY",
    "REPLAY_MAX_DELAY",
    "PendingEntry",
    "PendingInvalidations",
    "PendingKind",
]

#: Most distinct keys remembered while Redis is away.
DEFAULT_MAX_PENDING = 10_000
#: Seconds before the first replay of failed invalidations, and the most between tries.
REPLAY_FIRST_DELAY = 0.2
REPLAY_MAX_DELAY = 5.0


class PendingKind(StrEnum):
    """What a pending invalidation is for."""

    PREFERENCES = "preferences"
    TEMPLATE = "template"


@dataclass(frozen=True, slots=True)
class PendingEntry:
    """One key to invalidate; ``version`` None means "unknown" (preferences only)."""

    kind: PendingKind
    key: str
    version: int | None


class PendingInvalidations:
    """A bounded, thread-safe record of failed invalidations, one entry per key."""

    def __init__(self, max_entries: int = DEFAULT_MAX_PENDING) -> None:
        self._max = max_entries
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, PendingEntry] = OrderedDict()
        self.prefs_overflowed = False
        self.templates_lost = 0

    def add(self, kind: PendingKind, key: str, version: int | None = None) -> bool:
        """Remember an invalidation of ``key``; False if the record was full."""
        with self._lock:
            old = self._entries.get(key)
            if old is not None:
                # Unknown beats known (its replay refuses more); else keep the newer version.
                merged = (
                    None if old.version is None or version is None else max(old.version, version)
                )
                self._entries[key] = PendingEntry(kind, key, merged)
                return True
            if len(self._entries) >= self._max:
                if kind is PendingKind.PREFERENCES:
                    self.prefs_overflowed = True
                else:
                    self.templates_lost += 1
                return False
            self._entries[key] = PendingEntry(kind, key, version)
            return True

    def snapshot(self) -> list[PendingEntry]:
        """The entries to replay, oldest first (they stay until :meth:`done`)."""
        with self._lock:
            return list(self._entries.values())

    def done(self, entry: PendingEntry) -> None:
        """Forget ``entry`` once replayed, unless a newer failure replaced it meanwhile."""
        with self._lock:
            if self._entries.get(entry.key) == entry:
                del self._entries[entry.key]

    def discard(self, key: str) -> None:
        """Forget ``key``: a later invalidation of it reached Redis."""
        with self._lock:
            self._entries.pop(key, None)

    def overflow(self) -> None:
        """More invalidations were missed than could be remembered: the replay shortens
        every cached preference's TTL to the tombstone TTL instead."""
        with self._lock:
            self.prefs_overflowed = True

    def clear_overflow(self) -> None:
        """The overflow was handled (every cached preference's TTL was shortened)."""
        with self._lock:
            self.prefs_overflowed = False

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __bool__(self) -> bool:
        with self._lock:
            return bool(self._entries) or self.prefs_overflowed
