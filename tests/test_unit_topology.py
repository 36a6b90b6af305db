"""crmcache._topology without Redis: INFO replies classified, and what is said about each."""

from __future__ import annotations

import pytest

from crmcache._topology import Topology, classify, explain

STANDALONE = b"# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\n"
PRIMARY = b"# Replication\r\nrole:master\r\nconnected_slaves:1\r\n"
REPLICA = b"# Replication\r\nrole:slave\r\nmaster_host:10.0.0.1\r\n"


@pytest.mark.parametrize(
    ("server", "replication", "expected"),
    [
        (STANDALONE, PRIMARY, Topology.STANDALONE),
        (STANDALONE, REPLICA, Topology.REPLICA),
        (STANDALONE.replace(b"standalone", b"cluster"), PRIMARY, Topology.CLUSTER_NODE),
        (STANDALONE.replace(b"standalone", b"sentinel"), b"", Topology.SENTINEL),
        (b"", b"", Topology.STANDALONE),  # an old or odd server: no mode said, no role
    ],
)
def test_info_is_classified(server: bytes, replication: bytes, expected: Topology) -> None:
    """redis_mode names a cluster node or a Sentinel; role:slave a replica; else standalone."""
    assert classify(server, replication) is expected


def test_only_standalone_cluster_and_unknown_are_servable() -> None:
    """crmcache serves a standalone Redis or primary, and a whole cluster through
    ``redis+cluster://``; it has nothing to say until it knows."""
    assert {t for t in Topology if t.servable} == {
        Topology.UNKNOWN,
        Topology.STANDALONE,
        Topology.CLUSTER,
    }


@pytest.mark.parametrize(
    ("topology", "words"),
    [
        (Topology.SENTINEL, "Sentinel"),
        (Topology.CLUSTER_NODE, "Cluster node"),
        (Topology.REPLICA, "replica"),
        (Topology.NOT_A_CLUSTER, "without cluster mode"),
    ],
)
def test_each_unservable_topology_is_explained(topology: Topology, words: str) -> None:
    """The ERROR line names what the URL points at, with the (masked) URL, and what to do."""
    message = explain(topology, "redis://:***@cache:6379/0")
    assert message is not None
    assert words in message
    assert "redis://:***@cache:6379/0" in message


def test_servable_topologies_need_no_explanation() -> None:
    """Nothing is said about a standalone Redis or an unknown one."""
    assert explain(Topology.STANDALONE, "redis://cache") is None
    assert explain(Topology.UNKNOWN, "redis://cache") is None


def test_a_cluster_node_behind_a_plain_url_points_at_the_cluster_url_form() -> None:
    """The ERROR line for ``redis://`` on a cluster node says which URL form to use."""
    message = explain(Topology.CLUSTER_NODE, "redis://cache:7000/0")
    assert message is not None
    assert "redis+cluster://" in message
