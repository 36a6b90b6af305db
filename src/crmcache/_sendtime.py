"""When a client may be contacted: quiet hours on the client's wall clock, DST included.

Pure functions, no I/O, behind ``ClientPreferences.can_send_at`` / ``next_send_time``.

The rules:

- Quiet hours are whole local hours, the half-open span ``[start:00, end:00)`` of the
  client's wall clock (``ClientPreferences.timezone``). ``start > end`` spans midnight
  (``22 -> 7`` is quiet from 22:00 to 06:59:59.999999). ``start == end``, or either of
  them None, means no quiet hours.
- An instant is judged by the wall-clock hour it shows in the client's zone. DST changes
  follow from that: a local hour skipped by a spring-forward change is never quiet (its
  instants do not exist), a local hour repeated by a fall-back change is quiet both
  times, and quiet hours that end at a skipped time end at the change itself (``22 -> 2``
  in New York ends at 03:00 EDT on the spring-forward day, the instant 02:00 EST would be).
- ``when`` must be an aware ``datetime`` (any tzinfo): a naive one names no instant
  (which 01:30 on a fall-back night?), so it raises ``TypeError``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, tzinfo

__all__ = ["check_when", "is_quiet_hour", "next_sendable", "sendable"]

_HOUR = timedelta(hours=1)
_SECOND = timedelta(seconds=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Steps of the walk to the end of quiet hours: one per local hour or offset change. At
#: most 23 quiet hours in a row, plus a change or two; more means a broken time zone.
_MAX_STEPS = 64


def check_when(when: object) -> datetime:
    """Return ``when`` if it is an aware ``datetime``.

    Raises:
        TypeError: not a ``datetime``, or a naive one (the message names ``when``).
    """
    if not isinstance(when, datetime):
        raise TypeError(f"when must be a datetime, not {type(when).__name__}")
    if when.utcoffset() is None:
        raise TypeError(
            "when must be timezone-aware (e.g. datetime.now(UTC)): a naive datetime names "
            "no instant"
        )
    return when


def is_quiet_hour(hour: int, start: int | None, end: int | None) -> bool:
    """True if the local ``hour`` (0-23) lies within the quiet hours ``[start, end)``."""
    if start is None or end is None or start == end:
        return False
    if start < end:
        return start <= hour < end
    return hour >= start or hour < end


def sendable(when: datetime, zone: tzinfo, start: int | None, end: int | None) -> bool:
    """True if the aware ``when`` falls outside the quiet hours on the wall clock of
    ``zone``."""
    return not is_quiet_hour(when.astimezone(zone).hour, start, end)


def next_sendable(when: datetime, zone: tzinfo, start: int | None, end: int | None) -> datetime:
    """The earliest instant at or after the aware ``when`` outside the quiet hours, in UTC.

    Walks from ``when`` through the instants where the local hour can change: the next
    local hour boundary at the current UTC offset, or an offset change before it
    (found by bisection over whole seconds, the resolution of the time-zone database).
    Between two such instants the local hour is constant, so nothing in between is
    sendable if its start is not.
    """
    moment = when.astimezone(UTC)
    for _ in range(_MAX_STEPS):
        local = moment.astimezone(zone)
        if not is_quiet_hour(local.hour, start, end):
            return moment
        offset = local.utcoffset()
        into_hour = timedelta(
            minutes=local.minute, seconds=local.second, microseconds=local.microsecond
        )
        boundary = moment + (_HOUR - into_hour)
        if boundary.astimezone(zone).utcoffset() != offset:
            boundary = _offset_change(moment, boundary, zone, offset)
        moment = boundary
    raise ValueError(f"no end to the quiet hours found in the time zone {zone}")


def _offset_change(
    after: datetime, by: datetime, zone: tzinfo, offset: timedelta | None
) -> datetime:
    """The first whole second in ``(after, by]`` whose UTC offset in ``zone`` is not
    ``offset`` (the one at ``after``; ``by`` has another)."""
    low = (after - _EPOCH) // _SECOND  # offset at low is still ``offset``
    high = -((_EPOCH - by) // _SECOND)  # ceil: ``by`` or the whole second after it
    while high - low > 1:
        middle = (low + high) // 2
        if (_EPOCH + middle * _SECOND).astimezone(zone).utcoffset() == offset:
            low = middle
        else:
            high = middle
    return _EPOCH + high * _SECOND
