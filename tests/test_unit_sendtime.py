"""``ClientPreferences.can_send_at`` / ``next_send_time``: opt-out, quiet hours on the
client's wall clock, DST (skipped and repeated hours, Lord Howe's 30-minute shift). No Redis.

The DST changes used (2024, from the IANA database):

- America/New_York: 10 Mar 02:00 EST -> 03:00 EDT (07:00 UTC); 3 Nov 02:00 EDT -> 01:00 EST
  (06:00 UTC).
- Europe/London: 31 Mar 01:00 GMT -> 02:00 BST (01:00 UTC); 27 Oct 02:00 BST -> 01:00 GMT
  (01:00 UTC).
- Australia/Lord_Howe: 7 Apr 02:00 +11 -> 01:30 +10:30 (6 Apr 15:00 UTC); 6 Oct 02:00
  +10:30 -> 02:30 +11 (5 Oct 15:30 UTC).
- America/St_Johns in 2010, changes one minute past midnight, off the hour: 14 Mar 00:01
  -03:30 -> 01:01 -02:30 (03:31 UTC); 7 Nov 00:01 -02:30 -> 23:01 -03:30 the day before
  (02:31 UTC), the wall clock going back across midnight.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crmcache.models import ClientPreferences


def prefs(tz: str = "UTC", start: int | None = None, end: int | None = None) -> ClientPreferences:
    """A client in ``tz`` with quiet hours ``[start, end)``."""
    return ClientPreferences(
        client_id="c", timezone=tz, quiet_hours_start=start, quiet_hours_end=end
    )


def utc(*fields: int) -> datetime:
    """An aware UTC datetime."""
    return datetime(*fields, tzinfo=UTC)  # type: ignore[misc]


# -- the plain rules ------------------------------------------------------------------------


def test_no_quiet_hours_means_always() -> None:
    """Without quiet hours (none, one of the two, or start == end) every instant is
    sendable, and next_send_time is the instant itself."""
    t = utc(2024, 6, 1, 3, 17, 5, 123)
    for start, end in [(None, None), (22, None), (None, 7), (5, 5)]:
        p = prefs("Europe/London", start, end)
        assert p.can_send_at(t)
        assert p.next_send_time(t) == t


@pytest.mark.parametrize(
    ("hour", "quiet"),
    [(21, False), (22, True), (23, True), (0, True), (6, True), (7, False), (12, False)],
)
def test_quiet_hours_spanning_midnight(hour: int, quiet: bool) -> None:
    """22 -> 7 is quiet from 22:00 to 06:59:59.999999 local, end exclusive."""
    p = prefs("UTC", 22, 7)
    assert p.can_send_at(utc(2024, 6, 1, hour, 0)) is not quiet
    assert p.can_send_at(utc(2024, 6, 1, hour, 59, 59, 999_999)) is not quiet


def test_quiet_hours_within_a_day() -> None:
    """12 -> 14: quiet over lunch only."""
    p = prefs("UTC", 12, 14)
    assert [h for h in range(24) if not p.can_send_at(utc(2024, 6, 1, h))] == [12, 13]
    assert p.next_send_time(utc(2024, 6, 1, 12, 30)) == utc(2024, 6, 1, 14)
    assert p.next_send_time(utc(2024, 6, 1, 11, 59)) == utc(2024, 6, 1, 11, 59)


def test_quiet_hours_are_the_clients_wall_clock() -> None:
    """The same instant is night in New York (quiet) and morning in London."""
    t = utc(2024, 6, 1, 6, 0)  # 02:00 EDT, 07:00 BST
    assert not prefs("America/New_York", 22, 7).can_send_at(t)
    assert prefs("Europe/London", 22, 7).can_send_at(t)
    # Ends at 07:00 EDT = 11:00 UTC.
    assert prefs("America/New_York", 22, 7).next_send_time(t) == utc(2024, 6, 1, 11)


def test_when_in_any_zone_is_the_same_instant() -> None:
    """``when`` may carry any tzinfo; the answer depends on the instant only, and
    next_send_time answers in UTC."""
    p = prefs("America/New_York", 22, 7)
    instant = utc(2024, 6, 1, 3, 0)
    for tz in (UTC, ZoneInfo("Asia/Tokyo"), timezone(timedelta(hours=-3, minutes=-30))):
        local = instant.astimezone(tz)
        assert p.can_send_at(local) is False
        result = p.next_send_time(local)
        assert result == utc(2024, 6, 1, 11)
        assert result is not None
        assert result.tzinfo is UTC


def test_opted_out_client_never() -> None:
    """opt_out: can_send_at is False at every hour; next_send_time is None."""
    p = ClientPreferences(client_id="c", opt_out=True)
    assert not any(p.can_send_at(utc(2024, 6, 1, h)) for h in range(24))
    assert p.next_send_time(utc(2024, 6, 1, 12)) is None


@pytest.mark.parametrize(
    "when",
    [datetime(2024, 6, 1, 12), date(2024, 6, 1), "2024-06-01T12:00Z", 1717243200, None],
    ids=["naive", "date", "str", "int", "none"],
)
def test_naive_or_non_datetime_is_refused(when: object) -> None:
    """A naive datetime names no instant, and other types are not times: TypeError naming
    ``when``, from both methods (opted-out clients too)."""
    for p in (prefs("UTC", 22, 7), ClientPreferences(client_id="c", opt_out=True)):
        with pytest.raises(TypeError, match=r"^when must be"):
            p.can_send_at(when)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"^when must be"):
            p.next_send_time(when)  # type: ignore[arg-type]


def test_unvalidated_timezone_is_a_value_error() -> None:
    """A model that skipped validation with a bad zone raises ValueError naming it."""
    p = ClientPreferences.model_construct(
        client_id="c", timezone="Mars/Olympus", quiet_hours_start=1, quiet_hours_end=2
    )
    with pytest.raises(ValueError, match=r"^timezone"):
        p.can_send_at(utc(2024, 6, 1))


# -- DST ----------------------------------------------------------------------------------

NY, LONDON, LORD_HOWE, ST_JOHNS = (
    "America/New_York",
    "Europe/London",
    "Australia/Lord_Howe",
    "America/St_Johns",
)


def dst(case: str, zone: str, quiet: tuple[int, int], when: str, then: str) -> object:
    """One DST case: quiet hours ``[start, end)`` in ``zone``; at ``when`` (UTC)
    next_send_time answers ``then`` (UTC), or ``when`` itself if ``then`` is ``"="`` (then
    and only then can_send_at(when) is True)."""
    sendable = then == "="
    expected = _utc(when if sendable else then)
    return pytest.param(zone, *quiet, _utc(when), sendable, expected, id=case)


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


DST_CASES = [
    # New York, spring forward (02:00 EST -> 03:00 EDT at 07:00 UTC).
    dst("ny-spring-end-in-the-gap", NY, (22, 2), "2024-03-10 06:30", "2024-03-10 07:00"),
    dst("ny-spring-end-after-gap", NY, (22, 3), "2024-03-10 06:59:59", "2024-03-10 07:00"),
    dst("ny-spring-start-in-gap-before", NY, (2, 6), "2024-03-10 06:59:59", "="),
    dst("ny-spring-start-in-gap-after", NY, (2, 6), "2024-03-10 07:00", "2024-03-10 10:00"),
    dst("ny-spring-skipped-hour-never-quiet", NY, (2, 3), "2024-03-10 07:00", "="),
    # 01:15 EST -> 04:00 EDT: 1 h 45 min of quiet.
    dst("ny-spring-across-the-gap", NY, (1, 4), "2024-03-10 06:15", "2024-03-10 08:00"),
    # New York, fall back (02:00 EDT -> 01:00 EST at 06:00 UTC; 01:xx twice).
    dst(
        "ny-fall-repeated-hour-quiet-twice",
        NY,
        (1, 2),
        "2024-11-03 05:00",
        "2024-11-03 07:00",
    ),
    dst("ny-fall-second-01:30-quiet", NY, (1, 2), "2024-11-03 06:30", "2024-11-03 07:00"),
    dst("ny-fall-end-at-first-01:00", NY, (22, 1), "2024-11-03 04:59", "2024-11-03 05:00"),
    dst("ny-fall-second-01:30-sendable", NY, (22, 1), "2024-11-03 06:30", "="),
    dst("ny-fall-three-hours-of-quiet", NY, (0, 2), "2024-11-03 04:00", "2024-11-03 07:00"),
    # London, spring forward (01:00 GMT -> 02:00 BST at 01:00 UTC).
    dst("london-spring-end-in-gap", LONDON, (23, 1), "2024-03-31 00:30", "2024-03-31 01:00"),
    dst("london-spring-skipped-hour-never-quiet", LONDON, (1, 2), "2024-03-31 01:00", "="),
    dst("london-spring-across-gap", LONDON, (0, 3), "2024-03-31 00:59", "2024-03-31 02:00"),
    # London, fall back (02:00 BST -> 01:00 GMT at 01:00 UTC).
    dst(
        "london-fall-repeated-hour-quiet-twice",
        LONDON,
        (1, 2),
        "2024-10-27 00:00",
        "2024-10-27 02:00",
    ),
    dst(
        "london-fall-end-at-first-01:00",
        LONDON,
        (23, 1),
        "2024-10-26 23:30",
        "2024-10-27 00:00",
    ),
    dst("london-fall-second-01:15-sendable", LONDON, (23, 1), "2024-10-27 01:15", "="),
    # Lord Howe, spring forward by 30 minutes (02:00 +10:30 -> 02:30 +11 at 15:30 UTC).
    dst(
        "lord-howe-spring-end-in-half-hour-gap",
        LORD_HOWE,
        (22, 2),
        "2024-10-05 15:15",
        "2024-10-05 15:30",
    ),
    dst("lord-howe-spring-before-the-change", LORD_HOWE, (2, 3), "2024-10-05 15:29:59", "="),
    dst(
        "lord-howe-spring-02:30-02:59-quiet",
        LORD_HOWE,
        (2, 3),
        "2024-10-05 15:30",
        "2024-10-05 16:00",
    ),
    # Lord Howe, fall back by 30 minutes (02:00 +11 -> 01:30 +10:30 at 15:00 UTC).
    dst(
        "lord-howe-fall-01:30-01:59-twice",
        LORD_HOWE,
        (1, 2),
        "2024-04-06 14:00",
        "2024-04-06 15:30",
    ),
    dst(
        "lord-howe-fall-end-at-first-01:00",
        LORD_HOWE,
        (22, 1),
        "2024-04-06 13:59",
        "2024-04-06 14:00",
    ),
    dst("lord-howe-fall-second-01:40-sendable", LORD_HOWE, (2, 6), "2024-04-06 15:10", "="),
    dst(
        "lord-howe-fall-quiet-from-02:00+10:30",
        LORD_HOWE,
        (2, 6),
        "2024-04-06 15:30",
        "2024-04-06 19:30",
    ),
    # St John's 2010: the change falls inside a local hour, not on its boundary.
    # 00:00:30 is quiet; at 00:01 the clock shows 01:01, outside 23 -> 1.
    dst(
        "st-johns-spring-change-inside-the-hour",
        ST_JOHNS,
        (23, 1),
        "2010-03-14 03:30:30",
        "2010-03-14 03:31",
    ),
    dst("st-johns-fall-00:00-sendable", ST_JOHNS, (23, 0), "2010-11-07 02:30:30", "="),
    # At 00:01 the clock goes back to 23:01 the day before: quiet again until 00:00.
    dst(
        "st-johns-fall-back-into-hour-23",
        ST_JOHNS,
        (23, 0),
        "2010-11-07 02:31",
        "2010-11-07 03:30",
    ),
]


@pytest.mark.parametrize(("zone", "start", "end", "when", "can", "expected"), DST_CASES)
def test_dst(
    zone: str, start: int, end: int, when: datetime, *, can: bool, expected: datetime
) -> None:
    """Every case of a DST change: quiet hours ending or starting in a skipped hour,
    across a skipped hour, in a repeated hour (once and twice), and Lord Howe's 30-minute
    shift; the answer is the same whichever zone ``when`` is given in."""
    p = prefs(zone, start, end)
    for shown in (when, when.astimezone(ZoneInfo(zone))):
        assert p.can_send_at(shown) is can
        assert p.next_send_time(shown) == expected
    # Nothing between when and the answer is sendable (checked minute by minute: every
    # change of the local hour in these zones falls on a whole minute).
    assert all(not p.can_send_at(t) for t in _minutes_between(when, expected))
    if expected > when:
        assert not p.can_send_at(expected - timedelta(microseconds=1))


def _minutes_between(start: datetime, stop: datetime) -> list[datetime]:
    first = start.replace(second=0, microsecond=0) + timedelta(minutes=1)
    return [first + timedelta(minutes=i) for i in range(int((stop - first).total_seconds() // 60))]


# -- properties -----------------------------------------------------------------------------

ZONES = [
    "UTC",
    "America/New_York",
    "Europe/London",
    "Australia/Lord_Howe",
    "Asia/Kolkata",
    "America/St_Johns",
    "Pacific/Chatham",
    "America/Santiago",
]
INSTANTS = st.datetimes(
    min_value=datetime(2005, 1, 1), max_value=datetime(2030, 12, 31), timezones=st.just(UTC)
)
HOURS = st.none() | st.integers(min_value=0, max_value=23)


@settings(max_examples=300, deadline=None)
@given(zone=st.sampled_from(ZONES), start=HOURS, end=HOURS, when=INSTANTS)
def test_next_send_time_properties(
    zone: str, start: int | None, end: int | None, when: datetime
) -> None:
    """next_send_time(t) >= t; can_send_at(next_send_time(t)); nothing sendable strictly
    between (every local hour change in these zones falls on a whole minute, so checking
    each whole minute and the instant just before the answer covers the interval)."""
    p = prefs(zone, start, end)
    result = p.next_send_time(when)
    assert result is not None
    assert result >= when
    assert p.can_send_at(result)
    assert (result == when) is p.can_send_at(when)
    assert result - when < timedelta(hours=25)
    assert all(not p.can_send_at(t) for t in _minutes_between(when, result))
    if result > when:
        assert not p.can_send_at(result - timedelta(microseconds=1))


@settings(max_examples=100, deadline=None)
@given(zone=st.sampled_from(ZONES), start=HOURS, end=HOURS, when=INSTANTS)
def test_opted_out_properties(
    zone: str, start: int | None, end: int | None, when: datetime
) -> None:
    """An opted-out client is never sendable, whatever its quiet hours."""
    p = ClientPreferences(
        client_id="c", timezone=zone, quiet_hours_start=start, quiet_hours_end=end, opt_out=True
    )
    assert p.can_send_at(when) is False
    assert p.next_send_time(when) is None
