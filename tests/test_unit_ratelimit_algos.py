"""RateLimit validation, calendar boundaries, the result pair and the Python engine,
without Redis (``crmcache._ratelimit_algos``)."""

from __future__ import annotations

import pickle
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from crmcache import RateLimit, RateLimitResult
from crmcache._ratelimit import CorruptReply, LocalRateLimiter
from crmcache._ratelimit_algos import (
    Engine,
    calendar_bounds,
    check_cost,
    check_limits,
    decode_reply,
    script_args,
    wire_args,
)

NY = ZoneInfo("America/New_York")
HOUR_US = 3600 * 1_000_000


def _us(when: datetime) -> int:
    return int(when.timestamp()) * 1_000_000


@pytest.mark.parametrize(
    ("kwargs", "error", "named"),
    [
        ({"algorithm": "leaky"}, ValueError, "algorithm"),
        ({"limit": 0}, ValueError, "limit"),
        ({"limit": -3}, ValueError, "limit"),
        ({"limit": 2**53}, ValueError, "limit"),
        ({"limit": True}, TypeError, "limit"),
        ({"window": 0}, ValueError, "window"),
        ({"window": 10 * 365 * 86400 + 1}, ValueError, "window"),
        ({"window": "week"}, ValueError, "window"),
        ({"window": 1.5}, TypeError, "window"),
        ({"window": "day", "algorithm": "sliding"}, ValueError, "algorithm"),
        ({"window": "day", "timezone": "Mars/Olympus"}, ValueError, "timezone"),
        ({"timezone": "UTC"}, ValueError, "timezone"),
        ({"burst": 5}, ValueError, "burst"),
        ({"algorithm": "gcra", "burst": 0}, ValueError, "burst"),
        ({"group": "a{b}"}, ValueError, "group"),
        ({"group": ""}, ValueError, "group"),
        ({"name": ""}, ValueError, "name"),
        ({"name": 5}, TypeError, "name"),
    ],
)
def test_bad_arguments_are_named(
    kwargs: dict[str, object], error: type[Exception], named: str
) -> None:
    """Every bad argument raises at construction, naming the argument."""
    args: dict[str, object] = {"name": "sms", "limit": 10, "window": 60, **kwargs}
    with pytest.raises(error, match=named):
        RateLimit(**args)  # type: ignore[arg-type]


def test_keys_share_check_rate_limit_counter_and_hash_tags() -> None:
    """A plain fixed limit has check_rate_limit's key; a group becomes a hash tag first;
    each algorithm has a key of its own."""
    assert RateLimit("sms", 10, 60).key_suffix() == "sms:60"
    assert RateLimit("sms", 10, 60, group="g").key_suffix() == "{g}:sms:60"
    assert RateLimit("sms", 10, 60, algorithm="sliding").key_suffix() == "sms:60:sliding"
    assert RateLimit("sms", 10, 60, algorithm="gcra").key_suffix() == "sms:60:gcra"
    daily = RateLimit("sms", 10, "day", timezone="America/New_York")
    assert daily.key_suffix() == "sms:day:America/New_York"
    assert daily.is_quota
    assert RateLimit("x", 1, 3600).is_quota
    assert not RateLimit("x", 1).is_quota


def test_rate_limit_is_immutable_and_hashable() -> None:
    """Equal limits are equal and hash alike; nothing can be set."""
    a, b = RateLimit("x", 3, 60), RateLimit("x", 3, 60)
    assert a == b
    assert hash(a) == hash(b)
    assert a != RateLimit("x", 4, 60)
    with pytest.raises(AttributeError):
        a.limit = 5  # type: ignore[misc]


def test_cost_above_limit_names_both() -> None:
    """cost above a limit (a gcra burst) can never be allowed: ValueError naming both."""
    limits = (RateLimit("a", 10, 60), RateLimit("b", 3, 60, algorithm="gcra", burst=2))
    with pytest.raises(ValueError, match=r"cost \(3\) is above the burst \(2\)"):
        check_cost(limits, 3)
    with pytest.raises(ValueError, match=r"cost \(11\) is above the limit \(10\)"):
        check_cost(limits[:1], 11)
    with pytest.raises(ValueError, match="cost"):
        check_cost(limits, -1)
    assert check_cost(limits, 0) == 0


def test_limits_argument_is_checked() -> None:
    """limits: a non-empty list of RateLimit, each once."""
    with pytest.raises(ValueError, match="limits"):
        check_limits([])
    with pytest.raises(TypeError, match="limits"):
        check_limits(["sms"])
    with pytest.raises(ValueError, match="twice"):
        check_limits([RateLimit("a", 1), RateLimit("a", 2)])


def test_result_is_the_pair_in_every_way() -> None:
    """RateLimitResult unpacks, indexes, has len 2, equals and hashes as its pair."""
    result = RateLimitResult(True, 3, 10, 7, 0.0, reset=1.5)
    allowed, count = result
    assert (allowed, count) == (True, 3)
    assert result[0] is result.allowed
    assert result[1] == result.current_count == 3
    assert len(result) == 2
    assert result == (True, 3)
    assert hash(result) == hash((True, 3))
    assert result[:1] == (True,)
    assert isinstance(result, tuple)
    assert {result: 1}[(True, 3)] == 1
    assert result.count(True) == 1  # the tuple's method, as on any tuple
    copy = pickle.loads(pickle.dumps(result))  # noqa: S301 - our own object, round trip
    assert copy.fields() == result.fields() == (True, 3, 10, 7, 0.0, 1.5, False)
    with pytest.raises(AttributeError):
        result.allowed = False  # type: ignore[misc]


def test_calendar_days_across_dst_changes() -> None:
    """America/New_York: 9 March 2025 lasts 23 h, 2 November 2025 lasts 25 h; each
    boundary is local midnight."""
    spring = _us(datetime(2025, 3, 9, 12, tzinfo=NY))
    b0, b1, b2, b3 = calendar_bounds("day", NY, spring)
    assert b2 - b1 == 23 * HOUR_US
    assert b1 - b0 == 24 * HOUR_US
    assert b3 - b2 == 24 * HOUR_US
    assert datetime.fromtimestamp(b1 / 1e6, NY) == datetime(2025, 3, 9, tzinfo=NY)
    autumn = _us(datetime(2025, 11, 2, 12, tzinfo=NY))
    _, c1, c2, _ = calendar_bounds("day", NY, autumn)
    assert c2 - c1 == 25 * HOUR_US


def test_calendar_day_where_midnight_is_skipped() -> None:
    """America/Santiago skipped 00:00-01:00 on 8 September 2024: that day starts at the
    jump (01:00 local), and the instant before it belongs to the day before."""
    zone = ZoneInfo("America/Santiago")
    _, b1, _, _ = calendar_bounds("day", zone, _us(datetime(2024, 9, 8, 12, tzinfo=zone)))
    first = datetime.fromtimestamp(b1 / 1e6, zone)
    before = datetime.fromtimestamp((b1 - 1) / 1e6, zone)
    assert first.date().day == 8
    assert first.hour == 1
    assert before.date().day == 7


def test_calendar_months() -> None:
    """Month windows start on the 1st at local midnight, December rolling into January."""
    now = _us(datetime(2025, 12, 15, tzinfo=NY))
    starts = [datetime.fromtimestamp(b / 1e6, NY) for b in calendar_bounds("month", NY, now)]
    assert [(s.year, s.month, s.day, s.hour) for s in starts] == [
        (2025, 11, 1, 0),
        (2025, 12, 1, 0),
        (2026, 1, 1, 0),
        (2026, 2, 1, 0),
    ]


def _run(
    engine: Engine, limits: list[RateLimit], now: int, cost: int, mode: str = "c"
) -> list[int]:
    keys = [item.key_suffix() for item in limits]
    args = [a for item in limits for a in script_args(item, now)]
    return engine.run(keys, args, now, cost, mode)


def test_gcra_retry_after_is_exact() -> None:
    """10 per second, burst 2: two at once, the third waits exactly 100 ms minus what
    elapsed, in whole microseconds; a refund frees one slot at once."""
    limit = RateLimit("g", 10, 1, algorithm="gcra", burst=2)
    engine = Engine()
    t = 1_000_000_000_000
    assert _run(engine, [limit], t, 1)[:3] == [1, 1, 1]
    assert _run(engine, [limit], t + 10, 1)[:3] == [1, 1, 1]
    refused = _run(engine, [limit], t + 30, 1)
    assert refused[:3] == [0, 0, 0]
    assert refused[4] == 100_000 - 30
    assert _run(engine, [limit], t + 30, 1, "r")[3] == 1  # refunded: one unit held
    assert _run(engine, [limit], t + 30, 1)[0] == 1


def test_refund_never_below_zero_and_peek_charges_nothing() -> None:
    """A refund larger than the count leaves 0; cost=0 reports without charging."""
    for limit in (
        RateLimit("f", 5, 60),
        RateLimit("s", 5, 60, algorithm="sliding"),
        RateLimit("g", 5, 60, algorithm="gcra"),
        RateLimit("c", 5, "day"),
    ):
        engine = Engine()
        now = 1_700_000_000_000_000
        _run(engine, [limit], now, 2)
        assert _run(engine, [limit], now, 0)[3] == 2
        assert _run(engine, [limit], now, 0)[3] == 2
        assert _run(engine, [limit], now, 5, "r")[3] == 0
        assert _run(engine, [limit], now, 5)[:2] == [1, 5]


def test_decode_refuses_impossible_replies() -> None:
    """A reply of the wrong length, a flag other than 0/1, negative figures or more
    granted than asked is corrupt."""
    limits = [RateLimit("a", 5, 60)]
    for reply in ([1, 1, 1, 1, 0], [2, 1, 1, 1, 0, 0], [1, 1, 1, -1, 0, 0], [1, 9, 1, 1, 0, 0]):
        with pytest.raises(CorruptReply):
            decode_reply(reply, limits, 1)
    allowed, granted, outcome = decode_reply([0, 0, 0, 5, 2_500_000, 9_000_000], limits, 1)
    assert (allowed, granted, outcome.blocked_by, outcome.retry_after) == (
        False,
        0,
        limits[0],
        2.5,
    )
    assert outcome.results[0].fields() == (False, 5, 5, 0, 2.5, 9.0, False)
    assert outcome.results is outcome.results  # built once, on first access
    with pytest.raises(AttributeError, match="read-only"):
        outcome.allowed = True  # type: ignore[misc]
    local = decode_reply([1, 1, 1, 3, 0, 0], limits, 1, degraded=True, capacities=[4])[2]
    assert local.results[0].fields() == (True, 3, 4, 1, 0.0, 0.0, True)


@pytest.mark.parametrize(
    "limit",
    [
        RateLimit("f", 4, 60),
        RateLimit("s", 4, 60, algorithm="sliding"),
        RateLimit("g", 4, 60, algorithm="gcra"),
        RateLimit("c", 4, "month", timezone="Europe/Paris"),
    ],
    ids=["fixed", "sliding", "gcra", "calendar"],
)
def test_local_limiter_runs_every_algorithm(limit: RateLimit) -> None:
    """The "local" fallback enforces each algorithm, scaled by its share (half of 4)."""
    local = LocalRateLimiter(0.5)
    now = int(datetime(2025, 6, 1, 12, tzinfo=NY).timestamp()) * 1_000_000
    keys = [limit.key_suffix()]
    outcomes = [local.run_set(keys, [limit], 1, "c", now + i)[2] for i in range(4)]
    assert [o.allowed for o in outcomes] == [True, True, False, False]
    assert all(o.degraded for o in outcomes)
    assert outcomes[-1].results[0].limit == 2
    assert local.run_set(keys, [limit], 5, "u", now + 10)[1] == 0
    local.run_set(keys, [limit], 1, "r", now + 10)
    assert local.run_set(keys, [limit], 5, "u", now + 10)[1] == 1


def test_one_day_later_is_the_next_calendar_window() -> None:
    """The engine's calendar window resets at the next local midnight, not 24 h on."""
    limit = RateLimit("c", 1, "day", timezone="America/New_York")
    engine = Engine()
    start = datetime(2025, 3, 9, 0, 30, tzinfo=NY)
    assert _run(engine, [limit], _us(start), 1)[0] == 1
    late = start + timedelta(hours=22)  # 23:30 local on the 23 h day
    assert _run(engine, [limit], _us(late), 1)[0] == 0
    assert _run(engine, [limit], _us(datetime(2025, 3, 10, tzinfo=NY)), 1)[0] == 1


@pytest.mark.parametrize(
    "limit",
    [
        RateLimit("f", 4, 60),
        RateLimit("s", 4, 60, algorithm="sliding"),
        RateLimit("g", 4, 60, algorithm="gcra", burst=3),
        RateLimit("c", 4, "month", timezone="Europe/Paris"),
    ],
    ids=["fixed", "sliding", "gcra", "calendar"],
)
def test_wire_args_are_the_script_args_encoded(limit: RateLimit) -> None:
    """What the manager sends is script_args as bytes: three per limit, six for a
    calendar window."""
    now = _us(datetime(2025, 6, 1, 12, tzinfo=NY))
    args = script_args(limit, now)
    assert len(args) == (6 if limit.timezone else 3)
    assert wire_args(limit, now) == tuple(str(a).encode() for a in args)
