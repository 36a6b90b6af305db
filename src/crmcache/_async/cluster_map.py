"""The slot map and the nodes of a Redis Cluster transport (``redis+cluster://``).

The seed nodes of the URL (then the primaries last known) are asked ``CLUSTER SLOTS`` on
their health connection (bounded by the connect timeout), and the reply is checked
before it is trusted (``crmcache._cluster``). One request is in flight at a time; a
caller that needs the map waits for it within its own deadline. The map is learnt:

* on the first call, and when a call finds a slot no primary is known for;
* after ``MOVED`` (the slot is pointed at the node named at once, the whole map in the
  background), ``CLUSTERDOWN``, and a dropped or refused connection;
* about once a second in the background while calls are made, so that a failover or a
  resharding is seen even before a call fails.

When a slot changes primary it is logged once, and :attr:`on_primary_change` is told:
the core then replays the invalidations confirmed since the map was last verified
(replication is asynchronous: a primary that dies may not have passed them on), flushes
the near cache and reconnects its listeners to the new primaries.

Each node gets three pools, made on first use: data (keyed calls, ``max_connections``),
admin (``SCAN``, ``INFO``) and health (``PING``, ``CLUSTER SLOTS``: one connection whose
whole call is bounded by the connect timeout). A node whose handshake shows no cluster
mode (or a Sentinel) makes the transport unservable: one ERROR, ``health_check()`` False.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import MovedError, RedisError, ResponseError

from .._cluster import SLOTS, BadSlotMapError, SlotMap, parse_cluster_slots
from .._config import CacheSettings, cluster_target
from .._guard import DEFAULT_LOG_INTERVAL, LogThrottle, new_breaker
from .._scripts import register_scripts
from .._topology import Topology, classify, explain
from .cluster_node import AsyncClusterNodePool
from .node import ADMIN_CONNECTIONS, MAX_PREFERENCES_BYTES, health_kwargs, parse_node_url
from .pool import AsyncLeanPool
from .primitives import Background, Event, spawn
from .transport import AsyncAdminNode

__all__ = ["RETRY_INTERVAL", "VERIFY_INTERVAL", "AsyncClusterMap"]

logger = logging.getLogger("crmcache")

#: Seconds between background checks of the slot map while calls are made.
VERIFY_INTERVAL = 1.0
#: Seconds a map just learnt is not asked for again (a burst of MOVED asks once).
RETRY_INTERVAL = 0.05


@dataclass(eq=False, slots=True)
class _Node:
    """One node's pools: data (keyed calls), admin (SCAN, INFO), health (PING, map)."""

    address: str
    data: AsyncClusterNodePool
    admin: AsyncLeanPool
    health: AsyncLeanPool


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class AsyncClusterMap:
    """The node registry and the slot map of a Cluster transport (see the module
    docstring); :class:`~crmcache._async.cluster.AsyncClusterTransport` routes by it."""

    #: Told when slots changed primary (set by the core; see ``AsyncTransport``).
    on_primary_change: Callable[[float], None] | None = None

    def __init__(
        self,
        settings: CacheSettings,
        scrub: Callable[[str], str],
        *,
        node_pool: Callable[..., AsyncClusterNodePool] = AsyncClusterNodePool,
    ) -> None:
        self._node_pool = node_pool
        target = cluster_target(settings.redis_url)
        parsed = parse_node_url(target.node_url, settings, scrub)
        self.connection_class = parsed.connection_class
        self.connection_kwargs = parsed.connection_kwargs
        self.scripts = register_scripts(Redis(connection_pool=parsed))
        self._settings = settings
        self._masked_url = settings.masked_url
        self._scrub = scrub
        self._seeds = tuple(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in target.seeds)
        self._nodes: dict[str, _Node] = {}
        self._nodes_lock = threading.Lock()
        #: The data pool of each slot's primary (None: not known yet, or not served).
        self._owners: list[AsyncClusterNodePool | None] = [None] * SLOTS
        self._map: SlotMap | None = None
        self._call_timeout = settings.socket_timeout
        self._refreshing: Event | None = None
        self._refresh_lock = threading.Lock()
        self._asked_at = -RETRY_INTERVAL
        self._verified_at = 0.0
        self._checked_at = 0.0
        self._verifier: Background | None = None
        self._warnings = LogThrottle(DEFAULT_LOG_INTERVAL)
        self._told: Topology | None = None
        self._closed = False
        self.topology = Topology.UNKNOWN

    # -- nodes ------------------------------------------------------------------------

    def _node(self, address: str) -> _Node:
        """The pools of ``address``, made on first use (no connection is opened here)."""
        node = self._nodes.get(address)
        if node is not None:
            return node
        with self._nodes_lock:
            node = self._nodes.get(address)
            if node is None:
                node = self._nodes[address] = self._make_node(address)
            return node

    def _make_node(self, address: str) -> _Node:
        s, cls = self._settings, self.connection_class
        host, port = _host_port(address)
        kwargs = {**self.connection_kwargs, "host": host, "port": port}
        health = health_kwargs(kwargs, s)
        data = self._node_pool(
            lambda: cls(**kwargs),
            max_connections=s.max_connections,
            timeout=s.pool_timeout,
            address=address,
            on_info=self._learn,
            call_timeout=s.socket_timeout,
            connect_timeout=s.socket_connect_timeout,
            max_value_bytes=max(s.max_template_bytes, MAX_PREFERENCES_BYTES),
        )
        # Each primary's own breaker, configured like the manager's.
        data.breaker = new_breaker(s.breaker_failures, s.breaker_max_backoff)
        return _Node(
            address=address,
            data=data,
            admin=AsyncLeanPool(
                lambda: cls(**kwargs),
                max_connections=ADMIN_CONNECTIONS,
                timeout=s.pool_timeout,
                address=address,
                call_timeout=s.socket_timeout,
                connect_timeout=s.socket_connect_timeout,
            ),
            health=AsyncLeanPool(
                lambda: cls(**health),
                max_connections=1,
                timeout=s.socket_connect_timeout,
                retry_dropped=False,
                address=address,
                call_timeout=s.socket_connect_timeout,
                whole_call=True,
                on_info=self._learn,
            ),
        )

    def _learn(self, server: bytes, replication: bytes) -> None:
        """A new connection's INFO: a node without cluster mode (or a Sentinel) cannot
        serve a Cluster URL: one ERROR line, and health reports False."""
        found = classify(server, replication)
        if found is Topology.CLUSTER_NODE:
            if self.topology is Topology.UNKNOWN:
                self.topology = Topology.CLUSTER
            return
        sentinel = found is Topology.SENTINEL
        self._unservable(Topology.SENTINEL if sentinel else Topology.NOT_A_CLUSTER)

    def _unservable(self, topology: Topology) -> None:
        self.topology = topology
        if self._told is topology:
            return
        self._told = topology
        message = explain(topology, self._masked_url)
        if message is not None:
            logger.error(message)

    def _moved(self, exc: MovedError) -> AsyncClusterNodePool:
        """Point the slot at the node ``MOVED`` named; learn the whole map soon."""
        pool = self._node(_address(exc.host, exc.port)).data
        if 0 <= exc.slot_id < SLOTS:
            self._owners[exc.slot_id] = pool
        self._checked_at = 0.0  # the next call checks the map in the background
        return pool

    # -- the slot map -------------------------------------------------------------------

    def _verify_soon(self) -> None:
        """Learn the map in the background (at most one such job at a time)."""
        if self._closed:
            return
        with self._refresh_lock:
            if self._refreshing is not None or (
                self._verifier is not None and self._verifier.is_alive()
            ):
                return
            self._verifier = spawn(self._verify, "crmcache-cluster-verify")

    async def _verify(self) -> None:
        await self._refresh(time.monotonic() + self._settings.socket_connect_timeout, force=True)

    async def refresh(self) -> bool:
        """Learn the slot map if it is unknown; False if no node answered."""
        if self._map is None:
            await self._refresh(time.monotonic() + self._settings.socket_connect_timeout)
        return self._map is not None

    async def _refresh(self, deadline: float, *, force: bool = False) -> None:
        """Ask the nodes for the slot map, or wait (until ``deadline``) for the request
        in flight. Never raises a Redis error: a failure is logged."""
        with self._refresh_lock:
            running = self._refreshing
            if running is None:
                if not force and time.monotonic() - self._asked_at < RETRY_INTERVAL:
                    return  # asked a moment ago: that answer stands
                mine = self._refreshing = Event()
        if running is not None:
            await running.wait(max(0.0, deadline - time.monotonic()))
            return
        try:
            await self._load(deadline)
        finally:
            with self._refresh_lock:
                self._refreshing = None
            mine.set()

    async def _load(self, deadline: float) -> None:
        started = self._asked_at = time.monotonic()
        known = self._map.primaries if self._map is not None else ()
        failures: list[str] = []
        candidates = list(dict.fromkeys((*known, *self._seeds)))
        # A primary whose breaker is open is asked last: it is likely the one that hangs.
        candidates.sort(key=lambda address: self._node(address).data.breaker.failures > 0)
        for address in candidates:
            if time.monotonic() >= deadline:
                break
            node = self._node(address)
            try:
                reply = await node.health.execute("CLUSTER", "SLOTS")
                found = parse_cluster_slots(reply, _host_port(address)[0])
            except ResponseError as exc:
                if "cluster support disabled" in str(exc):
                    self._unservable(Topology.NOT_A_CLUSTER)
                    return
                failures.append(f"{address}: {self._scrub(str(exc))}")
                continue
            except (RedisError, OSError, BadSlotMapError) as exc:
                failures.append(f"{address}: {type(exc).__name__}: {self._scrub(str(exc))}")
                continue
            if found.covered:
                self._install(found, started)
                return
            failures.append(f"{address}: serves no slot")
        suppressed = self._warnings.ready()
        if suppressed is not None:
            logger.warning(
                "no node of %s answered CLUSTER SLOTS (%d more not logged): %s",
                self._masked_url,
                suppressed,
                "; ".join(failures) or "the call's deadline passed",
            )

    def _install(self, found: SlotMap, started: float) -> None:
        """Route by ``found``; log and announce a change of primaries."""
        pools = [self._node(address).data for address in found.primaries]
        previous, since = self._map, self._verified_at
        self._owners = [pools[index] if index >= 0 else None for index in found.owners]
        self._map, self._verified_at = found, started
        if self.topology is Topology.UNKNOWN:
            self.topology = Topology.CLUSTER
        if previous is None:
            logger.info(
                "cluster %s: %d primaries serve %d of %d slots",
                self._masked_url,
                len(found.primaries),
                found.covered,
                SLOTS,
            )
            return
        if found.owners == previous.owners and found.primaries == previous.primaries:
            return
        moved = found.moved_slots(previous)
        if not moved:
            return
        logger.warning(
            "cluster %s: %d slot(s) changed primary; primaries now %s",
            self._masked_url,
            moved,
            ", ".join(found.primaries),
        )
        listener = self.on_primary_change
        if listener is not None:
            listener(since)

    # -- admin, health, lifecycle ------------------------------------------------------

    def primaries(self) -> Sequence[AsyncAdminNode]:
        """Every primary of the map last learnt, on its admin pool (the seeds before)."""
        addresses = self._map.primaries if self._map is not None else self._seeds[:1]
        return [self._node(address).admin for address in addresses]

    def nodes(self) -> list[str]:
        """Every primary's ``host:port`` (the map last learnt)."""
        return list(self._map.primaries) if self._map is not None else []
