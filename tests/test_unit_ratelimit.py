"""Rate-limit results and policies without Redis (``crmcache._ratelimit``)."""

from __future__ import annotations

from enum import IntEnum

import pytest

from crmcache._config import resolve_settings
from crmcache._ratelimit import (
    MAX_LIMIT,
    CorruptReply,
    RateLimitResult,
    check_limit_args,
    choose_policy,
    degraded_result,
    result_from_reply,
)


def test_degraded_open_allows_with_the_whole_limit_left() -> None:
    """The "open" policy allows, reports the whole limit remaining and no wait, degraded."""
    result = degraded_result("open", 10)
    assert result.fields() == RateLimitResult(True, 0, 10, 10, 0.0, degraded=True).fields()


def test_degraded_closed_refuses_and_asks_for_a_retry() -> None:
    """The "closed" policy refuses with nothing remaining and a one-second retry, degraded."""
    result = degraded_result("closed", 10)
    assert result.fields() == RateLimitResult(False, 0, 10, 0, 1.0, degraded=True).fields()


def test_policy_choice_order() -> None:
    """An explicit policy wins, then the API's own, then the manager's default."""
    settings = resolve_settings(
        redis_url="redis://127.0.0.1:1/0",
        enabled=False,
        rate_limit_policy="local",
        rate_limit_policies={"whatsapp": "closed"},
    )
    assert choose_policy(settings, "whatsapp", "open") == "open"
    assert choose_policy(settings, "whatsapp", None) == "closed"
    assert choose_policy(settings, "sms", None) == "local"


@pytest.mark.parametrize(("policy", "error"), [("shut", ValueError), (1, TypeError)])
def test_a_bad_policy_is_named(policy: object, error: type[Exception]) -> None:
    """A policy that is not one of the three raises, naming the argument."""
    settings = resolve_settings(redis_url="redis://127.0.0.1:1/0", enabled=False)
    with pytest.raises(error, match="policy"):
        choose_policy(settings, "sms", policy)


def test_reply_decoding() -> None:
    """The script's {allowed, count, ttl_ms} becomes a result; remaining never goes below 0
    (a refused call may find more than the limit counted, after the limit was lowered)."""
    assert (
        result_from_reply([1, 3, 1500], 10, 60_000).fields()
        == RateLimitResult(True, 3, 10, 7, 1.5).fields()
    )
    assert (
        result_from_reply([0, 12, 0], 10, 60_000).fields()
        == RateLimitResult(False, 12, 10, 0, 0.0).fields()
    )
    assert (
        result_from_reply([1, 10, 60_000], 10, 60_000).fields()
        == RateLimitResult(True, 10, 10, 0, 60.0).fields()
    )
    assert (
        result_from_reply((0, 0, 1), 10, 60_000).fields()
        == RateLimitResult(False, 0, 10, 10, 0.001).fields()
    )


@pytest.mark.parametrize(
    "reply",
    [
        [1, -1000, -5],
        [1, -1, 1000],
        [0, -1, 1000],
        [1, 0, 1000],
        [1, 11, 1000],
        [2, 3, 1000],
        [-1, 3, 1000],
        [True, 3, 1000],
        [1, 3, -1],
        [1, 3, 60_001],
        [1, 3.0, 1000],
        [1, b"3", 1000],
        [1, 3, None],
        [1, 3],
        [1, 3, 1000, 4],
        [],
        7,
        None,
        b"ok",
    ],
    ids=repr,
)
def test_corrupt_replies_are_refused(reply: object) -> None:
    """A reply no correct run of rate_limit.lua gives raises CorruptReply: a count below
    zero, above the limit on an allowed call (or 0 there: the call itself counts), an
    allowed flag other than 0/1, a TTL outside [0, window], not three ints."""
    with pytest.raises(CorruptReply):
        result_from_reply(reply, 10, 60_000)


@pytest.mark.parametrize(
    ("limit", "window", "cost", "error", "name"),
    [
        (0, 60, 1, ValueError, "limit"),
        (10, True, 1, TypeError, "window"),
        (10, 60, -1, ValueError, "cost"),
        (10, 10**10, 1, ValueError, "window"),
        (MAX_LIMIT + 1, 60, 1, ValueError, "limit"),
        (10**18, 60, 10**17, ValueError, "limit"),
        (10, 60, 11, ValueError, "cost"),
        (10, [60], 1, TypeError, "window"),
    ],
)
def test_limit_arguments_are_checked(
    limit: object, window: object, cost: object, error: type[Exception], name: str
) -> None:
    """Each bad limit, window or cost raises, naming the argument."""
    with pytest.raises(error, match=name):
        check_limit_args(limit, window, cost)


class _Numbers(IntEnum):
    LIMIT = 10
    WINDOW = 60
    COST = 2


def test_limit_arguments_come_back_plain_ints() -> None:
    """IntEnum members are accepted and returned as plain ints (redis-py refuses to send
    an int subclass); the largest limit and cost are accepted."""
    checked = check_limit_args(_Numbers.LIMIT, _Numbers.WINDOW, _Numbers.COST)
    assert checked == (10, 60, 2)
    assert [type(n) for n in checked] == [int, int, int]
    assert check_limit_args(MAX_LIMIT, 60, MAX_LIMIT) == (MAX_LIMIT, 60, MAX_LIMIT)
