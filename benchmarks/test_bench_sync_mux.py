"""The sync facade's auto-pipelining (``pipelining=True``, ``crmcache._mux_sync``): does it
pay, and from how many threads? (issue 13, item 3)

Every call a preferences hit (the keys of test_bench_threads.py, whose ``run_threaded``
times the runs), at 1, 4 and 16 worker threads:

* ``lean-pool``: ``CRMCacheManager.get_client_preferences`` on the lean pool
  (``max_connections=10``, the default data path);
* ``pipelined``: the same manager call with ``pipelining=True`` (2 shared connections);
* ``raw-redis-py``: ``redis.Redis`` on a ``BlockingConnectionPool(max_connections=10)``:
  ``GET`` + ``orjson.loads`` of the JSON after its ``<version>:`` prefix.

Threads 0 is the main thread alone: there the pipelined manager hands each call to a
writer thread (a signal handler's exception can land in the main thread at any bytecode
and must never cut a write in half), so it pays a thread hop the worker threads do not.

``report.py`` shows them in the table "sync auto-pipelining" (``report_table =
"sync-mux"``) with each one's ratio to the lean pool and to raw redis-py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import orjson
import pytest
import redis
from pytest_benchmark.fixture import BenchmarkFixture

from crmcache import ClientPreferences, CRMCacheManager
from test_bench_threads import (
    CLIENT_IDS,
    KEYS,
    PREFS,
    ThreadedRun,
    percentile,
    run_threaded,
)

REPORT_TABLE = "sync-mux"
#: 0: the main thread alone (no worker thread).
THREADS = (0, 1, 4, 16)
TOTAL_CALLS = 24_000
WARMUP_CALLS = 1_600
SMOKE_CALLS = 160
KEY_OF = dict(zip(CLIENT_IDS, KEYS, strict=True))
IMPLEMENTATIONS = ("lean-pool", "pipelined", "raw-redis-py")


@pytest.fixture
def prefilled(cache: CRMCacheManager, raw: redis.Redis) -> dict[str, ClientPreferences]:
    raw.delete(*KEYS)
    for prefs in PREFS.values():
        assert cache.set_client_preferences(prefs)
    return PREFS


def _json(value: bytes | None) -> object:
    return None if value is None else orjson.loads(value.partition(b":")[2])


@pytest.fixture
def reader(
    request: pytest.FixtureRequest,
    bench_redis_url: str,
    cache: CRMCacheManager,
    raw: redis.Redis,
) -> Iterator[Callable[[str], object]]:
    implementation: str = request.param
    if implementation == "lean-pool":
        yield cache.get_client_preferences
        return
    if implementation == "raw-redis-py":
        yield lambda client_id: _json(raw.get(KEY_OF[client_id]))  # type: ignore[arg-type]
        return
    with CRMCacheManager(redis_url=bench_redis_url, pipelining=True) as piped:
        yield piped.get_client_preferences


def run_main(read: Callable[[str], object], calls: int) -> ThreadedRun:
    """Call ``read`` ``calls`` times from the main thread, timing each call."""
    samples: list[int] = []
    perf = time.perf_counter_ns
    count = len(CLIENT_IDS)
    missed = 0
    began = time.perf_counter()
    for i in range(calls):
        start = perf()
        value = read(CLIENT_IDS[i % count])
        samples.append(perf() - start)
        missed += value is None
    wall = time.perf_counter() - began
    samples.sort()
    return ThreadedRun(
        threads=0,
        calls=calls,
        misses=missed,
        errors=0,
        first_error=None,
        wall_s=wall,
        p50_us=percentile(samples, 0.50),
        p99_us=percentile(samples, 0.99),
    )


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("reader", IMPLEMENTATIONS, indirect=True)
def test_sync_mux(
    benchmark: BenchmarkFixture,
    prefilled: dict[str, ClientPreferences],
    reader: Callable[[str], object],
    threads: int,
    request: pytest.FixtureRequest,
) -> None:
    implementation = request.node.callspec.params["reader"]
    benchmark.group = f"sync-mux-{threads}t"
    assert reader(CLIENT_IDS[0]) is not None
    smoke = benchmark.disabled
    run_threaded(reader, max(THREADS), SMOKE_CALLS if smoke else WARMUP_CALLS)
    calls = SMOKE_CALLS if smoke else TOTAL_CALLS
    if threads:
        result: ThreadedRun = benchmark.pedantic(  # type: ignore[no-untyped-call]
            run_threaded, args=(reader, threads, calls), rounds=1, iterations=1
        )
    else:
        calls //= 4  # one caller: a quarter of the calls is as many samples as it needs
        result = benchmark.pedantic(  # type: ignore[no-untyped-call]
            run_main, args=(reader, calls), rounds=1, iterations=1
        )
    benchmark.extra_info.update(
        report_table=REPORT_TABLE,
        implementation=implementation,
        threads=threads,
        calls=result.calls,
        failed_calls=result.failed,
        first_error=result.first_error,
        wall_s=result.wall_s,
        ops_per_s=result.ops_per_s,
        p50_us=result.p50_us,
        p99_us=result.p99_us,
    )
    assert result.calls == calls
    if implementation != "raw-redis-py":  # redis-py's pool may time out (test_bench_threads)
        assert result.failed == 0, f"{result.failed} failed; first error: {result.first_error}"
