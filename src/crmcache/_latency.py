"""Latency histograms cheap enough for the hot path: one list increment per call.

A series is a preallocated list of :data:`SLOTS` ints: slot ``i`` (0 to 63) counts the
durations of ``i`` bits in nanoseconds (``ns.bit_length() == i``, so ``ns < 2**i``), and
the last slot sums the nanoseconds. Recording is two ``+=`` on list items, no lock: under
the GIL a list item's ``+=`` of an int is not interrupted by another thread (CPython
switches threads only at calls and backward jumps), so no count is lost; the exporters
read the count as the sum of the buckets, so a scrape never shows a count that its
buckets disagree with.

The exporters (:mod:`crmcache.metrics`) fold the power-of-two buckets into the bounds
:data:`BOUNDS_NS` (4 µs to about 8.6 s, doubling).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Final

__all__ = [
    "BOUNDS_NS",
    "SLOTS",
    "SUM",
    "HistogramSnapshot",
    "LatencyHistograms",
    "new_series",
    "record",
    "snapshot_series",
]

#: Buckets per series (bit lengths 0 to 63), then the sum.
SLOTS: Final = 65
#: Index of the sum of nanoseconds in a series.
SUM: Final = 64
#: Exported upper bounds, in nanoseconds: 2**12 (4.1 µs) to 2**33 (8.6 s).
_FIRST_BIT, _LAST_BIT = 12, 33
BOUNDS_NS: Final = tuple(1 << i for i in range(_FIRST_BIT, _LAST_BIT + 1))


def new_series() -> list[int]:
    """An empty series."""
    return [0] * SLOTS


def record(series: list[int], ns: int) -> None:
    """Add one duration of ``ns`` nanoseconds (the hot path inlines this)."""
    series[ns.bit_length()] += 1
    series[SUM] += ns


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """One series as the exporters show it.

    Attributes:
        bounds: upper bounds in seconds (:data:`BOUNDS_NS`), ascending.
        buckets: how many durations fell at or below each bound and above the one before
            (not cumulative); ``len(bounds) + 1`` entries, the last for beyond the last
            bound.
        count: every duration recorded (the sum of ``buckets``).
        sum: their total, in seconds.
    """

    bounds: tuple[float, ...]
    buckets: tuple[int, ...]
    count: int
    sum: float

    def cumulative(self) -> list[int]:
        """Durations at or below each bound, then the count (Prometheus's ``le``)."""
        total, out = 0, []
        for n in self.buckets:
            total += n
            out.append(total)
        return out


_BOUNDS_S: Final = tuple(b / 1e9 for b in BOUNDS_NS)


def snapshot_series(series: list[int] | tuple[int, ...]) -> HistogramSnapshot:
    """Fold a series (:func:`new_series`) into :data:`BOUNDS_NS` buckets.

    Slot ``i`` holds durations from ``2**(i - 1)`` to ``2**i - 1`` ns, shown under the bound
    ``2**i``: a duration of exactly a bound's nanoseconds is counted one bucket up (an
    error of 1 ns, for a bit length instead of a search on the hot path).
    """
    counts = list(series[:SUM])
    total_ns = series[SUM]
    first = sum(counts[: _FIRST_BIT + 1])
    middle = counts[_FIRST_BIT + 1 : _LAST_BIT + 1]
    beyond = sum(counts[_LAST_BIT + 1 :])
    buckets = (first, *middle, beyond)
    return HistogramSnapshot(_BOUNDS_S, buckets, sum(buckets), total_ns / 1e9)


class LatencyHistograms:
    """One series per operation name, made on first use.

    :attr:`series` is read on the hot path without a lock (a dict lookup); a new
    operation takes the lock once.
    """

    __slots__ = ("_lock", "series")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: Operation name -> its series.
        self.series: dict[str, list[int]] = {}

    def add(self, op: str) -> list[int]:
        """The series of ``op``, made if new."""
        with self._lock:
            found = self.series.get(op)
            if found is None:
                found = self.series[op] = new_series()
            return found

    def record(self, op: str, ns: int) -> None:
        """Add one duration of ``op`` (outside the hot path)."""
        series = self.series.get(op)
        if series is None:
            series = self.add(op)
        record(series, ns)

    def snapshot(self) -> dict[str, HistogramSnapshot]:
        """Every operation's histogram now."""
        with self._lock:
            items = list(self.series.items())
        return {op: snapshot_series(series) for op, series in items}
