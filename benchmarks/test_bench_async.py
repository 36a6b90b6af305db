"""Async throughput: 100 asyncio tasks sharing one ``AsyncCRMCacheManager``.

The async twin of test_bench_threads.py: 100 tasks on one event loop read pre-filled
client preferences (every call a hit) through one manager with ``max_connections=10``,
so 90 tasks at a time wait for a pooled connection. Its baseline is the sync manager
with 16 threads, as measured by test_bench_threads.py (``test_throughput_crmcache[16]``)
in the same run, with the same total number of calls; ``report.py`` shows both in the
table "async 100 tasks vs sync 16 threads".

Two managers are measured:

* ``async``: remote hits (no near cache), one ``GET`` per call;
* ``async-near``: the same with ``near_cache=True``, every call a near hit, for reference.
  A near hit never awaits anything, so the tasks do not interleave: the figure is the
  near cache's cost per call under asyncio, not a concurrency figure.

Each run is one ``asyncio.run`` inside ``benchmark.pedantic(rounds=1, iterations=1)``:
the manager is made, warmed up, measured and closed on that loop (its connections and its
near-cache listener belong to the loop). pytest-benchmark's own time is therefore the
whole scenario; what the report uses is in ``benchmark.extra_info``: ops/s over the
measured part (every task starts at once, the clock stops when the last one finishes)
and the p50/p99 of per-call ``perf_counter_ns`` samples, which include the wait for a
pooled connection and for the event loop.

Every call must succeed: no call raised or returned ``None``, and the manager's own
count of failed reads is zero (``(await manager.get_stats()).counters["reads_failed"]``).
Failures are recorded before they are asserted, so a failing run still shows its counts
in the report.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
import redis
from pytest_benchmark.fixture import BenchmarkFixture

from crmcache import AsyncCRMCacheManager, ClientPreferences, CRMCacheManager, MessageChannel
from crmcache._keys import prefs_key
from crmcache._near import MISSING
from crmcache._stats import Counter, Kind

TASKS = 100
#: Calls per measured run, split evenly over the tasks (as many as the threads benchmark).
TOTAL_CALLS = 24_000
#: Untimed calls first, from every task, so the pool has opened its connections.
WARMUP_CALLS = 1_600
SMOKE_CALLS = 200
CLIENTS = 100
CLIENT_IDS = [f"bench-async-{i:03d}" for i in range(CLIENTS)]
KEYS = [prefs_key(client_id) for client_id in CLIENT_IDS]
MAX_CONNECTIONS = 10  # as conftest.py's ``cache`` and test_bench_threads.py
POOL_TIMEOUT = 1.0
NEAR_DEADLINE_S = 10.0
NEAR_POLL_S = 0.002
REPORT_TABLE = "async-throughput"


def _prefs(client_id: str) -> ClientPreferences:
    return ClientPreferences(
        client_id=client_id,
        preferred_channels=[MessageChannel.WHATSAPP, MessageChannel.EMAIL],
        timezone="Europe/Berlin",
        language="de",
        quiet_hours_start=22,
        quiet_hours_end=7,
        version=3,
    )


PREFS = {client_id: _prefs(client_id) for client_id in CLIENT_IDS}


@dataclass(frozen=True)
class TaskRun:
    """What one run of concurrent tasks measured."""

    tasks: int
    calls: int
    misses: int  # calls that returned None (crmcache degrades a failed read to a miss)
    errors: int  # calls that raised
    first_error: str | None
    wall_s: float
    p50_us: float
    p99_us: float

    @property
    def ops_per_s(self) -> float:
        return self.calls / self.wall_s

    @property
    def failed(self) -> int:
        return self.misses + self.errors


@dataclass(frozen=True)
class Scenario:
    """A measured run and what the manager said about it afterwards."""

    run: TaskRun
    reads_failed: int
    redis_errors: int
    prefs_misses: int
    breaker: str
    near_misses: int | None  # near-cache misses during the measured run (None: no near cache)


def _percentile(ordered: list[int], fraction: float) -> float:
    """Nearest-rank percentile of sorted nanosecond samples, in microseconds."""
    rank = max(math.ceil(fraction * len(ordered)), 1)
    return ordered[rank - 1] / 1000


async def run_tasks(read: Callable[[str], Awaitable[object]], tasks: int, calls: int) -> TaskRun:
    """Await ``read(client_id)`` ``calls`` times from ``tasks`` tasks started together.

    A call that raises is counted (the first error kept) and the task goes on.
    """
    per_task = calls // tasks
    start = asyncio.Event()
    samples: list[list[int]] = [[] for _ in range(tasks)]
    misses = [0] * tasks
    errors = [0] * tasks
    first_errors: list[BaseException] = []

    async def worker(index: int) -> None:
        out = samples[index]
        perf = time.perf_counter_ns
        ids = CLIENT_IDS
        count = len(ids)
        offset = index * 7  # tasks walk the keys out of step with one another
        missed = failed = 0
        await start.wait()
        for i in range(per_task):
            began = perf()
            try:
                value = await read(ids[(offset + i) % count])
            except Exception as exc:  # noqa: BLE001 - counted and reported, not swallowed
                out.append(perf() - began)
                failed += 1
                if not first_errors:
                    first_errors.append(exc)
                continue
            out.append(perf() - began)
            if value is None:
                missed += 1
        misses[index] = missed
        errors[index] = failed

    workers = [asyncio.create_task(worker(i), name=f"bench-{i}") for i in range(tasks)]
    await asyncio.sleep(0)  # every task now waits at the start line
    began = time.perf_counter()
    start.set()
    await asyncio.gather(*workers)
    wall = time.perf_counter() - began
    ordered = sorted(sample for per in samples for sample in per)
    return TaskRun(
        tasks=tasks,
        calls=len(ordered),
        misses=sum(misses),
        errors=sum(errors),
        first_error=None
        if not first_errors
        else f"{type(first_errors[0]).__name__}: {first_errors[0]}",
        wall_s=wall,
        p50_us=_percentile(ordered, 0.50),
        p99_us=_percentile(ordered, 0.99),
    )


async def _make_near_cached(manager: AsyncCRMCacheManager) -> None:
    """Read every key until the near cache holds them all (the listener starts on the
    first read and serves once subscribed; see test_bench_near.py)."""
    near = manager._near
    assert near is not None
    deadline = time.monotonic() + NEAR_DEADLINE_S
    while True:
        missing = [
            cid for cid, key in zip(CLIENT_IDS, KEYS, strict=True) if near.get(key) is MISSING
        ]
        if not missing:
            return
        if time.monotonic() > deadline:
            pytest.fail(
                f"{len(missing)} keys not near-cached after {NEAR_DEADLINE_S:.0f} s "
                f"(listener live: {near.live}; {near.stats()})"
            )
        for client_id in missing:
            assert await manager.get_client_preferences(client_id) is not None
        await asyncio.sleep(NEAR_POLL_S)


async def scenario(url: str, *, near_cache: bool, calls: int, warmup_calls: int) -> Scenario:
    """Make a manager on the running loop, warm it up, measure ``calls`` reads from
    ``TASKS`` tasks, and report what it counted."""
    async with AsyncCRMCacheManager(
        redis_url=url,
        enabled=True,
        cache_ttl=3600,
        max_connections=MAX_CONNECTIONS,
        pool_timeout=POOL_TIMEOUT,
        near_cache=near_cache,
    ) as manager:
        await run_tasks(manager.get_client_preferences, TASKS, warmup_calls)
        if near_cache:
            await _make_near_cached(manager)
        manager.reset_stats()
        near = manager._near
        near_before = None if near is None else near.stats().misses
        run = await run_tasks(manager.get_client_preferences, TASKS, calls)
        near_misses = None if near is None or near_before is None else near.stats().misses
        stats = await manager.get_stats()
        return Scenario(
            run=run,
            reads_failed=stats.counters[Counter.READS_FAILED],
            redis_errors=stats.counters[Counter.REDIS_ERRORS],
            prefs_misses=stats.by_kind[Kind.PREFERENCES].misses,
            breaker=str(stats.circuit_breaker["state"]),
            near_misses=None
            if near_misses is None or near_before is None
            else near_misses - near_before,
        )


@pytest.fixture
def prefilled(cache: CRMCacheManager, raw: redis.Redis) -> dict[str, ClientPreferences]:
    """The clients' preferences, cached by crmcache itself (so stored as it stores them)."""
    raw.delete(*KEYS)
    for prefs in PREFS.values():
        assert cache.set_client_preferences(prefs)
    return PREFS


#: Implementation names as the report knows them: ``async`` and ``async-near``.
IMPLEMENTATIONS = {"remote": ("async", False), "near": ("async-near", True)}


@pytest.mark.parametrize("variant", list(IMPLEMENTATIONS))
def test_async_throughput(
    benchmark: BenchmarkFixture,
    bench_redis_url: str,
    prefilled: dict[str, ClientPreferences],
    variant: str,
) -> None:
    implementation, near_cache = IMPLEMENTATIONS[variant]
    benchmark.group = f"async-{TASKS}tasks"
    smoke = benchmark.disabled
    calls = SMOKE_CALLS if smoke else TOTAL_CALLS
    warmup_calls = SMOKE_CALLS if smoke else WARMUP_CALLS

    def run_loop() -> Scenario:
        return asyncio.run(
            scenario(
                bench_redis_url, near_cache=near_cache, calls=calls, warmup_calls=warmup_calls
            )
        )

    result: Scenario = benchmark.pedantic(  # type: ignore[no-untyped-call]
        run_loop, rounds=1, iterations=1
    )
    run = result.run
    benchmark.extra_info.update(
        report_table=REPORT_TABLE,
        implementation=implementation,
        tasks=run.tasks,
        calls=run.calls,
        failed_calls=run.failed,
        first_error=run.first_error,
        wall_s=run.wall_s,
        ops_per_s=run.ops_per_s,
        p50_us=run.p50_us,
        p99_us=run.p99_us,
        reads_failed=result.reads_failed,
        near_misses=result.near_misses,
    )
    assert run.calls == calls
    assert result.reads_failed == 0, (
        f"reads_failed = {result.reads_failed} (pool timeouts degrade to misses)"
    )
    assert run.failed == 0, (
        f"{run.failed} of {run.calls} calls failed with {run.tasks} tasks on "
        f"{MAX_CONNECTIONS} pooled connections ({run.misses} misses, {run.errors} errors; "
        f"first error: {run.first_error})"
    )
    assert result.redis_errors == 0
    assert result.prefs_misses == 0
    assert result.breaker == "closed"
    if near_cache:
        assert result.near_misses == 0, f"{result.near_misses} timed calls missed the near cache"
