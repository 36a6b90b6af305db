"""What a ``redis://`` URL turned out to point at, learnt from the connection handshake.

crmcache serves one standalone Redis (or a primary) per ``redis_url``. Pointed at
something else it would fail quietly: a Redis Cluster node answers ``MOVED`` for the two
thirds of keys it does not own, a replica answers ``READONLY`` to every write, a Sentinel
knows none of the data commands. So the lean pool's handshake asks ``INFO server`` and
``INFO replication`` in the same write (no extra round trip), and the answer is
classified here: a topology crmcache cannot serve is logged once at ERROR, saying what
it is and what to point ``redis_url`` at, makes :meth:`health_check` report False, and
shows in the stats (``topology``).
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Topology", "classify", "explain"]


class Topology(StrEnum):
    """What the node behind ``redis_url`` is."""

    #: Not known yet (no connection opened so far).
    UNKNOWN = "unknown"
    #: A standalone Redis, or the primary of a replicated one: what crmcache serves.
    STANDALONE = "standalone"
    #: A replica: reads are served, every write answers READONLY.
    REPLICA = "replica"
    #: A Redis Cluster node: keys of slots it does not own answer MOVED.
    CLUSTER_NODE = "cluster-node"
    #: A Redis Sentinel: it holds no data.
    SENTINEL = "sentinel"
    #: A Redis Cluster, served through ``redis+cluster://`` (slot routing).
    CLUSTER = "cluster"
    #: A ``redis+cluster://`` URL whose nodes run without cluster mode.
    NOT_A_CLUSTER = "not-a-cluster"

    @property
    def servable(self) -> bool:
        """True if crmcache can serve its calls through this node."""
        return self in {Topology.UNKNOWN, Topology.STANDALONE, Topology.CLUSTER}


def _field(info: bytes, name: bytes) -> bytes | None:
    """The value of ``name:`` in a raw INFO reply, or None."""
    for line in info.splitlines():
        if line.startswith(name + b":"):
            return line[len(name) + 1 :].strip()
    return None


def classify(server: bytes, replication: bytes) -> Topology:
    """The topology an ``INFO server`` and an ``INFO replication`` reply describe."""
    mode = _field(server, b"redis_mode")
    if mode == b"sentinel":
        return Topology.SENTINEL
    if mode == b"cluster":
        return Topology.CLUSTER_NODE
    if _field(replication, b"role") == b"slave":
        return Topology.REPLICA
    return Topology.STANDALONE


def explain(topology: Topology, masked_url: str) -> str | None:
    """The one ERROR line for a topology crmcache cannot serve; None for one it can."""
    if topology is Topology.SENTINEL:
        return (
            f"redis_url {masked_url} points at a Redis Sentinel, which holds no data: every "
            "cache call fails. Point redis_url at the primary the Sentinels monitor."
        )
    if topology is Topology.CLUSTER_NODE:
        return (
            f"redis_url {masked_url} points at a Redis Cluster node: keys hashed to other "
            "nodes fail with MOVED (counted as topology_errors), so most calls degrade and "
            "rate limits fall back to their failure policy. Use "
            "redis+cluster://host:port[,host:port...] to serve the whole cluster."
        )
    if topology is Topology.NOT_A_CLUSTER:
        return (
            f"redis_url {masked_url} names a Redis Cluster, but its node runs without "
            "cluster mode (CLUSTER SLOTS refused): every cache call fails. Use redis:// "
            "for a standalone Redis, or enable cluster mode."
        )
    if topology is Topology.REPLICA:
        return (
            f"redis_url {masked_url} points at a replica: every write and invalidation fails "
            "with READONLY (counted as topology_errors), and rate limits fall back to their "
            "failure policy. Point redis_url at the primary."
        )
    return None
