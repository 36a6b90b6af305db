"""Rate-limit sets on a real Redis: every algorithm held to its Python model (hypothesis),
all-or-none charging, refunds, peeks, failure policies, cluster slots, DST, durability,
and exact counts across processes."""

from __future__ import annotations

import logging
import textwrap
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crmcache import CRMCacheManager, RateLimit, RateLimitsResult
from crmcache._config import is_cluster_url
from crmcache._ratelimit_algos import Engine, decode_reply, script_args
from crmcache.testing import RedisServer
from helpers import run_processes

NY = ZoneInfo("America/New_York")
#: A time to start the driven clock at: a Saturday evening before the March DST change.
START = datetime(2025, 3, 8, 20, 0, tzinfo=NY)


def _us(when: datetime) -> int:
    return int(when.timestamp()) * 1_000_000


class Clock:
    """The time the script runs at (tests only: ``_rate_limit_clock``)."""

    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock(cache: CRMCacheManager) -> Iterator[Clock]:
    """Drive the scripts' clock of ``cache``."""
    driven = Clock(_us(START))
    cache._rate_limit_clock = driven  # type: ignore[attr-defined]
    yield driven
    cache._rate_limit_clock = None  # type: ignore[attr-defined]


# -- the basics ---------------------------------------------------------------------------


def test_issue_example(cache: CRMCacheManager) -> None:
    """The issue's three limits in one call: allowed, all charged, one result each."""
    limits = [
        RateLimit("sms-gateway", limit=10, window=1, group="sms"),
        RateLimit(
            "sms-gateway:daily",
            limit=10_000,
            window="day",
            timezone="America/New_York",
            group="sms",
        ),
        RateLimit(
            "client:42:marketing", limit=3, window=7 * 86400, algorithm="sliding", group="sms"
        ),
    ]
    result = cache.check_rate_limits(limits, cost=1)
    assert isinstance(result, RateLimitsResult)
    assert (result.allowed, result.blocked_by, result.retry_after) == (True, None, 0.0)
    assert [(r.current_count, r.remaining) for r in result.results] == [(1, 9), (1, 9999), (1, 2)]
    assert 0 < result.results[1].reset <= 25 * 3600


def test_refused_set_charges_nothing(cache: CRMCacheManager, raw: redis.Redis) -> None:
    """When one limit refuses, no limit is charged (the trial spent per-second units on
    sends the daily limit refused)."""
    per_second = RateLimit("gw", 10, 60, group="gw")
    daily = RateLimit("gw:daily", 1, 86400, group="gw")
    assert cache.check_rate_limits([per_second, daily]).allowed
    refused = cache.check_rate_limits([per_second, daily])
    assert (refused.allowed, refused.blocked_by) == (False, daily)
    assert 86000 < refused.retry_after <= 86400
    assert [tuple(r) for r in refused.results] == [(True, 1), (False, 1)]
    assert raw.get("crm:ratelimit:{gw}:gw:60") == b"1"
    assert raw.get("crm:ratelimit:{gw}:gw:daily:86400") == b"1"


def test_fixed_shares_check_rate_limit_counter(cache: CRMCacheManager, raw: redis.Redis) -> None:
    """RateLimit(name, limit, window) counts on check_rate_limit's key for the same name
    and window."""
    cache.check_rate_limit("whatsapp", 3, 60)
    cache.check_rate_limit("whatsapp", 3, 60)
    result = cache.check_rate_limits([RateLimit("whatsapp", 3, 60)])
    assert result.results[0] == (True, 3)
    assert cache.check_rate_limit("whatsapp", 3, 60).allowed is False
    assert raw.get("crm:ratelimit:whatsapp:60") == b"3"


def test_cost_above_a_limit_raises(cache: CRMCacheManager) -> None:
    """cost > limit raises ValueError naming both, as check_rate_limit does."""
    with pytest.raises(ValueError, match=r"cost \(4\) is above the limit \(3\)"):
        cache.check_rate_limits([RateLimit("a", 3, 60)], cost=4)
    with pytest.raises(ValueError, match="cost must be at most limit"):
        cache.check_rate_limit("a", 3, 60, cost=4)


def test_peek_charges_nothing(cache: CRMCacheManager, raw: redis.Redis) -> None:
    """cost=0 reports counts and whether one more unit fits, charging nothing."""
    limit = RateLimit("p", 2, 60)
    cache.check_rate_limits([limit], cost=2)
    peek = cache.check_rate_limits([limit], cost=0)
    assert (peek.allowed, peek.results[0].current_count, peek.results[0].remaining) == (
        False,
        2,
        0,
    )
    assert 0 < peek.retry_after <= 60
    assert raw.get("crm:ratelimit:p:60") == b"2"


def test_acquire_up_to_takes_what_every_limit_allows(cache: CRMCacheManager) -> None:
    """A campaign asking 500 gets what the tightest limit has left, charged everywhere."""
    limits = [
        RateLimit("camp", 100, 3600, group="c"),
        RateLimit("camp:gcra", 1000, 3600, algorithm="gcra", burst=40, group="c"),
    ]
    assert cache.acquire_up_to(limits, 500) == 40
    assert cache.acquire_up_to(limits, 500) == 0
    counts = cache.check_rate_limits(limits, cost=0).results
    assert [r.current_count for r in counts] == [40, 40]


def test_refund_gives_units_back_without_extending(
    cache: CRMCacheManager, raw: redis.Redis
) -> None:
    """A refund lowers every count (never below zero) and moves no expiry later."""
    fixed = RateLimit("r", 5, 60, group="r")
    gcra = RateLimit("r", 5, 60, algorithm="gcra", group="r")
    cache.check_rate_limits([fixed, gcra], cost=3)
    ttls = [raw.pttl("crm:ratelimit:{r}:r:60"), raw.pttl("crm:ratelimit:{r}:r:60:gcra")]
    assert cache.refund([fixed, gcra], cost=1) is True
    assert [r.current_count for r in cache.check_rate_limits([fixed, gcra], 0).results] == [2, 2]
    assert cache.refund([fixed, gcra], cost=5) is True
    assert [r.current_count for r in cache.check_rate_limits([fixed, gcra], 0).results] == [0, 0]
    assert raw.pttl("crm:ratelimit:{r}:r:60") <= ttls[0]
    assert raw.pttl("crm:ratelimit:{r}:r:60:gcra") <= ttls[1]


#: What another writer may have left at a limit's key: another type, a non-number, a
#: negative count, a count above 2**53 - 1.
GARBAGE: list[Callable[[redis.Redis, str], object]] = [
    lambda r, key: r.rpush(key, "x"),
    lambda r, key: r.set(key, "junk"),
    lambda r, key: r.set(key, "-4"),
    lambda r, key: r.set(key, str(2**60)),
]


@pytest.mark.parametrize("write", GARBAGE, ids=["list", "text", "negative", "huge"])
@pytest.mark.parametrize("algorithm", ["fixed", "sliding", "gcra", "calendar"])
def test_foreign_state_reads_as_empty(
    cache: CRMCacheManager, raw: redis.Redis, algorithm: str, write: Callable[..., object]
) -> None:
    """A key holding what the script never writes there reads as empty and is replaced
    by the next charge: alone (the one-limit path) and in a set (the general path,
    where a fixed limit is charged first). A set another limit refuses leaves it as it
    was."""
    if algorithm == "calendar":
        limit = RateLimit(f"junk-{algorithm}", 3, "day", group="j")
    else:
        limit = RateLimit(f"junk-{algorithm}", 3, 60, algorithm=algorithm, group="j")  # type: ignore[arg-type]
    key = f"crm:ratelimit:{limit.key_suffix()}"
    other = RateLimit("junk-other", 1, 60, algorithm="sliding", group="j")
    for limits in ([limit], [other, limit], [limit, other]):
        raw.delete(key, f"crm:ratelimit:{other.key_suffix()}")
        write(raw, key)
        result = cache.check_rate_limits(limits)
        assert result.allowed
        assert [r.current_count for r in result.results] == [1] * len(limits)
        assert 0 < raw.pttl(key) <= 86400 * 1000
        assert cache.check_rate_limits(limits, cost=0).results[limits.index(limit)][1] == 1
    # Refused by the other limit (spent above): the foreign value stays.
    raw.delete(key)
    write(raw, key)
    refused = cache.check_rate_limits([other, limit])
    assert (refused.allowed, refused.blocked_by) == (False, other)
    assert raw.type(key) == (b"list" if write is GARBAGE[0] else b"string")


def test_fixed_charged_first_is_taken_back(cache: CRMCacheManager, raw: redis.Redis) -> None:
    """The fixed limit the script charges before deciding (the last one, when every other
    limit allows) gives the units back when it refuses: alone and in a set."""
    fixed = RateLimit("first", 2, 60, group="f")
    sliding = RateLimit("first", 5, 60, algorithm="sliding", group="f")
    assert cache.check_rate_limits([fixed], cost=2).allowed
    alone = cache.check_rate_limits([fixed])
    assert (alone.allowed, tuple(alone.results[0])) == (False, (False, 2))
    assert 0 < alone.retry_after <= 60
    together = cache.check_rate_limits([fixed, sliding])
    assert (together.allowed, together.blocked_by) == (False, fixed)
    assert [tuple(r) for r in together.results] == [(False, 2), (True, 0)]
    assert raw.get("crm:ratelimit:{f}:first:60") == b"2"
    assert cache.refund([fixed], cost=1) is True
    assert [tuple(r) for r in cache.check_rate_limits([sliding, fixed]).results] == [
        (True, 1),
        (True, 2),
    ]


def test_cluster_needs_one_slot(cache: CRMCacheManager, redis_url: str) -> None:
    """Limits without a common group: a ValueError on a cluster (their keys would span
    slots), allowed on one node; with one group they work everywhere."""
    apart = [RateLimit("slot-a", 5, 60), RateLimit("slot-b", 5, 60)]
    if is_cluster_url(redis_url):
        with pytest.raises(ValueError, match="group"):
            cache.check_rate_limits(apart)
    else:
        assert cache.check_rate_limits(apart).allowed
    together = [RateLimit("slot-a", 5, 60, group="t"), RateLimit("slot-b", 5, 60, group="t")]
    assert cache.check_rate_limits(together).allowed
    assert cache.acquire_up_to(together, 10) == 4
    assert cache.refund(together, 2) is True


# -- failure policies -------------------------------------------------------------------------


def test_policies_apply_to_the_whole_set() -> None:
    """Redis away: "open" allows the set, "closed" refuses it naming the first limit,
    "local" runs every algorithm in the process; the strictest per-name policy wins."""
    limits = [
        RateLimit("a", 5, 60),
        RateLimit("b", 3, 60, algorithm="gcra", burst=2),
        RateLimit("c", 5, "day"),
        RateLimit("d", 5, 60, algorithm="sliding"),
    ]
    url = "redis://127.0.0.1:1/0"
    with CRMCacheManager(redis_url=url, socket_connect_timeout=0.2) as cache:
        opened = cache.check_rate_limits(limits)
        assert (opened.allowed, opened.degraded) == (True, True)
        closed = cache.check_rate_limits(limits, policy="closed")
        assert (closed.allowed, closed.blocked_by, closed.degraded) == (False, limits[0], True)
        assert cache.acquire_up_to(limits, 7) == 7
        assert cache.acquire_up_to(limits, 7, policy="closed") == 0
        assert cache.refund(limits) is False
    with CRMCacheManager(
        redis_url=url, socket_connect_timeout=0.2, rate_limit_policies={"c": "closed"}
    ) as cache:
        assert cache.check_rate_limits(limits).allowed is False
    with CRMCacheManager(
        redis_url=url, socket_connect_timeout=0.2, rate_limit_policy="local"
    ) as cache:
        outcomes = [cache.check_rate_limits(limits) for _ in range(3)]
        assert [o.allowed for o in outcomes] == [True, True, False]
        assert outcomes[2].blocked_by == limits[1]  # the gcra burst of 2
        assert all(o.degraded for o in outcomes)
        assert cache.acquire_up_to(limits, 9) == 0
        assert cache.refund(limits) is False
        assert cache.acquire_up_to(limits, 9) == 1


# -- each algorithm against its model ---------------------------------------------------------

#: Per algorithm: the limits (named per example) and the largest step of the clock, µs.
CASES: dict[str, tuple[Callable[[str], list[RateLimit]], int]] = {
    "fixed": (lambda n: [RateLimit(n, 7, 3600)], 0),
    "sliding": (lambda n: [RateLimit(n, 7, 10, algorithm="sliding")], 6_000_000),
    "gcra": (lambda n: [RateLimit(n, 5, 10, algorithm="gcra", burst=3)], 4_000_000),
    "calendar": (
        lambda n: [RateLimit(n, 6, "day", timezone="America/New_York")],
        6 * 3600 * 10**6,
    ),
    "set": (
        lambda n: [
            RateLimit(n, 9, 60, algorithm="sliding", group=n),
            RateLimit(n, 6, 10, algorithm="gcra", burst=4, group=n),
            RateLimit(n, 8, "day", timezone="America/New_York", group=n),
        ],
        3_000_000,
    ),
}

STEPS = st.lists(
    st.tuples(st.floats(0, 1), st.integers(0, 4), st.sampled_from("ccccur")),
    min_size=1,
    max_size=25,
)


def _model(
    engine: Engine, keys: list[str], limits: list[RateLimit], now: int, *, cost: int, mode: str
) -> tuple[bool, int, RateLimitsResult]:
    args = [a for item in limits for a in script_args(item, now)]
    return decode_reply(engine.run(keys, args, now, cost, mode), limits, cost)


def _comparable(result: RateLimitsResult, limits: list[RateLimit]) -> list[object]:
    """Every figure, but where the anchored fixed window times by key expiry (real time,
    not the driven clock): there only the decision and the count."""
    figures: list[object] = [result.allowed, result.blocked_by]
    for item, one in zip(limits, result.results, strict=True):
        full = one.fields()
        figures.append(full[:4] if item.algorithm == "fixed" and item.timezone is None else full)
    return figures


@pytest.mark.parametrize("case", list(CASES))
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=STEPS)
def test_script_matches_model(
    cache: CRMCacheManager, clock: Clock, case: str, steps: list[tuple[float, int, str]]
) -> None:
    """On random timings, costs and operations the script answers what the Python model
    of its algorithm answers: decisions, counts, retry_after and reset."""
    build, max_step = CASES[case]
    name = f"m{uuid.uuid4().hex[:12]}"
    limits = build(name)
    keys = [f"crm:ratelimit:{item.key_suffix()}" for item in limits]
    smallest = min(item.capacity for item in limits)
    engine = Engine()
    clock.now = _us(START)
    for fraction, units, mode in steps:
        clock.now += int(fraction * max_step)
        cost = min(units, smallest)
        if mode == "c":
            got = cache.check_rate_limits(limits, cost)
            want = _model(engine, keys, limits, clock.now, cost=cost, mode="c")[2]
            assert _comparable(got, limits) == _comparable(want, limits)
        elif mode == "u":
            taken = cache.acquire_up_to(limits, units * 2)
            assert taken == _model(engine, keys, limits, clock.now, cost=units * 2, mode="u")[1]
        else:
            assert cache.refund(limits, cost) is True
            _model(engine, keys, limits, clock.now, cost=cost, mode="r")


def test_calendar_day_across_dst_through_redis(cache: CRMCacheManager, clock: Clock) -> None:
    """America/New_York, 9 March 2025 (23 h) and 2 November 2025 (25 h): the window
    holds until local midnight, and reset says so."""
    limit = [RateLimit("dst", 1, "day", timezone="America/New_York")]
    for day, hours in (
        (datetime(2025, 3, 9, tzinfo=NY), 23),
        (datetime(2025, 11, 2, tzinfo=NY), 25),
    ):
        clock.now = _us(day + timedelta(minutes=30))
        first = cache.check_rate_limits(limit)
        assert first.allowed
        assert first.results[0].reset == hours * 3600 - 1800
        clock.now = _us(day) + (hours * 3600 - 1) * 1_000_000  # 23:59:59 local
        late = cache.check_rate_limits(limit)
        assert (late.allowed, late.retry_after) == (False, 1.0)
        clock.now = _us(day) + hours * 3600 * 1_000_000  # next local midnight
        assert cache.check_rate_limits(limit).allowed


# -- durability -------------------------------------------------------------------------------


@pytest.mark.single_only
@pytest.mark.parametrize(
    ("options", "persistence", "warned"),
    [
        (["--save", "", "--appendonly", "no"], "none", True),
        (["--appendonly", "yes"], "aof", False),
    ],
    ids=["no-persistence", "appendonly"],
)
def test_quotas_on_a_server_without_persistence(
    crm_logs: pytest.LogCaptureFixture, options: list[str], persistence: str, warned: bool
) -> None:
    """With quota limits in use, health_check logs one WARNING and stats say so when the
    server keeps no persistence; with appendonly yes, neither."""
    server = RedisServer(extra_args=options)
    server.start()
    try:
        with CRMCacheManager(redis_url=server.url) as cache:
            before = cache.get_stats()
            assert (before.persistence, before.quotas_without_persistence) == (persistence, False)
            cache.check_rate_limits([RateLimit("wa", 200, "day")])
            assert cache.health_check()
            assert cache.health_check()
            stats = cache.get_stats()
            assert (stats.persistence, stats.quotas_without_persistence) == (persistence, warned)
            assert cache.get_cache_stats()["quotas_without_persistence"] is warned
    finally:
        server.stop()
    lines = [r for r in crm_logs.records if "keeps no persistence" in r.getMessage()]
    assert len(lines) == (1 if warned else 0)
    assert all(r.levelno == logging.WARNING for r in lines)


# -- exact across processes ---------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import sys, time
    from crmcache import CRMCacheManager, RateLimit

    url, case, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
    WINDOW = 10 * 365 * 86400  # no window edge during the test
    LIMITS = {
        "fixed": [RateLimit("p", 1000, 3600)],
        "sliding": [RateLimit("p", 1000, WINDOW, algorithm="sliding")],
        "gcra": [RateLimit("p", 1000, WINDOW, algorithm="gcra")],
        "calendar": [RateLimit("p", 1000, "month", timezone="Asia/Tokyo")],
        "set": [
            RateLimit("p", 1000, 3600, group="p"),
            RateLimit("p", 900, WINDOW, algorithm="sliding", group="p"),
            RateLimit("p", 700, WINDOW, algorithm="gcra", group="p"),
            RateLimit("p", 800, "month", group="p"),
        ],
    }[case]
    with CRMCacheManager(redis_url=url) as cache:
        deadline = time.monotonic() + 30
        while cache.get_template("go", "sms") is None:
            if time.monotonic() > deadline:
                sys.exit("never told to go")
            time.sleep(0.005)
        print(sum(cache.check_rate_limits(LIMITS).allowed for _ in range(calls)))
    """
)

EXPECTED = {"fixed": 1000, "sliding": 1000, "gcra": 1000, "calendar": 1000, "set": 700}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(EXPECTED))
def test_exact_across_processes(redis_url: str, raw: redis.Redis, case: str) -> None:
    """4 processes x 400 calls allow exactly the limit (the tightest, for a set), for
    every algorithm."""
    outputs = run_processes(
        WORKER, redis_url, case, "400", go=lambda: raw.set("crm:template:sms:go", "1")
    )
    assert sum(int(out) for out in outputs) == EXPECTED[case]
