"""Failure behaviour against a real server we kill, pause, restart and flush."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from functools import partial

import pytest
import redis

import helpers
from crmcache import BreakerState, ClientPreferences, CRMCacheManager
from crmcache.testing import RedisServer, free_loopback_port

#: Polls in this module wait up to 10 s, checking every 20 ms.
poll = partial(helpers.poll, timeout=10.0, interval=0.02)


@pytest.fixture
def fragile(own_server: RedisServer) -> Iterator[CRMCacheManager]:
    """A manager with short timeouts on a server the test controls."""
    with CRMCacheManager(
        redis_url=own_server.url,
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        pool_timeout=0.5,
    ) as manager:
        yield manager


def exercise(cache: CRMCacheManager) -> dict[str, object]:
    """Run every public call once and collect what each returned."""
    prefs = ClientPreferences(client_id="c1", version=1)
    return {
        "get_prefs": cache.get_client_preferences("c1"),
        "set_prefs": cache.set_client_preferences(prefs),
        "invalidate_prefs": cache.invalidate_client_preferences("c1"),
        "get_template": cache.get_template("t", "email"),
        "get_templates": cache.get_templates([("t", "email")]),
        "set_template": cache.set_template("t", "email", "x"),
        "set_templates": cache.set_templates({("t", "sms"): "y"}),
        "invalidate_template": cache.invalidate_template("t", "email"),
        "rate_limit": cache.check_rate_limit("api", 10, 60),
        "claim_send": cache.claim_send("m1"),
        "release_send": cache.release_send("m1"),
        "health": cache.health_check(),
        "stats": cache.get_cache_stats(),
    }


def assert_degraded(results: dict[str, object]) -> None:
    """Reads missed, writes reported failure, rate limit followed the open policy."""
    assert results["get_prefs"] is None
    assert results["get_template"] is None
    assert results["get_templates"] == {("t", "email"): None}
    for write in ("set_prefs", "invalidate_prefs", "set_template", "set_templates"):
        assert results[write] is False, write
    assert results["invalidate_template"] is False
    rate = results["rate_limit"]
    assert rate.allowed is True  # type: ignore[attr-defined]
    assert rate.degraded is True  # type: ignore[attr-defined]
    assert results["claim_send"] is True  # send_guard_policy "open": never block a send
    assert results["release_send"] is False
    assert results["health"] is False
    stats = results["stats"]
    assert stats["total_keys"] is None  # type: ignore[index]
    assert stats["redis"] is None  # type: ignore[index]


def test_nothing_listening(crm_logs: pytest.LogCaptureFixture) -> None:
    """With no server at the URL every call degrades without raising."""
    url = f"redis://127.0.0.1:{free_loopback_port()}/0"
    with CRMCacheManager(redis_url=url, socket_connect_timeout=0.5) as cache:
        assert_degraded(exercise(cache))
    assert any(r.levelno == logging.WARNING for r in crm_logs.records)


def test_killed_and_restarted_server(
    own_server: RedisServer, fragile: CRMCacheManager, crm_logs: pytest.LogCaptureFixture
) -> None:
    """SIGKILL mid-use: calls degrade; after a restart on the same port service resumes."""
    fragile.set_template("t", "email", "before")
    assert fragile.get_template("t", "email") == "before"

    own_server.kill()
    assert_degraded(exercise(fragile))
    for _ in range(200):
        assert fragile.get_template("t", "email") is None
    warnings = [r for r in crm_logs.records if r.levelno >= logging.WARNING]
    # Not one line per call: the first failure, the breaker opening, the health check.
    assert len(warnings) < 15, [r.getMessage() for r in warnings]

    own_server.restart()
    poll(lambda: fragile.set_template("t", "email", "after"))
    assert fragile.get_template("t", "email") == "after"
    assert fragile.check_rate_limit("api", 10, 60).degraded is False
    assert any("reachable again" in r.getMessage() for r in crm_logs.records)


def test_breaker_makes_reads_cheap_while_down(own_server: RedisServer) -> None:
    """With the server hung (SIGSTOP), the breaker opens and reads stop paying the timeout."""
    with CRMCacheManager(
        redis_url=own_server.url, socket_timeout=0.3, socket_connect_timeout=0.3
    ) as cache:
        cache.get_template("warm", "email")
        own_server.pause_process()
        try:
            while cache._breaker.state is BreakerState.CLOSED:
                assert cache.get_template("t", "email") is None
            started = time.monotonic()
            for _ in range(1000):
                assert cache.get_template("t", "email") is None
            elapsed = time.monotonic() - started
            # One probe may go through and wait one socket timeout; 1000 timeouts would
            # take 300 s.
            assert elapsed < 2.0
            assert cache.get_stats().circuit_breaker["trips"] == 1
        finally:
            own_server.resume_process()
        poll(lambda: cache.set_template("t", "email", "back"))
        assert cache._breaker.state is BreakerState.CLOSED


@pytest.mark.parametrize("failures", [1, 3])
def test_breaker_failures_setting_opens_after_exactly_n(failures: int) -> None:
    """breaker_failures=N against a Redis that refuses connections: N - 1 failed reads
    leave the breaker closed, the Nth opens it; the probe waits are capped at
    breaker_max_backoff."""
    dead = f"redis://127.0.0.1:{free_loopback_port()}/0"
    with CRMCacheManager(
        redis_url=dead,
        socket_connect_timeout=0.5,
        breaker_failures=failures,
        breaker_max_backoff=0.05,
    ) as cache:
        for _ in range(failures - 1):
            assert cache.get_template("t", "email") is None
            assert cache._breaker.state is BreakerState.CLOSED
        assert cache.get_template("t", "email") is None
        assert cache._breaker.state is BreakerState.OPEN
        assert cache.get_stats().circuit_breaker["trips"] == 1
        # Failed probes double the wait, but never past the maximum: probes keep coming.
        probes = cache._breaker.failures
        poll(
            lambda: (
                cache.get_template("t", "email") is None and cache._breaker.failures >= probes + 5
            )
        )
        assert cache._breaker._timeout <= 0.05


def test_read_is_bounded_by_socket_timeout(
    own_server: RedisServer, fragile: CRMCacheManager
) -> None:
    """A hung server costs a read at most about the socket timeout, never more."""
    fragile.get_template("warm", "email")
    own_server.pause_process()
    try:
        started = time.monotonic()
        assert fragile.get_template("t", "email") is None
        assert time.monotonic() - started < 2.0
        started = time.monotonic()
        assert fragile.health_check() is False
        assert time.monotonic() - started < 2.0
    finally:
        own_server.resume_process()


def test_script_flush_then_call(own_server: RedisServer, fragile: CRMCacheManager) -> None:
    """After SCRIPT FLUSH every script is reloaded on its next call (NOSCRIPT handled)."""
    assert fragile.set_client_preferences(ClientPreferences(client_id="c", version=1))
    fragile.check_rate_limit("api", 5, 60)
    raw = redis.Redis.from_url(own_server.url)
    try:
        raw.script_flush()
        assert fragile.set_client_preferences(ClientPreferences(client_id="c", version=2))
        assert fragile.check_rate_limit("api", 5, 60).current_count == 2
        assert fragile.invalidate_client_preferences("c", version=3)
        assert raw.get("crm:prefs:c") == b"T3"
    finally:
        raw.close()


def test_restart_also_loses_scripts(own_server: RedisServer, fragile: CRMCacheManager) -> None:
    """A restarted server knows no scripts; the next scripted call still works."""
    fragile.check_rate_limit("api", 5, 60)
    own_server.kill()
    own_server.restart()
    poll(lambda: fragile.check_rate_limit("api", 5, 60).degraded is False)


def test_closed_policy_refuses_when_down() -> None:
    """rate_limit_policy="closed" refuses calls when Redis cannot be asked; per call too."""
    url = f"redis://127.0.0.1:{free_loopback_port()}/0"
    with CRMCacheManager(
        redis_url=url, socket_connect_timeout=0.5, rate_limit_policy="closed"
    ) as cache:
        closed = cache.check_rate_limit("api", 10, 60)
        assert (closed.allowed, closed.degraded, closed.remaining) == (False, True, 0)
        assert closed.retry_after > 0
        opened = cache.check_rate_limit("api", 10, 60, policy="open")
        assert (opened.allowed, opened.degraded) == (True, True)


def test_out_of_memory_writes_fail_softly(
    own_server: RedisServer, fragile: CRMCacheManager
) -> None:
    """maxmemory with noeviction: writes return False, reads keep working, no exception."""
    fragile.set_template("small", "email", "kept")
    raw = redis.Redis.from_url(own_server.url)
    try:
        raw.config_set("maxmemory-policy", "noeviction")
        raw.config_set("maxmemory", 1)
        assert fragile.set_template("big", "email", "x" * 100_000) is False
        assert fragile.set_client_preferences(ClientPreferences(client_id="c")) is False
        assert fragile.get_template("small", "email") == "kept"
        # OOM is a refusal, not an outage: the breaker stays closed.
        assert fragile._breaker.state is BreakerState.CLOSED
        raw.config_set("maxmemory", 0)
        assert fragile.set_template("big", "email", "x" * 100_000) is True
    finally:
        raw.close()


def test_pool_saturation_waits_not_errors(own_server: RedisServer) -> None:
    """32 threads on 10 connections all get served (they wait for a connection)."""
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    with CRMCacheManager(redis_url=own_server.url, max_connections=10) as cache:
        cache.set_template("t", "email", "x")

        def work(_: int) -> int:
            return sum(cache.get_template("t", "email") == "x" for _ in range(100))

        with ThreadPoolExecutor(max_workers=32) as pool:
            assert sum(pool.map(work, range(32))) == 3200
        stats = cache.get_stats()
        assert stats.counters["reads_failed"] == 0
        assert stats.connection_pool.created <= 10


def test_wrong_password_is_logged_at_error(
    own_server: RedisServer, crm_logs: pytest.LogCaptureFixture
) -> None:
    """Bad credentials need a person: logged at ERROR, and reads still just miss."""
    raw = redis.Redis.from_url(own_server.url)
    try:
        raw.config_set("requirepass", "right-password")
    finally:
        raw.close()
    url = own_server.url.replace("redis://", "redis://:wrong-password@")
    with CRMCacheManager(redis_url=url, socket_connect_timeout=0.5) as cache:
        assert cache.get_template("t", "email") is None
    errors = [r for r in crm_logs.records if r.levelno == logging.ERROR]
    assert errors
    assert all("wrong-password" not in r.getMessage() for r in crm_logs.records)
