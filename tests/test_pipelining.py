"""Auto-pipelining (``crmcache._mux``), the async facade's default data path: concurrent
calls share a few connections and are written together once per event-loop turn.

On real servers: every caller gets its own reply through thousands of random
cancellations and timeouts; commands go out in far fewer writes than calls; a hung
server fails the calls within their deadline and a new connection serves the next ones;
a restart is reconnected; scripts reload; the lean pool stays selectable. The rest of the
suite runs on it too (``pytest --facade=async``). The sync facade's opt-in twin
(``crmcache._mux_sync``) is tested in test_pipelining_sync.py."""

from __future__ import annotations

import asyncio
import random

import pytest

from crmcache import AsyncCRMCacheManager, ConfigurationError, CRMCacheManager
from crmcache._mux import AsyncMuxNodeTransport, AsyncMuxPool
from crmcache._sync.manager import CRMCacheManager as SyncCRMCacheManager
from crmcache.testing import RedisServer
from helpers import apoll, prefs

pytestmark = pytest.mark.sync_only  # async-native tests: run once, in the default run

KEYS = 200


def mux_of(cache: AsyncCRMCacheManager) -> AsyncMuxPool:
    transport = cache._transport
    assert isinstance(transport, AsyncMuxNodeTransport)
    return transport


async def seeded(cache: AsyncCRMCacheManager) -> None:
    for i in range(KEYS):
        assert await cache.set_template(f"t{i}", "email", f"v{i}") is True
        assert await cache.set_client_preferences(prefs(i + 1, client_id=f"c{i}")) is True


def test_it_is_the_async_default_and_the_pool_stays_selectable(own_server: RedisServer) -> None:
    async def main() -> None:
        async with AsyncCRMCacheManager(redis_url=own_server.url) as piped:
            assert isinstance(piped._transport, AsyncMuxNodeTransport)
            assert piped.settings.pipeline_connections == 1
        async with AsyncCRMCacheManager(redis_url=own_server.url, pipelining=False) as pooled:
            assert not isinstance(pooled._transport, AsyncMuxPool)
            assert await pooled.set_template("a", "sms", "x") is True

    asyncio.run(main())


def test_the_settings_are_checked_by_name() -> None:
    with pytest.raises(TypeError, match="pipelining must be a bool"):
        CRMCacheManager(redis_url="redis://127.0.0.1:1/0", pipelining="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="pipeline_connections"):
        AsyncCRMCacheManager(redis_url="redis://127.0.0.1:1/0", pipeline_connections=0)
    with pytest.raises(ConfigurationError, match="at most 64"):
        SyncCRMCacheManager(redis_url="redis://127.0.0.1:1/0", pipeline_connections=65)


def test_concurrent_calls_share_writes(own_server: RedisServer) -> None:
    """1,000 concurrent template reads (on their own connection) go out in a few writes,
    not 1,000."""

    async def main() -> None:
        async with AsyncCRMCacheManager(redis_url=own_server.url) as cache:
            await seeded(cache)
            mux = mux_of(cache)
            writes, commands = mux.writes, mux.commands
            results = await asyncio.gather(
                *[cache.get_template(f"t{i % KEYS}", "email") for i in range(1000)]
            )
            assert results == [f"v{i % KEYS}" for i in range(1000)]
            assert mux.commands - commands == 1000
            assert mux.writes - writes <= 20, (mux.writes - writes, mux.commands - commands)
            assert mux.accounting().created == 2

    asyncio.run(main())


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_cancelled_and_timed_out_callers_never_get_or_leave_a_wrong_reply(
    own_server: RedisServer, seed: int
) -> None:
    """Thousands of calls on shared connections, a random share cancelled before they
    run, at the next turn or a few milliseconds in, others under ``asyncio.timeout`` of a
    random budget: every call that completes got its own key's value (what
    CVE-2023-28858/28859 broke), nothing stays in flight, and the next calls are served."""
    rng = random.Random(seed)

    async def one(i: int) -> None:
        kind = i % 3
        if kind == 0:
            assert await cache_ref[0].get_template(f"t{i % KEYS}", "email") == f"v{i % KEYS}"
        elif kind == 1:
            got = await cache_ref[0].get_client_preferences(f"c{i % KEYS}")
            assert got is not None
            assert got.client_id == f"c{i % KEYS}"
        else:
            result = await cache_ref[0].check_rate_limit(f"api-{i % 7}", 10**9, 60)
            assert result.allowed
            assert not result.degraded

    async def bounded(i: int, budget: float) -> None:
        try:
            async with asyncio.timeout(budget):
                await one(i)
        except TimeoutError:
            pass

    cache_ref: list[AsyncCRMCacheManager] = []

    async def main() -> None:
        async with AsyncCRMCacheManager(redis_url=own_server.url) as cache:
            cache_ref.append(cache)
            await seeded(cache)
            loop = asyncio.get_running_loop()
            completed = cancelled = 0
            for _ in range(10):  # waves of 300
                tasks = []
                for _ in range(300):
                    n = rng.randrange(1_000_000)
                    if rng.random() < 0.25:
                        tasks.append(asyncio.ensure_future(bounded(n, rng.uniform(0, 0.004))))
                        continue
                    task = asyncio.ensure_future(one(n))
                    mode = rng.randrange(4)
                    if mode == 1:
                        task.cancel()
                    elif mode == 2:
                        loop.call_soon(task.cancel)
                    elif mode == 3:
                        loop.call_later(rng.uniform(0, 0.003), task.cancel)
                    tasks.append(task)
                await asyncio.wait(tasks)
                for task in tasks:
                    if task.cancelled():
                        cancelled += 1
                    else:
                        task.result()  # a wrong value or an exception fails here
                        completed += 1
            assert cancelled > 300
            assert completed > 1000
            mux = mux_of(cache)
            await apoll(lambda: mux.accounting().slots_held == 0, what="nothing in flight")
            stats = await cache.get_stats()
            assert stats.counters["redis_errors"] == 0
            assert stats.counters["protocol_errors"] == 0
            assert stats.counters["reads_failed"] == 0
            assert mux.discarded == 0  # no connection had to be thrown away
            for i in range(100):
                assert await cache.get_template(f"t{i}", "email") == f"v{i}"
            assert await cache.health_check() is True

    asyncio.run(main())


def test_a_hung_server_fails_calls_within_the_deadline_then_recovers(
    own_server: RedisServer,
) -> None:
    async def main() -> None:
        async with AsyncCRMCacheManager(
            redis_url=own_server.url, socket_timeout=0.3, socket_connect_timeout=0.3
        ) as cache:
            await seeded(cache)
            # Template reads have a connection of their own: open it before the hang.
            assert await cache.get_template("t0", "email") == "v0"
            own_server.pause_process()
            try:
                loop = asyncio.get_running_loop()
                started = loop.time()
                results = await asyncio.gather(
                    *[cache.get_template(f"t{i}", "email") for i in range(50)]
                )
                waited = loop.time() - started
            finally:
                own_server.resume_process()
            assert results == [None] * 50  # misses, never an exception
            assert waited < 5.0  # bounded by the deadline, not stuck (generous: shared box)
            stats = await cache.get_stats()
            assert stats.counters["reads_failed"] == 50
            # The breaker opened; its probe, a second later, finds Redis back.
            for _ in range(200):
                if await cache.get_template("t1", "email") == "v1":
                    break
                await asyncio.sleep(0.02)
            assert await cache.get_template("t2", "email") == "v2"
            assert mux_of(cache).discarded >= 1

    asyncio.run(main())


def test_a_restarted_redis_is_reconnected_without_a_failed_call(own_server: RedisServer) -> None:
    async def main() -> None:
        async with AsyncCRMCacheManager(redis_url=own_server.url) as cache:
            assert await cache.set_template("a", "email", "x") is True
            own_server.restart()
            # The server came back empty: a miss, then a write and a hit, none failed.
            assert await cache.get_template("a", "email") is None
            assert await cache.set_template("a", "email", "y") is True
            assert await cache.get_template("a", "email") == "y"
            # Scripts were flushed with the restart: reloaded on NOSCRIPT.
            result = await cache.check_rate_limit("sms", 5, 60)
            assert result.allowed
            assert not result.degraded
            stats = await cache.get_stats()
            assert stats.counters["redis_errors"] == 0

    asyncio.run(main())


def test_a_script_first_after_a_restart_is_retried_then_reloaded(
    own_server: RedisServer,
) -> None:
    """The script call queued straight on a shared connection (every rate-limit check)
    meets the dropped connection first: retried once on a new one, where the restarted
    Redis answers NOSCRIPT, then loaded and run. Nothing degrades or fails."""

    async def main() -> None:
        async with AsyncCRMCacheManager(redis_url=own_server.url) as cache:
            assert (await cache.check_rate_limit("sms", 5, 60)).current_count == 1
            own_server.restart()
            result = await cache.check_rate_limit("sms", 5, 60)
            assert result.allowed
            assert not result.degraded
            assert result.current_count == 1  # a new server: a new window
            stats = await cache.get_stats()
            assert stats.counters["redis_errors"] == 0
            assert stats.counters["rate_limit_degraded"] == 0
            assert mux_of(cache).discarded >= 1  # the dropped connection was replaced

    asyncio.run(main())


def test_one_watchdog_per_connection_however_bursty(own_server: RedisServer) -> None:
    """Bursts of calls separated by idle moments keep at most one deadline timer per
    shared connection (not one per burst, which would pile up for socket_timeout)."""

    async def main() -> None:
        async with AsyncCRMCacheManager(redis_url=own_server.url) as cache:
            await seeded(cache)
            loop = asyncio.get_running_loop()
            for burst in range(50):
                await asyncio.gather(
                    *[cache.get_template(f"t{(burst + i) % KEYS}", "email") for i in range(20)]
                )
            scheduled = getattr(loop, "_scheduled", [])
            watchdogs = [
                handle
                for handle in scheduled
                if not handle.cancelled() and getattr(handle._callback, "__name__", "") == "_check"
            ]
            # The calls' connections and template reads' own.
            assert len(watchdogs) <= cache.settings.pipeline_connections + 1

    asyncio.run(main())


def test_template_reads_take_a_connection_of_their_own(own_server: RedisServer) -> None:
    """Head-of-line: a large template's transfer never sits in front of the small calls'
    replies. Template reads (GET and MGET) are queued on a connection of their own; the
    preference reads and rate-limit checks sent in the same turn never share it."""
    big = "x" * (1024 * 1024)

    async def main() -> None:
        async with AsyncCRMCacheManager(redis_url=own_server.url) as cache:
            await seeded(cache)
            assert await cache.set_template("big", "email", big) is True
            assert await cache.get_template("t0", "email") == "v0"  # opens it
            calls = [
                cache.get_template("big", "email"),
                cache.get_templates([("big", "email"), ("t1", "email")]),
                *[cache.get_client_preferences(f"c{i}") for i in range(20)],
                cache.check_rate_limit("sms", 100, 60),
            ]
            tasks = [asyncio.create_task(call) for call in calls]
            await asyncio.sleep(0)  # every task has queued its command; none is written
            mux = mux_of(cache)
            large, small = mux._muxes[-1], mux._muxes[0]
            assert large is not None
            assert small is not None
            assert large is not small
            assert [pending[1][0] for pending in large.pending] == ["GET", "MGET"]
            assert [pending[1][0] for pending in small.pending] == ["GET"] * 20 + ["EVALSHA"]
            results = await asyncio.gather(*tasks)
            assert results[0] == big
            assert results[1] == {("big", "email"): big, ("t1", "email"): "v1"}
            assert results[2:22] == [prefs(i + 1, client_id=f"c{i}") for i in range(20)]
            assert results[22].allowed
            assert len(mux.live_connections()) == 2

    asyncio.run(main())
