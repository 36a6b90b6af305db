"""The async facade used natively: asyncio tasks, async with, aclose, async primitives.

The rest of the suite runs against the async facade too (``pytest --facade=async``); these
tests cover what only asyncio code can show.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from crmcache import (
    AsyncCRMCacheManager,
    ClientPreferences,
    close_async_cache_managers,
    get_async_cache_manager,
)
from crmcache._async.primitives import Event, FairSlots, sleep, spawn
from crmcache.repository import AsyncCommunicationRepository
from crmcache.store import SQLPreferenceStore, ThreadedAsyncStore
from crmcache.testing import free_loopback_port


def test_async_with_round_trip(redis_url: str, raw: redis.Redis) -> None:
    """`async with` opens, every call awaits, aclose() runs on exit."""

    async def main() -> None:
        async with AsyncCRMCacheManager(redis_url=redis_url) as cache:
            prefs = ClientPreferences(client_id="a1", version=2)
            assert await cache.set_client_preferences(prefs)
            assert await cache.get_client_preferences("a1") == prefs
            assert await cache.set_template("welcome", "email", "hi")
            assert await cache.get_templates([("welcome", "email")]) == {
                ("welcome", "email"): "hi"
            }
            allowed, count = await cache.check_rate_limit("api", 5, 60)
            assert (allowed, count) == (True, 1)
            assert await cache.health_check() is True
            stats = await cache.get_cache_stats()
            assert stats["total_keys"] == 3
        assert cache.enabled is False
        assert await cache.get_template("welcome", "email") is None

    asyncio.run(main())
    assert raw.get("crm:template:email:welcome") == b"hi"


def test_hundred_tasks_share_ten_connections(redis_url: str, raw: redis.Redis) -> None:
    """100 concurrent tasks on max_connections=10: every call served, at most 10 opened."""

    async def main() -> None:
        async with AsyncCRMCacheManager(redis_url=redis_url, max_connections=10) as cache:
            await cache.set_template("t", "sms", "x")

            async def worker() -> int:
                return sum([await cache.get_template("t", "sms") == "x" for _ in range(20)])

            results = await asyncio.gather(*(worker() for _ in range(100)))
            assert sum(results) == 2000
            stats = await cache.get_stats()
            assert stats.counters["reads_failed"] == 0
            assert stats.connection_pool.created <= 10

    asyncio.run(main())


def test_rate_limit_exact_across_tasks(redis_url: str, raw: redis.Redis) -> None:
    """200 tasks x 10 calls with limit=1000 allow exactly 1000."""

    async def main() -> int:
        async with AsyncCRMCacheManager(redis_url=redis_url) as cache:

            async def worker() -> int:
                return sum(
                    [(await cache.check_rate_limit("shared", 1000, 60)).allowed for _ in range(10)]
                )

            return sum(await asyncio.gather(*(worker() for _ in range(200))))

    assert asyncio.run(main()) == 1000


def test_down_redis_degrades_without_raising() -> None:
    """With nothing listening, async reads miss and writes report False."""
    url = f"redis://127.0.0.1:{free_loopback_port()}/0"

    async def main() -> None:
        async with AsyncCRMCacheManager(redis_url=url, socket_connect_timeout=0.3) as cache:
            assert await cache.get_client_preferences("c") is None
            assert await cache.set_template("t", "email", "x") is False
            result = await cache.check_rate_limit("api", 5)
            assert (result.allowed, result.degraded) == (True, True)
            assert await cache.health_check() is False

    asyncio.run(main())


def test_async_registry(redis_url: str) -> None:
    """get_async_cache_manager shares one manager per URL; closing replaces it."""

    async def main() -> None:
        first = get_async_cache_manager(redis_url)
        assert get_async_cache_manager(redis_url) is first
        await close_async_cache_managers()
        assert first.enabled is False
        assert get_async_cache_manager(redis_url) is not first
        await close_async_cache_managers()

    asyncio.run(main())


def test_async_repository_single_flight(
    redis_url: str, raw: redis.Redis, tmp_path: object
) -> None:
    """50 tasks missing one client at once cause one database load."""
    store = SQLPreferenceStore()
    store.save_preferences(ClientPreferences(client_id="hot"))

    async def main() -> None:
        async with AsyncCRMCacheManager(redis_url=redis_url) as cache:
            repo = AsyncCommunicationRepository(ThreadedAsyncStore(store), cache)
            rows = await asyncio.gather(*(repo.get_client_preferences("hot") for _ in range(50)))
            assert {r.version for r in rows if r is not None} == {1}
            assert store.loads == 1
            assert repo.stats.single_flight_joins == 49
            saved = await repo.save_client_preferences(
                rows[0].model_copy(update={"language": "fr"})
            )  # type: ignore[union-attr]
            assert (await repo.get_client_preferences("hot")) == saved
            assert store.loads == 1  # the save filled the cache

    asyncio.run(main())
    store.close()


def test_fair_slots_hand_over_in_order() -> None:
    """A freed async slot goes to the first waiting task, not to a newcomer."""

    async def main() -> None:
        slots = FairSlots(1)
        assert await slots.acquire(0)
        order: list[int] = []

        async def waiter(n: int) -> None:
            assert await slots.acquire(5)
            order.append(n)
            slots.release()

        tasks = [asyncio.create_task(waiter(n)) for n in range(3)]
        while slots.waiting < 3:
            await asyncio.sleep(0)
        slots.release()
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2]
        assert await slots.acquire(0)
        assert await slots.acquire(0.01) is False
        assert slots.waiting == 0

    asyncio.run(main())


def test_event_and_background_jobs() -> None:
    """Event.wait honours its timeout; spawned jobs run and can be joined."""

    async def main() -> None:
        event = Event()
        started = time.monotonic()
        assert await event.wait(0.05) is False
        assert time.monotonic() - started >= 0.04

        async def job() -> None:
            await sleep(0.01)
            event.set()

        handle = spawn(job, "test-job")
        await handle.join(5)
        assert not handle.is_alive()
        assert await event.wait(0) is True

    asyncio.run(main())


@pytest.mark.parametrize("bad", ["", 5])
def test_async_validation(redis_url: str, bad: object) -> None:
    """Bad arguments raise at the call, before any I/O, exactly like the sync facade."""

    async def main() -> None:
        async with AsyncCRMCacheManager(redis_url=redis_url) as cache:
            with pytest.raises((TypeError, ValueError), match="client_id"):
                await cache.get_client_preferences(bad)  # type: ignore[arg-type]

    asyncio.run(main())


def test_async_near_cache(redis_url: str, raw: redis.Redis) -> None:
    """The async listener task keeps the near cache coherent with other clients' writes."""

    async def main() -> None:
        async with AsyncCRMCacheManager(redis_url=redis_url, near_cache=True) as cache:
            near = cache._near
            assert near is not None
            await cache.get_template("warm-up", "email")
            deadline = time.monotonic() + 5
            while not near.live:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)
            raw.set("crm:template:sms:t", "old")
            while (
                await cache.get_template("t", "sms") != "old"
                or near.get("crm:template:sms:t") != "old"
            ):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)
            raw.set("crm:template:sms:t", "new")
            while await cache.get_template("t", "sms") != "new":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)
            assert (await cache.get_stats()).near_cache["hits"] >= 1
        assert not near.live

    asyncio.run(main())
