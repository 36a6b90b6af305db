"""Replies that mean "the topology moved" are their own class of failure: the call degrades,
they are counted and logged apart, and the breaker treats them as neither an outage nor a
refusal. Tried on real servers: a replica (READONLY) and a cluster node that serves no
slot (CLUSTERDOWN)."""

from __future__ import annotations

import logging
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from crmcache import BreakerState, ClientPreferences, CRMCacheManager
from crmcache.testing import RedisServer, find_redis_server_binary, free_loopback_port
from helpers import poll

#: More calls than the breaker's failure threshold (5): an outage would have opened it.
CALLS = 12


def _port_with_bus() -> int:
    """A free loopback port whose cluster bus port (+10000) is free too."""
    for _ in range(50):
        port = free_loopback_port()
        if port + 10000 >= 65536:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise AssertionError("no free port pair for a cluster node")


@pytest.fixture
def replica() -> Iterator[tuple[RedisServer, RedisServer]]:
    """A primary and a replica of it (read-only from its start, synced or not)."""
    if find_redis_server_binary() is None:
        pytest.skip("needs a redis-server binary")
    primary = RedisServer()
    primary.start()
    follower = RedisServer(extra_args=["--replicaof", "127.0.0.1", str(primary.port)])
    try:
        follower.start()
        with redis.Redis.from_url(follower.url) as client:
            assert client.info("replication")["role"] == "slave"
        yield primary, follower
    finally:
        follower.stop()
        primary.stop()


def test_writes_to_a_replica_are_topology_errors(
    replica: tuple[RedisServer, RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    """A replica answers READONLY: writes return False, counted as topology errors (not as
    Redis errors), the breaker stays closed however many fail, one WARNING says why."""
    _, follower = replica
    caplog.set_level(logging.WARNING, logger="crmcache")
    with CRMCacheManager(redis_url=follower.url) as cache:
        for i in range(CALLS):
            assert cache.set_client_preferences(ClientPreferences(client_id=f"c{i}")) is False
        assert cache.set_template("welcome", "email", "hi") is False
        assert cache.get_client_preferences("c0") is None  # reads work on a replica
        stats = cache.get_stats()
        assert stats.counters["topology_errors"] == CALLS + 1
        assert stats.counters["redis_errors"] == 0
        assert stats.counters["writes_failed"] == CALLS + 1
        assert cache._breaker.state is BreakerState.CLOSED
        # Not silent: the handshake found out what the URL points at.
        assert stats.topology == "replica"
        assert cache.health_check() is False
    moved = [r for r in caplog.records if "topology changed" in r.getMessage()]
    assert len(moved) == 1, [r.getMessage() for r in caplog.records]
    assert "ReadOnlyError" in moved[0].getMessage()
    told = [r for r in caplog.records if "points at a replica" in r.getMessage()]
    assert len(told) == 1, [r.getMessage() for r in caplog.records]
    assert told[0].levelno == logging.ERROR
    assert "Point redis_url at the primary" in told[0].getMessage()


def test_a_replay_that_cannot_succeed_says_so_once(
    replica: tuple[RedisServer, RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    """Invalidations a replica refused are kept for the replay, which does not send them
    while the URL points at a replica: one ERROR says why, the stats show them pending."""
    _, follower = replica
    caplog.set_level(logging.ERROR, logger="crmcache")
    with CRMCacheManager(redis_url=follower.url) as cache:
        assert cache.invalidate_client_preferences("c1") is False
        assert cache.invalidate_template("welcome", "email") is False

        def said() -> list[str]:
            return [
                r.getMessage() for r in caplog.records if "cannot be replayed" in r.getMessage()
            ]

        poll(said, timeout=10.0, what="the replay says it cannot succeed")
        stats = cache.get_stats()
        assert stats.pending_invalidations == 2
        assert stats.counters["invalidations_replayed"] == 0
        assert said() == [
            "2 invalidation(s) cannot be replayed: redis_url points at a replica; they are "
            "kept (up to the cap) until it points at what serves the keys"
        ]


def test_a_cluster_node_without_slots_is_a_topology_error() -> None:
    """A cluster node that serves no slot answers CLUSTERDOWN: reads miss, rate limits
    follow the policy, and the breaker stays closed (the node is up)."""
    if find_redis_server_binary() is None:
        pytest.skip("needs a redis-server binary")
    node = RedisServer(port=_port_with_bus(), extra_args=["--cluster-enabled", "yes"])
    node.start()
    try:
        with CRMCacheManager(redis_url=node.url, rate_limit_policy="closed") as cache:
            for i in range(CALLS):
                assert cache.get_client_preferences(f"c{i}") is None
            result = cache.check_rate_limit("sms", limit=5)
            assert (result.allowed, result.degraded) == (False, True)
            stats = cache.get_stats()
            counters = stats.counters
            assert counters["topology_errors"] == CALLS + 1
            assert counters["redis_errors"] == 0
            assert cache._breaker.state is BreakerState.CLOSED
            assert stats.topology == "cluster-node"
            assert cache.health_check() is False
    finally:
        node.stop()


def test_a_cluster_node_is_named_once_at_error(caplog: pytest.LogCaptureFixture) -> None:
    """A plain redis:// URL on a cluster node is not silent: one ERROR names it and says
    what crmcache serves, however many connections open."""
    if find_redis_server_binary() is None:
        pytest.skip("needs a redis-server binary")
    caplog.set_level(logging.ERROR, logger="crmcache")
    node = RedisServer(port=_port_with_bus(), extra_args=["--cluster-enabled", "yes"])
    node.start()
    try:
        with CRMCacheManager(redis_url=node.url) as cache:
            for i in range(5):
                cache.get_template(f"t{i}", "email")
            assert cache.health_check() is False
    finally:
        node.stop()
    told = [r for r in caplog.records if "Redis Cluster node" in r.getMessage()]
    assert len(told) == 1, [r.getMessage() for r in caplog.records]


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[str]:
    """A Redis Sentinel monitoring a primary; yields its redis:// URL."""
    binary = find_redis_server_binary()
    if binary is None:
        pytest.skip("needs a redis-server binary")
    with RedisServer() as primary:
        port = free_loopback_port()
        conf = tmp_path / "sentinel.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
            f"sentinel monitor crm 127.0.0.1 {primary.port} 1\n"
        )
        process = subprocess.Popen(
            [binary, str(conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5)
            poll(lambda: _answers(client), timeout=10.0)
            client.close()
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(timeout=10)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def test_a_sentinel_is_named_and_unhealthy(
    sentinel: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A plain redis:// URL on a Sentinel: calls degrade, one ERROR says it is a Sentinel
    and to point at the primary, health_check is False although the Sentinel answers
    PING, and the stats say what it is."""
    caplog.set_level(logging.WARNING, logger="crmcache")
    with CRMCacheManager(redis_url=sentinel) as cache:
        assert cache.get_template("welcome", "email") is None
        assert cache.set_template("welcome", "email", "hi") is False
        assert cache.check_rate_limit("sms", 5).degraded
        assert cache.health_check() is False
        assert cache.get_stats().topology == "sentinel"
    told = [r for r in caplog.records if "Redis Sentinel" in r.getMessage()]
    assert len(told) == 1, [r.getMessage() for r in caplog.records]
    assert told[0].levelno == logging.ERROR


def test_a_standalone_redis_is_named_in_the_stats(redis_url: str) -> None:
    """On the suite's own Redis the stats say "standalone" once a connection was made,
    "unknown" before, and health_check is True."""
    with CRMCacheManager(redis_url=redis_url) as cache:
        assert cache.get_stats().topology in {"unknown", "standalone"}
        assert cache.health_check() is True
        cache.get_template("t", "email")
        assert cache.get_stats().topology == "standalone"
