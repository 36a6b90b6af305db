"""Every public method against a server that answers wrongly: a documented value (a miss,
``False``, a degraded rate-limit result), never an exception, and within its deadline.

The server (tests/hostile.py) answers the handshake like Redis, then every data command
with one row of the table below: wrong types and lengths, RESP3 types on a RESP2
connection, bytes that are not RESP, an extra reply, a reply cut by a close, silence, a
reply dripped byte by byte, and sizes no call can use.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

import crmcache
from crmcache import ClientPreferences, RateLimitResult
from crmcache.cache_manager import LeaseState, SendClaim
from hostile import Row, hostile, timed

SOCKET_TIMEOUT = 0.5
POOL_TIMEOUT = 0.1
#: One call's deadline, and the slack a shared machine needs on top (scheduling, threads).
DEADLINE = SOCKET_TIMEOUT + POOL_TIMEOUT
SLACK = 1.0

PROTOCOL_ROWS = [
    Row("integer-reply", b":42\r\n"),
    Row("short-array", b"*2\r\n:1\r\n:1\r\n"),
    Row("wrong-element-types", b"*3\r\n$1\r\na\r\n:1\r\n:-1\r\n"),
    Row("nil-array", b"*-1\r\n"),
    Row("resp3-double", b",1.5\r\n"),
    Row("resp3-boolean", b"#t\r\n"),
    Row("resp3-map", b"%1\r\n+a\r\n:1\r\n"),
    Row("not-resp", b"\x00\xffgarbage\r\n"),
    Row("extra-reply", b"+OK\r\n+OK\r\n"),
    Row("huge-array-header", b"*2147483647\r\n"),
    Row("nested-huge-array", b"*1\r\n*2147483647\r\n"),
    Row("huge-bulk", b"$2000000\r\n" + b"x" * 2_000_000 + b"\r\n"),
]
STALL_ROWS = [
    Row("cut-by-close", b"$10\r\nabc", close=True),
    Row("silence", silent=True),
    Row("dripped", b"$5\r\nhello\r\n", drip=0.2),
]


def calls(cache: Any) -> dict[str, Any]:
    """Every public data method, with arguments, ready to run."""
    prefs = ClientPreferences(client_id="c1", version=1)
    return {
        "get_client_preferences": lambda: cache.get_client_preferences("c1"),
        "set_client_preferences": lambda: cache.set_client_preferences(prefs),
        "invalidate_client_preferences": lambda: cache.invalidate_client_preferences("c1"),
        "get_template": lambda: cache.get_template("t", "email"),
        "get_templates": lambda: cache.get_templates([("t", "email"), ("u", "sms")]),
        "set_template": lambda: cache.set_template("t", "email", "hi"),
        "set_templates": lambda: cache.set_templates({("t", "email"): "hi"}),
        "invalidate_template": lambda: cache.invalidate_template("t", "email"),
        "check_rate_limit": lambda: cache.check_rate_limit("sms", 5),
        "acquire_load_lease": lambda: cache.acquire_load_lease("c1"),
        "claim_send": lambda: cache.claim_send("m1"),
        "try_claim_send": lambda: cache.try_claim_send("m1"),
        "release_send": lambda: cache.release_send("m1"),
        "health_check": cache.health_check,
        "get_cache_stats": cache.get_cache_stats,
    }


def assert_documented(name: str, result: Any) -> None:
    """``result`` is what ``name`` documents for a Redis it cannot trust."""
    if name in {"get_client_preferences", "get_template"}:
        assert result is None, (name, result)
    elif name == "get_templates":
        assert result == {("t", "email"): None, ("u", "sms"): None}, result
    elif name == "check_rate_limit":
        assert isinstance(result, RateLimitResult)
        assert result.degraded, result
        assert result.allowed, result  # the default policy: open
    elif name == "acquire_load_lease":
        assert result.state in {LeaseState.UNAVAILABLE, LeaseState.BUSY}, result
    elif name == "try_claim_send":
        assert isinstance(result, SendClaim), result
    elif name == "get_cache_stats":
        assert result["total_keys"] is None, result
        assert result["redis"] is None, result
    else:  # writes, invalidations, health, claim_send, release_send
        assert isinstance(result, bool), (name, result)


def run_all(row: Row) -> tuple[dict[str, float], dict[str, int]]:
    """Every method on a fresh manager against ``row``: the seconds each took, and the
    manager's counters after."""
    with hostile(row) as server:
        cache = crmcache.CRMCacheManager(
            redis_url=server.url,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT,
            pool_timeout=POOL_TIMEOUT,
        )
        try:
            elapsed = {}
            for name, call in calls(cache).items():
                result, seconds = timed(call)
                assert_documented(name, result)
                elapsed[name] = seconds
            counters = cache.get_stats().counters
        finally:
            cache.close()
    return elapsed, counters


@pytest.mark.parametrize("row", PROTOCOL_ROWS, ids=lambda row: row.name)
def test_wrong_replies_degrade_as_protocol_errors(
    row: Row, caplog: pytest.LogCaptureFixture
) -> None:
    """A reply no command can get degrades the call, is counted as a protocol error and
    logged at ERROR at most once per interval; nothing raises, nothing waits."""
    caplog.set_level(logging.ERROR, logger="crmcache")
    elapsed, counters = run_all(row)
    assert counters["protocol_errors"] >= 1, counters
    assert counters["unexpected_errors"] == 0, counters
    slowest = max(elapsed, key=elapsed.__getitem__)
    # A wrong reply is refused as it arrives: no call waits for its deadline.
    assert elapsed[slowest] < DEADLINE + SLACK, (slowest, elapsed[slowest])
    broke = [r for r in caplog.records if "broke the protocol" in r.getMessage()]
    assert len(broke) == 1, [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("row", STALL_ROWS, ids=lambda row: row.name)
def test_stalled_replies_end_at_the_deadline(row: Row) -> None:
    """A reply cut short, never sent or dripped byte by byte ends the call by its one
    deadline (a per-read timeout would restart with every byte)."""
    elapsed, counters = run_all(row)
    assert counters["redis_errors"] >= 1, counters
    assert counters["unexpected_errors"] == 0, counters
    for name, seconds in elapsed.items():
        # Stats make two calls (SCAN, INFO); every other method one, retry included.
        allowed = 2 * DEADLINE if name == "get_cache_stats" else DEADLINE
        assert seconds < allowed + SLACK, (name, seconds)


def test_health_check_is_bounded_by_the_connect_timeout() -> None:
    """A server that takes 0.3 s per handshake answer: the probe (connect, handshake in
    one write, PING) still ends within socket_connect_timeout."""
    row = Row("slow-handshake", b"+PONG\r\n", handshake_delay=0.3)
    with hostile(row) as server:
        cache = crmcache.CRMCacheManager(redis_url=server.url, socket_connect_timeout=0.5)
        try:
            healthy, seconds = timed(cache.health_check)
        finally:
            cache.close()
    # AUTH-less: one handshake command (CLIENT SETNAME) answered after 0.3 s, then PING.
    assert healthy is True
    assert seconds < 0.5 + SLACK


def test_a_handshake_slower_than_the_connect_timeout_fails_the_probe_in_time() -> None:
    """Each handshake answer takes 0.4 s: with socket_connect_timeout=0.5 the probe cannot
    finish, and it says so within that bound instead of after three round trips."""
    row = Row("slower-handshake", b"+PONG\r\n", handshake_delay=0.4)
    with hostile(row) as server:
        url = server.url.replace("redis://", "redis://user:pw@").replace("/0", "/3")
        cache = crmcache.CRMCacheManager(redis_url=url, socket_connect_timeout=0.5)
        try:
            healthy, seconds = timed(cache.health_check)
        finally:
            cache.close()
    assert healthy is False
    assert seconds < 0.5 + SLACK
