"""What latency histograms cost on the hot path: off (the default) and on, beside the
guarded call as it was before metrics existed.

Every Redis call of a manager goes through its guarded call (``_call``: the circuit
breaker, then the transport); with ``metrics_latency=True`` that is ``_timed_call``: the
same plus a ``perf_counter_ns()`` pair, a dict lookup of the operation's series and two
list increments. Off, the manager's ``_call`` is the untimed method itself: nothing is
checked per call.

What is measured:

* ``metrics-cost`` (a table of its own in ``report.py``), per facade:
  ``manager._call("get_client_preferences", noop)`` with a function that does no I/O, so
  the figure is the guarded call's own cost, on three managers: the baseline
  (``BaselineManager``: the guarded call exactly as it was before metrics, kept here),
  histograms off (the default), and on. The three take turns, one round of 500 calls
  each, 1,000 rounds; each reports its least disturbed round's ns per call (the machine's
  other load only ever adds time; a round is short enough that many escape it), and the
  differences to the baseline.
* ``metrics-prefs-hit``: a real ``get_client_preferences`` hit (one ``GET`` on the
  benchmark server, sync facade), histograms off (the baseline) and on, as pytest-benchmark
  medians: the whole call, beside which the difference is within the noise.

``report.py`` checks the targets: on costs at most 0.3 µs more than the baseline per call
on each facade, off at most 0.02 µs (nothing measurable: it runs the baseline's code but
for the failure path, moved into ``_degraded``).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

import pytest
from pytest_benchmark.fixture import BenchmarkFixture
from redis.exceptions import RedisError

from crmcache import AsyncCRMCacheManager, ClientPreferences, CRMCacheManager
from crmcache._guard import FAILED, PoolClosedError
from crmcache._stats import Counter

OP = "get_client_preferences"
CALLS_PER_ROUND = 1_000
CLIENT_ID = "bench-metrics-client"
PREFS = ClientPreferences(client_id=CLIENT_ID, version=1)


class BaselineManager(CRMCacheManager):
    """A manager whose guarded call is the one before metrics (commit 0f07fa7)."""

    def _call(self, op: str, fn: Callable[..., Any], *args: Any) -> Any:
        guard = self._guard
        token = guard.begin()
        if token is None:
            return FAILED
        try:
            result = fn(*args)
        except PoolClosedError:
            guard.abandoned()
            return FAILED
        except (RedisError, OSError) as exc:
            guard.failed(op, exc)
            return FAILED
        except Exception as exc:  # noqa: BLE001
            guard.unexpected(op, exc)
            return FAILED
        except BaseException:
            guard.abandoned()
            self._stats.count(Counter.CANCELLED)
            raise
        guard.succeeded(token)
        return result


class AsyncBaselineManager(AsyncCRMCacheManager):
    """The async manager with its guarded call as before metrics."""

    async def _call(self, op: str, fn: Callable[..., Any], *args: Any) -> Any:
        guard = self._guard
        token = guard.begin()
        if token is None:
            return FAILED
        try:
            result = await fn(*args)
        except PoolClosedError:
            guard.abandoned()
            return FAILED
        except (RedisError, OSError) as exc:
            guard.failed(op, exc)
            return FAILED
        except Exception as exc:  # noqa: BLE001
            guard.unexpected(op, exc)
            return FAILED
        except BaseException:
            guard.abandoned()
            self._stats.count(Counter.CANCELLED)
            raise
        guard.succeeded(token)
        return result


def noop() -> None:
    return None


async def anoop() -> None:
    return None


VARIANTS = ("baseline", "off", "on")
#: Calls per timed round, and rounds per variant (the variants take turns, round by round).
CALLS_PER_ROUND = 500
ROUNDS = 1_000
SMOKE_ROUNDS = 3
REPORT_TABLE = "metrics-cost"


def _interleaved(rounds: dict[str, Callable[[], int]], count: int) -> dict[str, dict[str, float]]:
    """Run each variant's round (it returns its nanoseconds for CALLS_PER_ROUND calls)
    ``count`` times, taking turns; per variant the least disturbed round's ns per call
    and the median round's."""
    seen: dict[str, list[float]] = {name: [] for name in rounds}
    for _ in range(count):
        for name, run in rounds.items():
            seen[name].append(run() / CALLS_PER_ROUND)
    return {
        name: {"best_ns": min(values), "median_ns": statistics.median(values)}
        for name, values in seen.items()
    }


def _record(
    benchmark: BenchmarkFixture, facade: str, figures: dict[str, dict[str, float]]
) -> None:
    base = figures["baseline"]["best_ns"]
    benchmark.extra_info.update(
        report_table=REPORT_TABLE,
        facade=facade,
        calls_per_round=CALLS_PER_ROUND,
        **{f"{name}_{key}": value for name, f in figures.items() for key, value in f.items()},
        off_added_ns=figures["off"]["best_ns"] - base,
        on_added_ns=figures["on"]["best_ns"] - base,
    )


def _sync_manager(url: str, variant: str) -> CRMCacheManager:
    if variant == "baseline":
        return BaselineManager(redis_url=url)
    return CRMCacheManager(redis_url=url, metrics_latency=variant == "on")


@pytest.mark.benchmark(group="metrics-cost")
def test_metrics_call_cost_sync(
    benchmark: BenchmarkFixture, bench_redis_url: str, request: pytest.FixtureRequest
) -> None:
    """The guarded call (no I/O) on the sync facade: baseline, histograms off, on."""
    managers = {variant: _sync_manager(bench_redis_url, variant) for variant in VARIANTS}
    try:
        assert ["_call" in vars(m) for m in managers.values()] == [False, False, True]

        def timed(manager: CRMCacheManager) -> Callable[[], int]:
            call = manager._call

            def run() -> int:
                started = time.perf_counter_ns()
                for _ in range(CALLS_PER_ROUND):
                    call(OP, noop)
                return time.perf_counter_ns() - started

            return run

        rounds = {name: timed(m) for name, m in managers.items()}
        count = ROUNDS if _enabled(request) else SMOKE_ROUNDS
        figures = benchmark.pedantic(_interleaved, args=(rounds, count), rounds=1, iterations=1)
        _record(benchmark, "sync", figures)
        series = managers["on"]._latency.series[OP]
        assert sum(series[:-1]) == count * CALLS_PER_ROUND  # every timed call counted
        assert OP not in managers["off"]._latency.series
    finally:
        for manager in managers.values():
            manager.close()


@pytest.mark.benchmark(group="metrics-cost")
def test_metrics_call_cost_async(
    benchmark: BenchmarkFixture, bench_redis_url: str, request: pytest.FixtureRequest
) -> None:
    """The same on AsyncCRMCacheManager: CALLS_PER_ROUND awaited calls per loop run."""
    loop = asyncio.new_event_loop()

    async def make(variant: str) -> AsyncCRMCacheManager:
        if variant == "baseline":
            return AsyncBaselineManager(redis_url=bench_redis_url)
        return AsyncCRMCacheManager(redis_url=bench_redis_url, metrics_latency=variant == "on")

    managers = {variant: loop.run_until_complete(make(variant)) for variant in VARIANTS}
    try:

        def timed(manager: AsyncCRMCacheManager) -> Callable[[], int]:
            call = manager._call

            async def batch() -> int:
                started = time.perf_counter_ns()
                for _ in range(CALLS_PER_ROUND):
                    await call(OP, anoop)
                return time.perf_counter_ns() - started

            return lambda: loop.run_until_complete(batch())

        rounds = {name: timed(m) for name, m in managers.items()}
        count = ROUNDS if _enabled(request) else SMOKE_ROUNDS
        figures = benchmark.pedantic(_interleaved, args=(rounds, count), rounds=1, iterations=1)
        _record(benchmark, "async", figures)
        assert sum(managers["on"]._latency.series[OP][:-1]) == count * CALLS_PER_ROUND
    finally:
        for manager in managers.values():
            loop.run_until_complete(manager.aclose())
        loop.close()


def _enabled(request: pytest.FixtureRequest) -> bool:
    """True when benchmarks are measured (``--benchmark-enable``), not smoke-run."""
    return not request.config.getoption("benchmark_disable")


@pytest.mark.benchmark(group="metrics-prefs-hit")
@pytest.mark.parametrize("variant", ["baseline_off", "on"])
def test_metrics_prefs_hit(
    benchmark: BenchmarkFixture, bench_redis_url: str, variant: str
) -> None:
    """A remote preferences hit, histograms off (baseline) and on."""
    with CRMCacheManager(redis_url=bench_redis_url, metrics_latency=variant == "on") as cache:
        assert cache.set_client_preferences(PREFS) or cache.get_client_preferences(CLIENT_ID)
        assert benchmark(cache.get_client_preferences, CLIENT_ID) == PREFS
        stats = cache.get_stats()
        assert stats.counters[Counter.READS_FAILED] == 0
        timed = cache.metrics_snapshot().latency
        assert (OP in timed) is (variant == "on")
