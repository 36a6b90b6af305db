"""Cancellation is an input: cancelled awaits (and, sync, KeyboardInterrupt) leak nothing.

Every test here cancels calls of the async facade against a real Redis (or interrupts the
sync one with a signal) and then checks where every slot, connection, probe, flight and
invalidation went: nothing held, nothing stuck, no reply delivered to the wrong caller,
and the next calls served at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis

from crmcache import AsyncCRMCacheManager, BreakerState, ClientPreferences
from crmcache._guard import FAILED
from crmcache._mux import AsyncMuxPool
from crmcache._muxcore import MuxBooks
from crmcache._sync.manager import CRMCacheManager as SyncCRMCacheManager
from crmcache.repository import AsyncCommunicationRepository
from crmcache.testing import RedisServer
from helpers import apoll, poll

KEYS = 64


def assert_at_rest(cache: Any) -> None:
    """No call is running: every slot and connection of the data path is accounted for,
    and redis-py's admin pools hold nothing either."""
    books = cache._transport.accounting()
    assert books.slots_held == 0, books
    assert books.checked_out == 0, books
    assert books.waiting == 0, books
    assert books.created == books.idle, books
    shared = isinstance(cache._transport, MuxBooks)  # auto-pipelined: shared connections
    settings = cache.settings
    assert books.created <= (
        # Shared: the calls' connections and, for template reads, one more.
        settings.pipeline_connections + 1 if shared else settings.max_connections
    ), books
    for pool in (cache._transport.admin, cache._transport.health):
        books = pool.accounting()
        assert (books.slots_held, books.checked_out, books.waiting) == (0, 0, 0), books
        assert books.created == books.idle, books
    assert cache._breaker.state is BreakerState.CLOSED


def template(i: int) -> tuple[str, str]:
    """The i-th template reference of the storm."""
    return f"t{i}", "email"


def prefs(i: int) -> ClientPreferences:
    """The i-th client's preferences; each value names its own client."""
    return ClientPreferences(client_id=f"c{i}", version=i + 1, language=f"l{i}")


class MemoryStore:
    """An in-memory AsyncPreferenceStore whose loads can be held at a gate."""

    def __init__(self, rows: dict[str, ClientPreferences]) -> None:
        self.rows = dict(rows)
        self.loads = 0
        self.gate: asyncio.Event | None = None
        self.entered: asyncio.Event | None = None

    async def load_preferences(self, client_id: str) -> ClientPreferences | None:
        """Return the row, after the gate opens (if one is set)."""
        self.loads += 1
        if self.entered is not None:
            self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        return self.rows.get(client_id)

    async def save_preferences(self, preferences: ClientPreferences) -> ClientPreferences:
        """Store a new version of the row."""
        saved = preferences.model_copy(update={"version": preferences.version + 1})
        self.rows[saved.client_id] = saved
        return saved


async def seed(cache: AsyncCRMCacheManager) -> None:
    """Every key the storm reads holds a value that names its key."""
    assert await cache.set_templates({template(i): f"v{i}" for i in range(KEYS)})
    for i in range(KEYS):
        assert await cache.set_client_preferences(prefs(i))


def storm_calls(  # noqa: PLR0911 - one branch per public method
    cache: AsyncCRMCacheManager, repo: AsyncCommunicationRepository, rng: random.Random
) -> tuple[Callable[[], Awaitable[object]], Callable[[object], bool]]:
    """One random public call and the check its result must pass if it completes."""
    i, j = rng.randrange(KEYS), rng.randrange(KEYS)
    choice = rng.randrange(13)
    if choice == 0:
        return lambda: cache.get_template(*template(i)), lambda r: r == f"v{i}"
    if choice == 1:
        return (
            lambda: cache.get_templates([template(i), template(j)]),
            lambda r: r == {template(i): f"v{i}", template(j): f"v{j}"},
        )
    if choice == 2:
        return lambda: cache.get_client_preferences(f"c{i}"), lambda r: r == prefs(i)
    if choice == 3:
        return lambda: repo.get_client_preferences(f"c{i}"), lambda r: r == prefs(i)
    if choice == 4:
        return lambda: cache.set_template(*template(i), f"v{i}"), lambda r: r is True
    if choice == 5:
        return lambda: cache.set_client_preferences(prefs(i)), lambda r: r is True
    if choice == 6:
        return (
            lambda: cache.set_templates({template(i): f"v{i}"}),
            lambda r: r is True,
        )
    if choice == 7:
        return (
            lambda: cache.check_rate_limit(f"api{i}", 10**9, 60),
            lambda r: r.allowed and not r.degraded,  # type: ignore[attr-defined]
        )
    if choice == 8:
        return cache.health_check, lambda r: r is True
    if choice == 9:
        return cache.get_cache_stats, lambda r: r["enabled"] and r["total_keys"] is not None  # type: ignore[index]

    async def lease() -> object:
        held = await cache.acquire_load_lease(f"lease{i}", ttl=5)
        await held.release()
        return held.state.value

    if choice == 10:
        return lease, lambda r: r in {"acquired", "busy"}
    if choice == 11:
        # Invalidations touch keys nobody reads in the storm, so reads stay exact.
        return lambda: cache.invalidate_template(f"gone{i}", "sms"), lambda r: r is True
    return (
        lambda: cache.invalidate_client_preferences(f"gone{i}", version=1),
        lambda r: r is True,
    )


async def run_storm(
    cache: AsyncCRMCacheManager,
    repo: AsyncCommunicationRepository,
    rng: random.Random,
    *,
    calls: int,
    wave: int,
    deadline_style: bool,
) -> dict[str, int]:
    """``calls`` random calls in concurrent waves, a random share of them cancelled at a
    random moment (before the write, between write and reply, waiting for a slot).

    Returns counts of completed and cancelled calls; fails on any wrong result."""
    counts = {"completed": 0, "cancelled": 0}
    max_slots = cache.settings.max_connections
    lean = cache._transport
    assert lean is not None

    async def one(call: Callable[[], Awaitable[object]], check: Callable[[object], bool]) -> None:
        if deadline_style:
            # The FastAPI pattern: the handler's budget is an asyncio.timeout.
            try:
                async with asyncio.timeout(rng.choice([0.0, 0.0002, 0.001, 0.003, 5.0, 5.0])):
                    result = await call()
            except TimeoutError:
                counts["cancelled"] += 1
                return
        else:
            result = await call()
        assert check(result), result
        counts["completed"] += 1

    for _ in range(calls // wave):
        tasks = []
        for _ in range(wave):
            call, check = storm_calls(cache, repo, rng)
            tasks.append(asyncio.ensure_future(one(call, check)))
        if not deadline_style:
            loop = asyncio.get_running_loop()
            for task in tasks:
                mode = rng.randrange(4)
                if mode == 1:
                    task.cancel()  # before it ever ran
                elif mode == 2:
                    loop.call_later(rng.uniform(0, 0.003), task.cancel)
                elif mode == 3:
                    loop.call_soon(task.cancel)
        while not all(t.done() for t in tasks):
            books = lean.accounting()
            # The invariant while calls run: a connection is only ever out under a slot
            # (shared connections have no slots: any number of calls may be in flight).
            assert books.checked_out <= books.slots_held, books
            assert isinstance(lean, AsyncMuxPool) or books.slots_held <= max_slots, books
            await asyncio.sleep(0.0005)
        for task in tasks:
            if task.cancelled():
                counts["cancelled"] += 1
            else:
                task.result()  # a wrong value or any exception fails here
    return counts


@pytest.mark.parametrize("pipelining", [False, True], ids=["pool", "pipelined"])
@pytest.mark.parametrize(
    ("seed_value", "near_cache", "deadline_style"),
    [(1, False, False), (2, False, False), (3, True, False), (7, False, True)],
    ids=["cancel-1", "cancel-2", "cancel-near", "asyncio-timeout"],
)
def test_cancellation_storm_leaks_nothing(
    redis_url: str,
    raw: redis.Redis,
    *,
    seed_value: int,
    near_cache: bool,
    deadline_style: bool,
    pipelining: bool,
) -> None:
    """Thousands of random calls, a random share cancelled at random moments (or, in the
    FastAPI pattern, each inside ``asyncio.timeout`` of a random budget): every completed
    call got its own key's value; afterwards nothing is held, the manager is healthy, and
    the next 100 calls are served at once (no wait for a slot, no failure)."""
    rng = random.Random(seed_value)

    async def main() -> None:
        async with AsyncCRMCacheManager(
            redis_url=redis_url,
            max_connections=4,
            pool_timeout=10,
            near_cache=near_cache,
            pipelining=pipelining,
        ) as cache:
            await seed(cache)
            repo = AsyncCommunicationRepository(
                MemoryStore({f"c{i}": prefs(i) for i in range(KEYS)}), cache
            )
            counts = await run_storm(
                cache, repo, rng, calls=2000, wave=200, deadline_style=deadline_style
            )
            assert counts["cancelled"] > 200, counts
            # How many complete depends on how many loop turns a call takes before its
            # cancellation lands (the schedule is seeded): a fifth shows both kinds ran.
            assert counts["completed"] > 400, counts
            await apoll(lambda: cache._transport.accounting().slots_held == 0)  # type: ignore[union-attr]
            assert_at_rest(cache)
            assert not repo._flights
            stats = await cache.get_stats()
            assert stats.counters["reads_failed"] == 0
            assert stats.counters["redis_errors"] == 0
            assert stats.counters["unexpected_errors"] == 0
            assert stats.counters["cancelled"] > 0
            before = cache._transport.accounting()  # type: ignore[union-attr]
            for n in range(100):
                i = n % KEYS
                assert await cache.get_template(*template(i)) == f"v{i}"
                assert await cache.get_client_preferences(f"c{i}") == prefs(i)
            after = cache._transport.accounting()  # type: ignore[union-attr]
            assert after.waits == before.waits  # nobody queued for a slot
            assert after.timeouts == 0
            assert (await cache.get_stats()).counters["reads_failed"] == 0
            assert await cache.health_check() is True
            assert await cache.set_template("after", "sms", "ok") is True
            result = await cache.check_rate_limit("after", 5, 60)
            assert result.allowed
            assert not result.degraded

    asyncio.run(main())


def test_issue_reproducer_next_call_is_served(redis_url: str, raw: redis.Redis) -> None:
    """8 calls cancelled on a 4-connection pool: the next call is a hit, at once, and the
    stats say nothing is in use (it used to wait pool_timeout and miss, for good)."""

    async def main() -> None:
        async with AsyncCRMCacheManager(redis_url=redis_url, max_connections=4) as cache:
            await cache.set_template("k", "email", "v")
            tasks = [asyncio.ensure_future(cache.get_template("k", "email")) for _ in range(8)]
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for _ in range(20):
                assert await cache.get_template("k", "email") == "v"
            books = cache._transport.accounting()  # type: ignore[union-attr]
            assert books.timeouts == 0
            assert_at_rest(cache)
            stats = await cache.get_stats()
            assert stats.connection_pool.in_use == 0
            assert stats.counters["reads_failed"] == 0

    asyncio.run(main())


def test_cancelled_slot_waiters_take_no_slot(redis_url: str, raw: redis.Redis) -> None:
    """Callers cancelled while they wait for a slot leave the slot count whole, including
    one cancelled just as a slot was handed to it."""

    async def main() -> None:
        async with AsyncCRMCacheManager(
            redis_url=redis_url, max_connections=1, pool_timeout=10, pipelining=False
        ) as cache:
            lean = cache._transport
            assert lean is not None
            holder = asyncio.ensure_future(lean.execute("BLPOP", "wake", 10))
            await apoll(lambda: lean.accounting().checked_out == 1)
            waiters = [asyncio.ensure_future(cache.get_template("w", "sms")) for _ in range(5)]
            await apoll(lambda: lean.accounting().waiting == 5)
            raw.lpush("wake", "x")
            await holder  # its release hands the slot to the first waiter ...
            for task in waiters:
                task.cancel()  # ... which is cancelled before it resumes
            await asyncio.gather(*waiters, return_exceptions=True)
            assert lean.accounting().slots_held == 0
            assert_at_rest(cache)
            assert await cache.set_template("w", "sms", "ok") is True

    asyncio.run(main())


@pytest.mark.parametrize("pipelining", [False, True], ids=["pool", "pipelined"])
def test_cancel_between_write_and_reply_never_misdelivers(
    own_server: RedisServer, pipelining: bool
) -> None:
    """A GET cancelled after it was written (Redis stopped, so its reply is still to come)
    closes its pooled connection, or, shared, leaves its reply to be dropped in its turn:
    the next caller reads its own reply, not the cancelled one's."""

    async def main() -> None:
        async with AsyncCRMCacheManager(
            redis_url=own_server.url,
            max_connections=1,
            socket_timeout=5,
            pipelining=pipelining,
            pipeline_connections=1,
        ) as cache:
            await cache.set_template("a", "email", "value-of-a")
            await cache.set_template("b", "email", "value-of-b")
            own_server.pause_process()
            try:
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.2):
                        await cache.get_template("a", "email")
            finally:
                own_server.resume_process()
            assert await cache.get_template("b", "email") == "value-of-b"
            books = cache._transport.accounting()  # type: ignore[union-attr]
            assert books.discarded == (0 if pipelining else 1)
            assert_at_rest(cache)
            # Many times over, at random moments in the round trip.
            rng = random.Random(11)
            for n in range(200):
                key = "a" if n % 2 else "b"
                try:
                    async with asyncio.timeout(rng.uniform(0, 0.0004)):
                        await cache.get_template(key, "email")
                except TimeoutError:
                    pass
                other = "b" if key == "a" else "a"
                assert await cache.get_template(other, "email") == f"value-of-{other}"
            assert_at_rest(cache)

    asyncio.run(main())


def test_cancelled_half_open_probe_does_not_wedge_the_breaker(own_server: RedisServer) -> None:
    """The breaker's half-open probe cancelled by ``wait_for`` (Redis stopped) leaves the
    breaker able to probe again: once Redis answers, writes and rate limits work (they
    used to fail for good while health_check said True)."""

    async def main() -> None:
        async with AsyncCRMCacheManager(
            redis_url=own_server.url, socket_timeout=0.2, socket_connect_timeout=0.2
        ) as cache:
            breaker = cache._breaker
            own_server.pause_process()
            try:
                while breaker.state is not BreakerState.OPEN:
                    assert await cache.get_template("x", "email") is None
                await apoll(lambda: time.monotonic() - breaker._opened_at >= breaker._timeout)
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(cache.get_template("x", "email"), 0.05)
                assert breaker.state is not BreakerState.HALF_OPEN
            finally:
                own_server.resume_process()
            assert await cache.set_template("x", "email", "back") is True
            assert breaker.state is BreakerState.CLOSED
            result = await cache.check_rate_limit("api", 5, 60)
            assert result.allowed
            assert not result.degraded
            assert await cache.health_check() is True

    asyncio.run(main())


def test_unexpected_error_degrades_and_releases_the_probe(
    redis_url: str, raw: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """An error that is neither Redis's nor a cancellation degrades the call (counted,
    logged once at ERROR with its traceback) and does not leave a probe taken."""
    caplog.set_level(logging.ERROR, logger="crmcache")

    async def boom() -> None:
        raise RuntimeError("a bug in a reply decoder")

    async def main() -> None:
        async with AsyncCRMCacheManager(redis_url=redis_url) as cache:
            breaker = cache._breaker
            breaker.state = BreakerState.OPEN
            breaker._opened_at = time.monotonic() - 60
            assert await cache._call("probe", boom) is FAILED
            assert breaker.state is BreakerState.OPEN  # released: the next call probes
            assert await cache.set_template("k", "sms", "v") is True
            assert breaker.state is BreakerState.CLOSED
            stats = await cache.get_stats()
            assert stats.counters["unexpected_errors"] == 1
            assert stats.counters["redis_errors"] == 0

    asyncio.run(main())
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "RuntimeError: a bug in a reply decoder" in errors[0].getMessage()


async def gated_flight(
    cache: AsyncCRMCacheManager, row: ClientPreferences, followers: int
) -> tuple[
    MemoryStore, AsyncCommunicationRepository, asyncio.Future[Any], list[asyncio.Future[Any]]
]:
    """A leader whose database load is held at the store's gate, and ``followers`` tasks
    that joined its flight."""
    store = MemoryStore({row.client_id: row})
    store.gate, store.entered = asyncio.Event(), asyncio.Event()
    repo = AsyncCommunicationRepository(store, cache)
    leader = asyncio.ensure_future(repo.get_client_preferences(row.client_id))
    await store.entered.wait()
    joined = [
        asyncio.ensure_future(repo.get_client_preferences(row.client_id)) for _ in range(followers)
    ]
    await apoll(lambda: repo.stats.single_flight_joins == followers)
    return store, repo, leader, joined


def test_cancelled_single_flight_leader_hands_over(redis_url: str, raw: redis.Redis) -> None:
    """The leader of a single-flight load is cancelled mid-load: its followers are not
    cancelled; one of them loads, all get the row, the lease is released."""

    async def main() -> None:
        async with AsyncCRMCacheManager(redis_url=redis_url) as cache:
            row = ClientPreferences(client_id="hot", version=4)
            store, repo, leader, followers = await gated_flight(cache, row, 10)
            assert store.entered is not None
            assert store.gate is not None
            store.entered.clear()
            held = raw.get("crm:lease:prefs:hot")
            assert held is not None
            leader.cancel()
            with pytest.raises(asyncio.CancelledError):
                await leader
            # The cancelled holder released its lease (a lapse would take lease_ttl): the
            # key is gone, or already held by the follower that took over, under its token.
            assert raw.get("crm:lease:prefs:hot") != held
            await store.entered.wait()  # a follower took over the load
            store.gate.set()
            async with asyncio.timeout(30):  # a follower stuck behind the leader fails here
                assert await asyncio.gather(*followers) == [row] * 10
            assert store.loads == 2
            assert not repo._flights
            assert not raw.exists("crm:lease:prefs:hot")
            assert await cache.get_client_preferences("hot") == row

    asyncio.run(main())


def test_cancelled_followers_leave_the_leader_alone(redis_url: str, raw: redis.Redis) -> None:
    """Followers cancelled while they wait do not disturb the load they joined."""

    async def main() -> None:
        async with AsyncCRMCacheManager(redis_url=redis_url) as cache:
            row = ClientPreferences(client_id="hot", version=2)
            store, repo, leader, followers = await gated_flight(cache, row, 5)
            assert store.gate is not None
            for task in followers[:3]:
                task.cancel()
            store.gate.set()
            assert await leader == row
            results = await asyncio.gather(*followers, return_exceptions=True)
            assert [isinstance(r, asyncio.CancelledError) for r in results] == [True] * 3 + [
                False
            ] * 2
            assert results[3:] == [row, row]
            assert store.loads == 1
            assert not repo._flights

    asyncio.run(main())


def test_cancelled_invalidation_is_replayed(own_server: RedisServer) -> None:
    """An invalidation cancelled before Redis confirmed it is queued and replayed, so the
    old value is not served for the rest of its TTL; so is a save's cache update."""

    async def main() -> None:
        raw = redis.Redis.from_url(own_server.url)
        async with AsyncCRMCacheManager(redis_url=own_server.url, socket_timeout=5) as cache:
            await cache.set_client_preferences(ClientPreferences(client_id="c", version=3))
            own_server.pause_process()
            try:
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.1):
                        await cache.invalidate_client_preferences("c", version=5)
                assert len(cache._replayer.pending) == 1
            finally:
                own_server.resume_process()
            await apoll(lambda: raw.get("crm:prefs:c") == b"T5")
            await apoll(lambda: not cache._replayer.pending)

            store = MemoryStore({"d": ClientPreferences(client_id="d", version=1)})
            repo = AsyncCommunicationRepository(store, cache)
            old = await repo.get_client_preferences("d")
            assert old is not None
            own_server.pause_process()
            try:
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.1):
                        await repo.save_client_preferences(
                            old.model_copy(update={"language": "fr"})
                        )
            finally:
                own_server.resume_process()
            assert store.rows["d"].version == 2  # the database committed
            await apoll(lambda: not cache._replayer.pending)
            assert await cache.get_client_preferences("d") is None  # never the old row
            assert (await repo.get_client_preferences("d")) == store.rows["d"]
        raw.close()

    asyncio.run(main())


def test_aclose_with_calls_in_flight(redis_url: str, raw: redis.Redis) -> None:
    """aclose() while calls run: every call returns a value or a miss (none raises), and
    afterwards no connection is open."""

    async def main() -> None:
        cache = AsyncCRMCacheManager(redis_url=redis_url, max_connections=4)
        await seed(cache)
        calls = [
            asyncio.ensure_future(cache.get_template(*template(i % KEYS))) for i in range(200)
        ]
        await asyncio.sleep(0)
        await cache.aclose()
        results = await asyncio.gather(*calls)
        assert all(r in (None, f"v{i % KEYS}") for i, r in enumerate(results))
        books = cache._transport.accounting()  # type: ignore[union-attr]
        assert (books.created, books.checked_out, books.slots_held) == (0, 0, 0)
        assert await cache.get_template(*template(0)) is None  # closed: a miss

    asyncio.run(main())


def test_cancelled_aclose_still_closes(redis_url: str, raw: redis.Redis) -> None:
    """aclose() cancelled part way closes every connection all the same."""

    async def main() -> None:
        cache = AsyncCRMCacheManager(redis_url=redis_url, max_connections=4)
        await seed(cache)
        assert cache._transport.accounting().created > 0  # type: ignore[union-attr]
        closing = asyncio.ensure_future(cache.aclose())
        await asyncio.sleep(0)
        closing.cancel()
        await asyncio.gather(closing, return_exceptions=True)
        assert cache.enabled is False
        await apoll(lambda: cache._transport.accounting().created == 0)  # type: ignore[union-attr]
        await cache.aclose()  # idempotent

    asyncio.run(main())


# -- the sync facade: KeyboardInterrupt is its cancellation ----------------------------------


@pytest.mark.sync_only
@pytest.mark.parametrize("pipelining", [False, True], ids=["pool", "pipelined"])
def test_keyboard_interrupt_mid_reply_never_misdelivers(
    own_server: RedisServer, interrupt_after: Callable[[float], None], pipelining: bool
) -> None:
    """A sync GET interrupted (KeyboardInterrupt) while its reply is on the way: the lean
    pool closes its connection, the shared connections drop the reply when it comes. The
    next call reads its own reply and nothing stays held."""
    with SyncCRMCacheManager(
        redis_url=own_server.url, max_connections=1, pipelining=pipelining
    ) as cache:
        cache.set_template("a", "email", "value-of-a")
        cache.set_template("b", "email", "value-of-b")
        own_server.pause_process()
        try:
            interrupt_after(0.2)
            with pytest.raises(KeyboardInterrupt):
                cache.get_template("a", "email")
        finally:
            own_server.resume_process()
        assert cache.get_template("b", "email") == "value-of-b"
        transport: Any = cache._transport
        # Pipelined, the interrupted call's late reply comes in on its own connection
        # (the next call went to the other): dropped when it arrives.
        poll(lambda: transport.accounting().slots_held == 0, what="the late reply dropped")
        assert transport.accounting().discarded == (0 if pipelining else 1)
        assert_at_rest(cache)
        assert cache.get_stats().counters["cancelled"] == 1


@pytest.mark.sync_only
def test_keyboard_interrupt_while_waiting_for_a_slot(
    redis_url: str, raw: redis.Redis, interrupt_after: Callable[[float], None]
) -> None:
    """A thread interrupted while it waits for a slot takes none: the pool is whole."""
    with SyncCRMCacheManager(
        redis_url=redis_url, max_connections=1, pool_timeout=10, pipelining=False
    ) as cache:
        lean = cache._transport
        assert lean is not None
        holder = threading.Thread(target=lean.execute, args=("BLPOP", "wake", 10))
        holder.start()
        try:
            poll(lambda: lean.accounting().checked_out == 1)
            interrupt_after(0.2)
            with pytest.raises(KeyboardInterrupt):
                cache.get_template("w", "sms")
            assert lean.accounting().waiting == 0
        finally:
            raw.lpush("wake", "x")
            holder.join(timeout=10)
        assert_at_rest(cache)
        assert cache.set_template("w", "sms", "ok") is True
        assert cache.get_template("w", "sms") == "ok"
        assert lean.accounting().timeouts == 0
