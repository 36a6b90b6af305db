"""valkey-glide as a baseline column of the auto-pipelining table (report.py, "mux").

``GET`` + ``orjson.loads`` of the preferences JSON (after its ``<version>:`` prefix), as
test_bench_mux.py's raw redis-py baseline:

* ``glide-async``: ``glide.GlideClient`` (one multiplexed connection, Rust core), 100
  asyncio tasks, one ``asyncio.run`` per scenario;
* ``glide-sync``: ``glide_sync.GlideClient`` (package ``valkey-glide-sync``), 16 threads.

valkey-glide is not a dependency of the library: the ``bench`` extra installs it
(``pip install -e '.[bench]'``); where it cannot be imported each test skips, saying so,
and the report shows "not installed" (conftest.py records its version, or "not
installed", in the machine info).
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from crmcache import ClientPreferences
from crmcache._config import DEFAULT_KEY_PREFIX
from crmcache._keys import KeySpace
from crmcache._scripts import load_script_source
from test_bench_async import CLIENT_IDS, KEYS, TASKS, run_tasks
from test_bench_mux import (
    API,
    LIMIT,
    SYNC_THREADS,
    WINDOW,
    Outcome,
    _assert_clean,
    _pedantic,
    _record,
    _sizes,
)
from test_bench_mux import prefilled as prefilled  # noqa: PLC0414 - the fixture, re-exported
from test_bench_threads import CLIENT_IDS as THREAD_CLIENT_IDS
from test_bench_threads import run_threaded

NOT_INSTALLED = "valkey-glide is not installed (pip install valkey-glide valkey-glide-sync)"


def _address(url: str) -> tuple[str, int, int]:
    parts = urlsplit(url)
    database = int(parts.path.lstrip("/") or 0)
    return parts.hostname or "127.0.0.1", parts.port or 6379, database


def _decode(value: Any) -> object:
    return None if value is None else orjson.loads(bytes(value).partition(b":")[2])


async def glide_async_scenario(url: str, *, calls: int, warmup: int) -> Outcome:
    glide = pytest.importorskip("glide", reason=NOT_INSTALLED)
    host, port, database = _address(url)
    config = glide.GlideClientConfiguration([glide.NodeAddress(host, port)], database_id=database)
    client = await glide.GlideClient.create(config)
    key_of = dict(zip(CLIENT_IDS, KEYS, strict=True))

    async def read(client_id: str) -> object:
        return _decode(await client.get(key_of[client_id]))

    try:
        await run_tasks(read, TASKS, warmup)
        return Outcome(run=await run_tasks(read, TASKS, calls))
    finally:
        await client.close()


async def glide_async_rate_scenario(url: str, *, calls: int, warmup: int) -> Outcome:
    """crmcache's own rate_limit.lua through glide's ``invoke_script`` (EVALSHA, EVAL on
    NOSCRIPT), on test_bench_mux.py's counter: the same Redis work as check_rate_limit."""
    glide = pytest.importorskip("glide", reason=NOT_INSTALLED)
    host, port, database = _address(url)
    config = glide.GlideClientConfiguration([glide.NodeAddress(host, port)], database_id=database)
    client = await glide.GlideClient.create(config)
    script = glide.Script(load_script_source("rate_limit"))
    key = KeySpace(DEFAULT_KEY_PREFIX).rate_limit_key(API, WINDOW)
    args = [str(LIMIT), str(WINDOW * 1000), "1"]

    async def check(_client_id: str) -> object:
        reply = await client.invoke_script(script, keys=[key], args=args)
        return reply if isinstance(reply, list) and reply[0] == 1 else None

    try:
        await run_tasks(check, TASKS, warmup)
        return Outcome(run=await run_tasks(check, TASKS, calls))
    finally:
        await client.close()


def test_mux_ratelimit_glide_async(
    benchmark: BenchmarkFixture, bench_redis_url: str, prefilled: dict[str, ClientPreferences]
) -> None:
    pytest.importorskip("glide", reason=NOT_INSTALLED)
    benchmark.group = f"mux-ratelimit-{TASKS}tasks"
    calls, warmup = _sizes(benchmark)
    out = _pedantic(
        benchmark,
        lambda: asyncio.run(
            glide_async_rate_scenario(bench_redis_url, calls=calls, warmup=warmup)
        ),
    )
    _record(benchmark, "ratelimit", "glide-async", out)
    _assert_clean(out, calls)


def test_mux_prefs_glide_async(
    benchmark: BenchmarkFixture, bench_redis_url: str, prefilled: dict[str, ClientPreferences]
) -> None:
    pytest.importorskip("glide", reason=NOT_INSTALLED)
    benchmark.group = f"mux-prefs-{TASKS}tasks"
    calls, warmup = _sizes(benchmark)
    out = _pedantic(
        benchmark,
        lambda: asyncio.run(glide_async_scenario(bench_redis_url, calls=calls, warmup=warmup)),
    )
    _record(benchmark, "prefs", "glide-async", out)
    _assert_clean(out, calls)


def test_mux_prefs_glide_sync(
    benchmark: BenchmarkFixture, bench_redis_url: str, prefilled: dict[str, ClientPreferences]
) -> None:
    glide_sync = pytest.importorskip("glide_sync", reason=NOT_INSTALLED)
    benchmark.group = f"mux-prefs-{TASKS}tasks"
    calls, warmup = _sizes(benchmark)
    calls -= calls % SYNC_THREADS
    host, port, database = _address(bench_redis_url)
    config = glide_sync.GlideClientConfiguration(
        [glide_sync.NodeAddress(host, port)], database_id=database
    )
    client = glide_sync.GlideClient.create(config)
    # run_threaded hands out test_bench_threads.py's client ids: read the keys prefilled here.
    key_of = dict(zip(THREAD_CLIENT_IDS, KEYS, strict=True))

    def read(client_id: str) -> object:
        return _decode(client.get(key_of[client_id]))

    try:
        run_threaded(read, SYNC_THREADS, warmup)
        run = benchmark.pedantic(  # type: ignore[no-untyped-call]
            run_threaded, args=(read, SYNC_THREADS, calls), rounds=1, iterations=1
        )
    finally:
        client.close()
    out = Outcome(run=run)
    _record(benchmark, "prefs", "glide-sync", out)
    _assert_clean(out, calls)
