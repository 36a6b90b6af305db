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
from crmcache.testing import RedisServer
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
    """A pool full of a call stuck on Redis (a BLPOP) logs one saturation line, blaming
    the slow call, never "Redis unavailable" or a recovery."""
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
    assert sum("Redis slow or hung" in m for m in messages) == 1
    assert not any("unavailable" in m or "reachable again" in m for m in messages)


def saturation_lines(crm_logs: pytest.LogCaptureFixture) -> tuple[list[str], list[str]]:
    """The saturation warnings logged: (blaming a slow or hung Redis, blaming the pool)."""
    messages = [r.getMessage() for r in crm_logs.records if r.levelno == logging.WARNING]
    hung = [m for m in messages if m.startswith("Redis slow or hung during ")]
    small = [m for m in messages if m.startswith("connection pool saturated during ")]
    return hung, small


def test_saturation_by_a_paused_redis_blames_redis(
    own_server: RedisServer, crm_logs: pytest.LogCaptureFixture
) -> None:
    """Redis paused (SIGSTOP) while calls hold every connection: the caller left waiting
    is told Redis is slow or hung, not that the pool is too small."""
    with CRMCacheManager(
        redis_url=own_server.url,
        max_connections=2,
        pool_timeout=0.2,
        socket_timeout=10,
        pipelining=False,
    ) as cache:
        transport = cache._transport
        assert transport is not None
        cache.set_template("t", "email", "x")  # connected
        own_server.pause_process()
        holders = [
            threading.Thread(target=cache.get_template, args=("t", "email")) for _ in range(2)
        ]
        try:
            for holder in holders:
                holder.start()
            poll(lambda: transport.accounting().slots_held == 2, what="both connections held")
            assert cache.get_template("t", "email") is None  # waited pool_timeout, degraded
        finally:
            own_server.resume_process()
            for holder in holders:
                holder.join(timeout=15)
    hung, small = saturation_lines(crm_logs)
    assert len(hung) == 1, hung
    assert "all 2 pooled connections are held by calls waiting for its replies" in hung[0]
    assert "none answered in" in hung[0]
    assert "larger max_connections would not help" in hung[0]
    assert small == []


def test_saturation_by_a_small_pool_blames_the_pool(
    own_server: RedisServer, crm_logs: pytest.LogCaptureFixture
) -> None:
    """One connection for 96 busy threads on a healthy Redis: callers give up waiting,
    and the log says the pool is too small (calls are quick), never that Redis hangs."""
    with CRMCacheManager(
        redis_url=own_server.url,
        max_connections=1,
        pool_timeout=0.02,
        socket_timeout=10,
        pipelining=False,
    ) as cache:
        # Each call reads 800 KiB: quick (about a millisecond, so calls give their
        # connection back during any one wait), long enough that 96 callers queue well
        # past the pool timeout.
        names = [(f"t{i}", "email") for i in range(40)]
        assert cache.set_templates(dict.fromkeys(names, "x" * 20_480))
        failed = threading.Event()

        def worker() -> None:
            for _ in range(100):
                if None in cache.get_templates(names).values():
                    failed.set()  # a call degraded: the pool was saturated
                if failed.is_set():
                    return

        threads = [threading.Thread(target=worker) for _ in range(96)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert failed.is_set(), "the pool never saturated"
        assert cache.get_stats().counters["reads_failed"] > 0
    hung, small = saturation_lines(crm_logs)
    assert hung == []
    assert len(small) == 1, small
    assert "the pool is too small for this load" in small[0]
    assert "consider a larger max_connections" in small[0]
    assert "1 connection(s), each call holding one about" in small[0]


@pytest.mark.single_only
def test_a_connection_busy_during_a_primary_switch_is_not_used_again(
    redis_url: str, raw: redis.Redis
) -> None:
    """``drop_idle`` (a Sentinel primary switch) cannot close a connection a call holds.
    That connection may point at the former primary: when its call returns it, the next
    call must not use it (a replayed invalidation sent there would be lost)."""
    lean = make_pool(redis_url, size=1)
    try:
        before = lean.execute("CLIENT", "ID")
        blocked = threading.Thread(target=lambda: lean.execute("BLPOP", "switch-list", 5))
        blocked.start()
        wait_blocked(raw, 1)
        assert lean.drop_idle(lambda conn: False) == 0  # the only connection is busy
        raw.lpush("switch-list", "x")
        blocked.join(10)
        after = lean.execute("CLIENT", "ID")
        assert after != before  # a new connection, not the one from before the switch
        poll(
            lambda: before not in [int(c["id"]) for c in raw.client_list()],
            what="the connection from before the switch closed",
        )
        assert lean.accounting().created == 1
    finally:
        lean.close(0)
