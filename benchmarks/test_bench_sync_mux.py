"""Would a multiplexed mode pay for the sync facade? (issue 13, item 3)

sync_mux_prototype.py's ``SyncMux`` (one socket, callers hand packed commands to a writer,
a reader thread matches replies in order) beside the sync manager's lean pool and raw
redis-py's pooled client, at 1, 4 and 16 threads, every call a preferences hit (the keys of
test_bench_threads.py, whose ``run_threaded`` times the runs):

* ``lean-pool``: ``CRMCacheManager.get_client_preferences`` (``max_connections=10``):
  ``GET`` + the library's decoder (pydantic);
* ``raw-redis-py``: ``redis.Redis`` on a ``BlockingConnectionPool(max_connections=10)``:
  ``GET`` + ``orjson.loads`` of the JSON after its ``<version>:`` prefix;
* ``mux-thread``: the prototype with a writer thread: ``GET`` + ``orjson.loads``;
* ``mux-inline``: the prototype with callers writing under a lock: ``GET`` + ``orjson.loads``;
* ``mux-thread-decode``: ``mux-thread`` with the library's decoder, so that its ratio to
  ``lean-pool`` compares transports only.

``report.py`` shows them in the table "sync multiplexing prototype" (``report_table =
"sync-mux"``) with each one's ratio to the lean pool and to raw redis-py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import orjson
import pytest
import redis
from pytest_benchmark.fixture import BenchmarkFixture

from crmcache import ClientPreferences, CRMCacheManager
from crmcache._codec import decode_preferences
from sync_mux_prototype import SyncMux
from test_bench_threads import CLIENT_IDS, KEYS, PREFS, ThreadedRun, run_threaded

REPORT_TABLE = "sync-mux"
THREADS = (1, 4, 16)
TOTAL_CALLS = 24_000
WARMUP_CALLS = 1_600
SMOKE_CALLS = 160
KEY_OF = dict(zip(CLIENT_IDS, KEYS, strict=True))
IMPLEMENTATIONS = ("lean-pool", "raw-redis-py", "mux-thread", "mux-inline", "mux-thread-decode")


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
    writer = "inline" if implementation == "mux-inline" else "thread"
    with SyncMux(bench_redis_url, writer=writer) as mux:
        if implementation == "mux-thread-decode":

            def read(client_id: str) -> object:
                value = mux.get(KEY_OF[client_id])
                return None if value is None else decode_preferences(value, client_id)

            yield read
        else:
            yield lambda client_id: _json(mux.get(KEY_OF[client_id]))


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
    result: ThreadedRun = benchmark.pedantic(  # type: ignore[no-untyped-call]
        run_threaded, args=(reader, threads, calls), rounds=1, iterations=1
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
