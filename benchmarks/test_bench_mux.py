"""Auto-pipelining (``crmcache._mux``): the async manager's default beside its lean pool,
the sync manager, raw redis-py and (where installed) valkey-glide.

Every measured scenario is one ``asyncio.run`` inside ``benchmark.pedantic(rounds=1)``,
as in test_bench_async.py (whose ``run_tasks`` it uses): the client is made, warmed up,
measured and closed on that loop. ``extra_info`` holds ops/s over the measured part and
the p50/p99 of per-call samples; ``report.py`` shows them in the table "Auto-pipelining"
(``report_table = "mux"``), keyed by ``workload`` and ``implementation``:

* ``prefs``: 100 tasks, preferences hits (``get_client_preferences``): ``pipelined``
  (the default), ``pool`` (``pipelining=False``, ``max_connections=10``), ``raw-redis-py``
  (``redis.asyncio`` on a ``BlockingConnectionPool`` of 10, ``GET`` + ``orjson.loads``)
  and valkey-glide (test_bench_glide.py). The sync baseline is test_bench_threads.py's
  ``test_throughput_crmcache[16]`` from the same run (run that file too). Targets:
  pipelined ops/s >= 5x the sync figure, p99 no worse.
* ``ratelimit``: 100 tasks, ``check_rate_limit`` (one ``EVALSHA`` each) against a limit
  never reached: ``pipelined``, ``pool``, and the sync manager at 16 threads
  (``sync-16t``, measured here with test_bench_threads.py's ``run_threaded``). Same targets.
  The managers run with ``rate_limit_policy="closed"`` so that a failed check shows as a
  refusal (counted as failed) rather than as an allowed call.
* ``single``: one task calling ``get_client_preferences`` sequentially: ``pipelined`` vs
  ``pool``. Target: pipelined time / pool time <= 1.05.
* ``hol``: head-of-line blocking. 100 tasks do small preference hits while one more task
  loops on ``get_template`` of a 1 MiB template (``big_reads = "with"``), or does not
  (``"without"``); p50/p99 are the small calls' only. Measured on the pipelined manager and
  on the pool for comparison. No target: the report shows how much the 1 MiB transfers add
  to the small calls queued behind them.

CPU pinning (conftest.py) puts the client and redis-server on one CPU: the figures are
what each client costs in CPU, not parallel speed-up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio
from pytest_benchmark.fixture import BenchmarkFixture

from crmcache import AsyncCRMCacheManager, ClientPreferences, CRMCacheManager, MessageChannel
from crmcache._keys import template_key
from crmcache._stats import Counter
from test_bench_async import (
    CLIENT_IDS,
    KEYS,
    PREFS,
    SMOKE_CALLS,
    TASKS,
    TOTAL_CALLS,
    WARMUP_CALLS,
    TaskRun,
    _percentile,
    run_tasks,
)
from test_bench_threads import ThreadedRun, run_threaded

REPORT_TABLE = "mux"
MAX_CONNECTIONS = 10
POOL_TIMEOUT = 1.0
SYNC_THREADS = 16
#: Single caller: sequential calls from one task (smaller: a call is a full round trip).
SINGLE_CALLS = 8_000
SINGLE_WARMUP = 500
#: Rate limit: never reached, so every call takes the "allowed" path.
API = "bench-mux"
LIMIT = 10**9
WINDOW = 60
#: Head-of-line: one 1 MiB template, read in a loop beside the small calls.
BIG_NAME = "bench-mux-big"
BIG_CHANNEL = MessageChannel.EMAIL
BIG_BYTES = 1024 * 1024
MAX_TEMPLATE_BYTES = 2 * BIG_BYTES
BIG_TEXT = ("x" * 1023 + "\n") * (BIG_BYTES // 1024)
assert len(BIG_TEXT.encode("utf-8")) == BIG_BYTES


@dataclass
class Outcome:
    """A measured run and the manager's own failure counts afterwards."""

    run: TaskRun | ThreadedRun
    reads_failed: int = 0
    redis_errors: int = 0
    rate_limit_degraded: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _record(benchmark: BenchmarkFixture, workload: str, implementation: str, out: Outcome) -> None:
    run = out.run
    benchmark.extra_info.update(
        report_table=REPORT_TABLE,
        workload=workload,
        implementation=implementation,
        callers=(f"{run.tasks} tasks" if isinstance(run, TaskRun) else f"{run.threads} threads"),
        calls=run.calls,
        failed_calls=run.failed,
        first_error=run.first_error,
        wall_s=run.wall_s,
        ops_per_s=run.ops_per_s,
        p50_us=run.p50_us,
        p99_us=run.p99_us,
        reads_failed=out.reads_failed,
        redis_errors=out.redis_errors,
        rate_limit_degraded=out.rate_limit_degraded,
        **out.extra,
    )


def _assert_clean(out: Outcome, calls: int) -> None:
    run = out.run
    assert run.calls == calls
    assert run.failed == 0, (
        f"{run.failed} of {run.calls} calls failed ({run.misses} misses, {run.errors} errors; "
        f"first error: {run.first_error})"
    )
    assert out.reads_failed == 0
    assert out.redis_errors == 0
    assert out.rate_limit_degraded == 0


def _manager(url: str, pipelining: bool) -> AsyncCRMCacheManager:
    return AsyncCRMCacheManager(
        redis_url=url,
        enabled=True,
        cache_ttl=3600,
        max_connections=MAX_CONNECTIONS,
        pool_timeout=POOL_TIMEOUT,
        rate_limit_policy="closed",
        max_template_bytes=MAX_TEMPLATE_BYTES,
        pipelining=pipelining,
    )


async def _counts(manager: AsyncCRMCacheManager, run: TaskRun, **extra: Any) -> Outcome:
    stats = await manager.get_stats()
    return Outcome(
        run=run,
        reads_failed=stats.counters[Counter.READS_FAILED],
        redis_errors=stats.counters[Counter.REDIS_ERRORS],
        rate_limit_degraded=stats.counters[Counter.RATE_LIMIT_DEGRADED],
        extra=extra,
    )


def _rate_check(manager: AsyncCRMCacheManager) -> Callable[[str], Awaitable[object]]:
    async def check(_client_id: str) -> object:
        result = await manager.check_rate_limit(API, LIMIT, WINDOW)
        return result if result.allowed else None  # refused (or failed, "closed"): a miss

    return check


async def manager_scenario(
    url: str, *, pipelining: bool, workload: str, tasks: int, calls: int, warmup: int
) -> Outcome:
    async with _manager(url, pipelining) as manager:
        read = manager.get_client_preferences if workload != "ratelimit" else _rate_check(manager)
        await run_tasks(read, tasks, warmup)
        manager.reset_stats()
        run = await run_tasks(read, tasks, calls)
        return await _counts(manager, run)


async def raw_scenario(url: str, *, calls: int, warmup: int) -> Outcome:
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url, max_connections=MAX_CONNECTIONS, timeout=POOL_TIMEOUT, protocol=2
    )
    client = redis.asyncio.Redis(connection_pool=pool)
    key_of = dict(zip(CLIENT_IDS, KEYS, strict=True))

    async def read(client_id: str) -> object:
        value = await client.get(key_of[client_id])
        return None if value is None else orjson.loads(value.partition(b":")[2])

    try:
        await run_tasks(read, TASKS, warmup)
        return Outcome(run=await run_tasks(read, TASKS, calls))
    finally:
        await client.aclose()
        await pool.disconnect()


async def hol_scenario(
    url: str, *, pipelining: bool, big_reads: bool, calls: int, warmup: int
) -> Outcome:
    """Small calls from TASKS tasks; with ``big_reads`` one more task reads the 1 MiB
    template in a loop until they are done. p50/p99 are the small calls'."""
    async with _manager(url, pipelining) as manager:
        await run_tasks(manager.get_client_preferences, TASKS, warmup)
        assert await manager.get_template(BIG_NAME, BIG_CHANNEL) == BIG_TEXT
        manager.reset_stats()
        done = asyncio.Event()
        big_samples: list[int] = []
        big_wrong = 0

        async def big_loop() -> None:
            nonlocal big_wrong
            perf = time.perf_counter_ns
            while not done.is_set():
                began = perf()
                text = await manager.get_template(BIG_NAME, BIG_CHANNEL)
                big_samples.append(perf() - began)
                if text is None or len(text) != BIG_BYTES:
                    big_wrong += 1

        async def small() -> TaskRun:
            try:
                return await run_tasks(manager.get_client_preferences, TASKS, calls)
            finally:
                done.set()

        if big_reads:
            run, _ = await asyncio.gather(small(), big_loop())
        else:
            run = await small()
        ordered = sorted(big_samples)
        extra: dict[str, Any] = {
            "big_reads": "with" if big_reads else "without",
            "big_bytes": BIG_BYTES,
            "big_read_count": len(ordered),
            "big_read_failed": big_wrong,
            "big_p50_us": _percentile(ordered, 0.5) if ordered else None,
            "big_p99_us": _percentile(ordered, 0.99) if ordered else None,
            "big_mib_per_s": (len(ordered) * BIG_BYTES / 2**20 / run.wall_s) if ordered else 0.0,
        }
        out = await _counts(manager, run, **extra)
        assert big_wrong == 0
        return out


@pytest.fixture
def prefilled(
    cache: CRMCacheManager, raw: redis.Redis, bench_redis_url: str
) -> dict[str, ClientPreferences]:
    """The 100 clients' preferences (test_bench_async.py's keys) and the 1 MiB template,
    written by the sync manager itself (the big one with a raised size limit)."""
    raw.delete(*KEYS, template_key(BIG_CHANNEL, BIG_NAME))
    for prefs in PREFS.values():
        assert cache.set_client_preferences(prefs)
    with CRMCacheManager(
        redis_url=bench_redis_url,
        enabled=True,
        max_template_bytes=MAX_TEMPLATE_BYTES,
    ) as big_writer:
        assert big_writer.set_template(BIG_NAME, BIG_CHANNEL, BIG_TEXT)
    return PREFS


def _sizes(benchmark: BenchmarkFixture, calls: int = TOTAL_CALLS) -> tuple[int, int]:
    if benchmark.disabled:
        return SMOKE_CALLS, SMOKE_CALLS
    return calls, WARMUP_CALLS


def _pedantic(benchmark: BenchmarkFixture, scenario: Callable[[], Outcome]) -> Outcome:
    result: Outcome = benchmark.pedantic(scenario, rounds=1, iterations=1)  # type: ignore[no-untyped-call]
    return result


MANAGERS = {"pipelined": True, "pool": False}


@pytest.mark.parametrize("workload", ["prefs", "ratelimit"])
@pytest.mark.parametrize("implementation", list(MANAGERS))
def test_mux_100_tasks(
    benchmark: BenchmarkFixture,
    bench_redis_url: str,
    prefilled: dict[str, ClientPreferences],
    implementation: str,
    workload: str,
) -> None:
    benchmark.group = f"mux-{workload}-{TASKS}tasks"
    calls, warmup = _sizes(benchmark)
    out = _pedantic(
        benchmark,
        lambda: asyncio.run(
            manager_scenario(
                bench_redis_url,
                pipelining=MANAGERS[implementation],
                workload=workload,
                tasks=TASKS,
                calls=calls,
                warmup=warmup,
            )
        ),
    )
    _record(benchmark, workload, implementation, out)
    _assert_clean(out, calls)


def test_mux_ratelimit_sync_16_threads(
    benchmark: BenchmarkFixture, bench_redis_url: str, prefilled: dict[str, ClientPreferences]
) -> None:
    """The sync manager's rate-limit checks at 16 threads: the baseline of the
    ``ratelimit`` rows (test_bench_threads.py measures only preference reads)."""
    benchmark.group = f"mux-ratelimit-{TASKS}tasks"
    calls, warmup = _sizes(benchmark)
    calls -= calls % SYNC_THREADS
    with CRMCacheManager(
        redis_url=bench_redis_url,
        enabled=True,
        max_connections=MAX_CONNECTIONS,
        pool_timeout=POOL_TIMEOUT,
        rate_limit_policy="closed",
    ) as manager:

        def check(_client_id: str) -> object:
            result = manager.check_rate_limit(API, LIMIT, WINDOW)
            return result if result.allowed else None

        run_threaded(check, SYNC_THREADS, warmup)
        manager.reset_stats()
        run: ThreadedRun = benchmark.pedantic(  # type: ignore[no-untyped-call]
            run_threaded, args=(check, SYNC_THREADS, calls), rounds=1, iterations=1
        )
        stats = manager.get_stats()
        out = Outcome(
            run=run,
            reads_failed=stats.counters[Counter.READS_FAILED],
            redis_errors=stats.counters[Counter.REDIS_ERRORS],
            rate_limit_degraded=stats.counters[Counter.RATE_LIMIT_DEGRADED],
        )
    _record(benchmark, "ratelimit", "sync-16t", out)
    _assert_clean(out, calls)


def test_mux_prefs_raw_redis_py(
    benchmark: BenchmarkFixture, bench_redis_url: str, prefilled: dict[str, ClientPreferences]
) -> None:
    benchmark.group = f"mux-prefs-{TASKS}tasks"
    calls, warmup = _sizes(benchmark)
    out = _pedantic(
        benchmark, lambda: asyncio.run(raw_scenario(bench_redis_url, calls=calls, warmup=warmup))
    )
    _record(benchmark, "prefs", "raw-redis-py", out)
    # Recorded, not asserted: redis-py's pool lets a waiter time out now and then (see
    # test_bench_threads.py); the report shows the count.
    assert out.run.calls == calls


@pytest.mark.parametrize("implementation", list(MANAGERS))
def test_mux_single_caller(
    benchmark: BenchmarkFixture,
    bench_redis_url: str,
    prefilled: dict[str, ClientPreferences],
    implementation: str,
) -> None:
    benchmark.group = "mux-single-caller"
    calls, warmup = _sizes(benchmark, SINGLE_CALLS)
    warmup = min(warmup, SINGLE_WARMUP)
    out = _pedantic(
        benchmark,
        lambda: asyncio.run(
            manager_scenario(
                bench_redis_url,
                pipelining=MANAGERS[implementation],
                workload="single",
                tasks=1,
                calls=calls,
                warmup=warmup,
            )
        ),
    )
    _record(benchmark, "single", implementation, out)
    _assert_clean(out, calls)


@pytest.mark.parametrize("big_reads", ["without", "with"])
@pytest.mark.parametrize("implementation", list(MANAGERS))
def test_mux_head_of_line(
    benchmark: BenchmarkFixture,
    bench_redis_url: str,
    prefilled: dict[str, ClientPreferences],
    implementation: str,
    big_reads: str,
) -> None:
    benchmark.group = "mux-head-of-line"
    calls, warmup = _sizes(benchmark)
    out = _pedantic(
        benchmark,
        lambda: asyncio.run(
            hol_scenario(
                bench_redis_url,
                pipelining=MANAGERS[implementation],
                big_reads=big_reads == "with",
                calls=calls,
                warmup=warmup,
            )
        ),
    )
    _record(benchmark, "hol", implementation, out)
    _assert_clean(out, calls)
    if big_reads == "with":
        assert out.extra["big_read_count"] > 0
