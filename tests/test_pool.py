"""LeanPool: the data path's connection pool, on redis-py connections, against a real Redis."""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from crmcache import BreakerState, CRMCacheManager
from crmcache._pool import POOL_EXHAUSTED, FairSlots, LeanPool
from helpers import poll


def make_pool(url: str, *, size: int = 2, timeout: float = 0.2, read: float = 5.0) -> LeanPool:
    """A LeanPool making redis-py connections to ``url``."""
    kwargs = redis.connection.parse_url(url)
    return LeanPool(
        lambda: redis.Connection(socket_timeout=read, protocol=2, **kwargs),
        max_connections=size,
        timeout=timeout,
    )


@pytest.fixture
def pool(redis_url: str, raw: redis.Redis) -> Iterator[LeanPool]:
    """A two-connection pool on the session's (flushed) Redis."""
    lean = make_pool(redis_url)
    yield lean
    lean.close(0)


def blocked_clients(raw: redis.Redis) -> int:
    """How many clients Redis has blocked in BLPOP."""
    return int(raw.info("clients")["blocked_clients"])


def wait_blocked(raw: redis.Redis, n: int) -> None:
    """Poll until ``n`` clients are blocked, or fail at a deadline."""
    poll(lambda: blocked_clients(raw) >= n, what=f"{n} client(s) blocked", interval=0.01)


@pytest.mark.single_only
def test_commands_round_trip(pool: LeanPool) -> None:
    """SET, GET and MGET go through and come back as redis-py would return them."""
    assert pool.execute("SET", "k", b"v") == b"OK"
    assert pool.execute("GET", "k") == b"v"
    assert pool.execute("MGET", "k", "missing") == [b"v", None]


@pytest.mark.single_only
def test_connections_are_reused_lifo(pool: LeanPool) -> None:
    """Sequential calls use one connection; it is idle between calls."""
    for _ in range(50):
        pool.execute("PING")
    assert (pool.accounting().created, pool.accounting().idle) == (1, 1)


@pytest.mark.single_only
def test_error_reply_keeps_the_connection(pool: LeanPool) -> None:
    """An error reply (WRONGTYPE) is raised and the connection stays in the pool."""
    pool.execute("HSET", "h", "f", "v")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        pool.execute("GET", "h")
    assert pool.execute("PING") == b"PONG"
    assert (pool.accounting().created, pool.accounting().idle) == (1, 1)


@pytest.mark.single_only
def test_exhausted_pool_waits_then_says_so(redis_url: str, raw: redis.Redis) -> None:
    """With every connection busy a caller waits up to the timeout, then gets
    ConnectionError("No connection available.")."""
    lean = make_pool(redis_url, size=1, timeout=0.2)
    holder = threading.Thread(target=lean.execute, args=("BLPOP", "test:wake", 10))
    holder.start()
    try:
        wait_blocked(raw, 1)
        started = time.monotonic()
        with pytest.raises(RedisConnectionError, match=POOL_EXHAUSTED):
            lean.execute("PING")
        assert time.monotonic() - started >= 0.15
    finally:
        raw.lpush("test:wake", "x")
        holder.join(timeout=10)
        assert (lean.accounting().created, lean.accounting().idle) == (1, 1)
        lean.close(0)
    assert (lean.accounting().created, lean.accounting().idle) == (0, 0)


@pytest.mark.single_only
def test_timeout_mid_reply_drops_the_connection(redis_url: str, raw: redis.Redis) -> None:
    """A reply that arrives after the socket timeout never reaches the next caller."""
    lean = make_pool(redis_url, size=1, read=0.2)
    try:
        with pytest.raises(RedisTimeoutError):
            lean.execute("BLPOP", "late", 1)
        raw.lpush("late", "stale-reply")
        raw.set("k", "fresh")
        assert lean.execute("GET", "k") == b"fresh"
    finally:
        lean.close(0)


def test_saturation_does_not_open_the_breaker(redis_url: str, raw: redis.Redis) -> None:
    """A full pool degrades the call but is not an outage: the breaker stays closed."""
    with CRMCacheManager(
        redis_url=redis_url, max_connections=1, pool_timeout=0.05, pipelining=False
    ) as cache:
        lean = cache._transport
        assert lean is not None
        holder = threading.Thread(target=lean.execute, args=("BLPOP", "test:wake", 10))
        holder.start()
        try:
            wait_blocked(raw, 1)
            for _ in range(10):
                assert cache.get_template("t", "email") is None
            assert cache._breaker.state is BreakerState.CLOSED
            assert cache.get_stats().counters["reads_failed"] == 10
        finally:
            raw.lpush("test:wake", "x")
            holder.join(timeout=10)
        cache.set_template("t", "email", "back")
        assert cache.get_template("t", "email") == "back"


@pytest.mark.sync_only
def test_manager_used_across_fork(redis_url: str, raw: redis.Redis) -> None:
    """A manager inherited through fork() opens its own connections in the child."""
    with CRMCacheManager(redis_url=redis_url) as cache:
        cache.set_template("forked", "email", "hello")
        connections_before = raw.info("stats")["total_connections_received"]
        ctx = multiprocessing.get_context("fork")
        queue: multiprocessing.Queue[object] = ctx.Queue()

        def child() -> None:
            queue.put(cache.get_template("forked", "email"))

        proc = ctx.Process(target=child)
        proc.start()
        proc.join(timeout=30)
        assert proc.exitcode == 0
        assert queue.get(timeout=5) == "hello"
        # The child opened a connection of its own instead of sharing the parent's socket.
        assert raw.info("stats")["total_connections_received"] > connections_before
        # The parent's connection was left alone by the child.
        assert cache.get_template("forked", "email") == "hello"
        queue.close()
        queue.join_thread()


def test_fair_slots_hand_a_freed_slot_to_the_waiter() -> None:
    """A releasing thread cannot take its slot straight back past a waiting thread."""
    slots = FairSlots(1)
    assert slots.acquire(timeout=0)
    waiter_got: list[bool] = []
    queued = threading.Event()

    def waiter() -> None:
        queued.set()
        waiter_got.append(slots.acquire(timeout=10))

    thread = threading.Thread(target=waiter)
    thread.start()
    queued.wait(timeout=5)
    deadline = time.monotonic() + 5
    while not slots._waiters:  # the waiter has queued
        assert time.monotonic() < deadline
        time.sleep(0.001)
    slots.release()
    assert slots.acquire(timeout=0) is False  # the slot went to the waiter
    thread.join(timeout=5)
    assert waiter_got == [True]
    slots.release()
    assert slots.acquire(timeout=0) is True


def test_fair_slots_time_out() -> None:
    """With no slot free, acquire gives up after its timeout and leaves no waiter behind."""
    slots = FairSlots(1)
    assert slots.acquire(timeout=0)
    assert slots.acquire(timeout=0.05) is False
    assert not slots._waiters


def test_saturation_is_logged_as_saturation(
    redis_url: str, raw: redis.Redis, crm_logs: pytest.LogCaptureFixture
) -> None:
    """A full pool logs "saturated" once, never "Redis unavailable" or a recovery."""
    with CRMCacheManager(
        redis_url=redis_url, max_connections=1, pool_timeout=0.05, pipelining=False
    ) as cache:
        lean = cache._transport
        assert lean is not None
        holder = threading.Thread(target=lean.execute, args=("BLPOP", "test:wake", 10))
        holder.start()
        try:
            wait_blocked(raw, 1)
            for _ in range(5):
                cache.get_template("t", "email")
        finally:
            raw.lpush("test:wake", "x")
            holder.join(timeout=10)
        cache.get_template("t", "email")
    messages = [r.getMessage() for r in crm_logs.records if r.levelno >= logging.WARNING]
    assert sum("saturated" in m for m in messages) == 1
    assert not any("unavailable" in m or "reachable again" in m for m in messages)
