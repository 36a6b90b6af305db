"""The Redis Cluster transport (``redis+cluster://``, ``rediss+cluster://``).

The seed nodes of the URL are asked ``CLUSTER SLOTS`` (checked before it is trusted, see
``crmcache._cluster``); after that every keyed call goes straight to the lean pool of the
primary serving the key's slot: one memoised CRC16 and one list index in front of a
lean-pool call. Replicas are never written, and reads stay on the primaries.

When the cluster answers otherwise:

* ``MOVED``: the slot is pointed at the node named, the call sent there, and the whole
  map learnt again in the background;
* ``ASK``: the call is sent once to the node named, after ``ASKING``;
* ``TRYAGAIN`` / ``CLUSTERDOWN``: retried with a back-off that doubles from 10 ms, the
  map learnt again on ``CLUSTERDOWN``, all within the call's one deadline
  (``socket_timeout``);
* a dropped or refused connection: the map is learnt again at once, and the call is
  sent once more if the slot now has another primary (a failover); otherwise the
  error reaches the core, which degrades the call;
* ``NOSCRIPT``: the script is loaded on that node (each node keeps its own cache).

Batches (``MGET``/``MSET`` of templates) are grouped by slot (a cluster refuses one
command over two slots) and by node: every node's commands are written in one go, to all
nodes before any reply is read, so the nodes work concurrently and a batch costs one
round trip per node. A group that is redirected or fails is sent again through the
keyed path above.

The map is also checked about once a second while calls are made. When a slot changes
primary (a failover or a resharding) it is logged once, the near cache is flushed and
its listeners follow the new primaries, and the core replays the invalidations the
former primaries confirmed since the map was last verified (replication is asynchronous:
a primary that dies may not have passed them on). ``max_connections`` applies per node.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._cluster import SLOTS, BadSlotMapError, SlotMap, group_by_slot, parse_cluster_slots, slot_of
from .._config import CacheSettings, cluster_target
from .._guard import DEFAULT_LOG_INTERVAL, LogThrottle, PoolClosedError, PoolExhaustedError
from .._scripts import ScriptLike, register_scripts
from .._stats import PoolAccounting
from .._topology import Topology, classify, explain
from .cluster_node import AsyncClusterNodePool
from .node import (
    ADMIN_CONNECTIONS,
    MAX_PREFERENCES_BYTES,
    health_kwargs,
    parse_node_url,
    tracking_kwargs,
)
from .pool import AsyncLeanPool
from .primitives import Background, Event, sleep, spawn, within
from .transport import AsyncAdminNode, AsyncTransport

__all__ = ["MAX_REDIRECTS", "VERIFY_INTERVAL", "AsyncClusterTransport"]

logger = logging.getLogger("crmcache")

#: Redirections and retries one call follows at most.
MAX_REDIRECTS = 5
#: The first back-off after ``TRYAGAIN`` / ``CLUSTERDOWN`` (doubled each time).
FIRST_BACKOFF = 0.01
#: Seconds between background checks of the slot map while calls are made.
VERIFY_INTERVAL = 1.0
#: Seconds a map just learnt is not asked for again (a burst of MOVED asks once).
RETRY_INTERVAL = 0.05
#: Errors after which a call is routed again (the pool's own are not among them).
_REROUTED = (MovedError, AskError, TryAgainError, ClusterDownError, RedisConnectionError)
#: Stands for a batch command whose group failed: it is sent again on its own.
_AGAIN = object()


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


class AsyncClusterTransport(AsyncTransport):
    """Every primary of a Redis Cluster, routed by slot (see the module docstring).

    Args:
        settings: the manager's settings; ``redis_url`` is a Cluster URL.
        scrub: removes the password from a message.

    Raises:
        ConfigurationError: the URL cannot be used.
    """

    #: Slots can change primary under the transport (failover, resharding).
    may_fail_over = True

    def __init__(self, settings: CacheSettings, scrub: Callable[[str], str]) -> None:
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
        return _Node(
            address=address,
            data=AsyncClusterNodePool(
                lambda: cls(**kwargs),
                max_connections=s.max_connections,
                timeout=s.pool_timeout,
                address=address,
                on_info=self._learn,
                call_timeout=s.socket_timeout,
                connect_timeout=s.socket_connect_timeout,
                max_value_bytes=max(s.max_template_bytes, MAX_PREFERENCES_BYTES),
            ),
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

    # -- the data path ----------------------------------------------------------------

    async def execute(self, *args: Any, check: Any = None) -> Any:  # noqa: ANN401 - a raw Redis reply
        """The command on the primary of ``args[1]``'s slot, redirections followed."""
        slot = slot_of(args[1])
        pool = self._owners[slot]
        now = time.monotonic()
        if now - self._checked_at > VERIFY_INTERVAL:
            self._checked_at = now
            self._verify_soon()
        if pool is not None:
            try:
                return await pool.execute(*args, check=check)
            except (PoolExhaustedError, PoolClosedError):
                raise
            except _REROUTED as exc:
                return await self._reroute(exc, slot, _command(args, check))
            except (TimeoutError, RedisTimeoutError):
                self._checked_at = 0.0  # a hung primary: the next call checks the map
                raise
        return await self._reroute(None, slot, _command(args, check))

    async def evalsha(self, script: ScriptLike, keys: Sequence[Any], args: Sequence[Any]) -> Any:  # noqa: ANN401
        """The script on the primary of ``keys[0]``'s slot, loaded there on ``NOSCRIPT``."""
        slot = slot_of(keys[0])
        pool = self._owners[slot]
        now = time.monotonic()
        if now - self._checked_at > VERIFY_INTERVAL:
            self._checked_at = now
            self._verify_soon()
        if pool is not None:
            try:
                return await pool.evalsha(script, keys, args)
            except (PoolExhaustedError, PoolClosedError):
                raise
            except _REROUTED as exc:
                return await self._reroute(exc, slot, _script(script, keys, args))
            except (TimeoutError, RedisTimeoutError):
                self._checked_at = 0.0
                raise
        return await self._reroute(None, slot, _script(script, keys, args))

    async def _reroute(
        self,
        exc: BaseException | None,
        slot: int,
        run: Callable[[AsyncClusterNodePool, bool], Awaitable[Any]],
    ) -> Any:  # noqa: ANN401
        """Follow the cluster's answer ``exc`` (None: the slot's primary is not known yet)
        until the call succeeds, within its one deadline and :data:`MAX_REDIRECTS`."""
        deadline = time.monotonic() + self._call_timeout
        for attempt in range(MAX_REDIRECTS + 1):
            asking = False
            if isinstance(exc, MovedError):
                pool = self._moved(exc)
            elif isinstance(exc, AskError):
                pool, asking = self._node(_address(exc.host, exc.port)).data, True
            elif exc is None or isinstance(exc, TryAgainError | ClusterDownError):
                if exc is not None:
                    left = max(0.0, deadline - time.monotonic())
                    await sleep(min(FIRST_BACKOFF * 2**attempt, left))
                if exc is None or isinstance(exc, ClusterDownError):
                    await self._refresh(deadline, force=exc is not None)
                found = self._owners[slot]
                if found is None:
                    raise exc or ClusterDownError(f"slot {slot} is served by no known primary")
                pool = found
            else:  # the connection dropped or was refused: is there a new primary?
                before = self._owners[slot]
                await self._refresh(deadline, force=True)
                found = self._owners[slot]
                if found is None or found is before:
                    raise exc
                pool = found
            if attempt == MAX_REDIRECTS or time.monotonic() >= deadline:
                break
            try:
                return await run(pool, asking)
            except (PoolExhaustedError, PoolClosedError):
                raise
            except _REROUTED as again:
                exc = again
        raise exc or ClusterDownError(f"slot {slot}: no primary answered")

    def _moved(self, exc: MovedError) -> AsyncClusterNodePool:
        """Point the slot at the node ``MOVED`` named; learn the whole map soon."""
        pool = self._node(_address(exc.host, exc.port)).data
        if 0 <= exc.slot_id < SLOTS:
            self._owners[exc.slot_id] = pool
        self._checked_at = 0.0  # the next call checks the map in the background
        return pool

    # -- batches ----------------------------------------------------------------------

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """One ``MGET`` per slot, every node's in one write, all nodes at once."""
        groups = group_by_slot(keys)
        if len(groups) == 1:
            return await self.execute("MGET", *keys)  # type: ignore[no-any-return]
        positions = list(groups.values())
        commands = [("MGET", *[keys[i] for i in where]) for where in positions]
        replies = await self._scatter(list(groups), commands)
        values: list[bytes | None] = [None] * len(keys)
        for where, reply in zip(positions, replies, strict=True):
            for index, value in zip(where, reply, strict=True):
                values[index] = value
        return values

    async def mset(self, values: Mapping[str, bytes]) -> None:
        """One ``MSET`` per slot, every node's in one write, all nodes at once (each
        slot's group is atomic, the batch as a whole is not)."""
        items = list(values.items())
        groups = group_by_slot([key for key, _ in items])
        commands = [
            ("MSET", *[part for i in where for part in items[i]]) for where in groups.values()
        ]
        if len(commands) == 1:
            await self.execute(*commands[0])
            return
        await self._scatter(list(groups), commands)

    async def _scatter(self, slots: list[int], commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` (one per slot of ``slots``) grouped by node: write to every
        node, then read every node. A command whose group failed or was redirected is
        sent again on the keyed path."""
        by_pool: dict[AsyncClusterNodePool, list[int]] = {}
        for index, slot in enumerate(slots):
            pool = self._owners[slot]
            if pool is not None:
                by_pool.setdefault(pool, []).append(index)
        replies: list[Any] = [_AGAIN] * len(commands)
        await self._send_groups(by_pool, commands, replies)
        for i, reply in enumerate(replies):
            if isinstance(reply, MovedError):
                self._moved(reply)
            elif isinstance(reply, ResponseError) and not isinstance(reply, _REROUTED):
                raise reply
            if reply is _AGAIN or isinstance(reply, ResponseError):
                replies[i] = await self.execute(*commands[i])
        return replies

    async def _send_groups(
        self,
        by_pool: dict[AsyncClusterNodePool, list[int]],
        commands: list[tuple[Any, ...]],
        replies: list[Any],
    ) -> None:
        """Write each pool's commands, then read each pool's replies into ``replies``
        (a group that could not be sent or read is left as it was)."""
        deadline = time.monotonic() + self._call_timeout
        leased: list[tuple[AsyncClusterNodePool, Any, list[int]]] = []
        done: list[bool] = []
        try:
            async with within(self._call_timeout):
                # One order for every batch: two batches never wait on each other's slots.
                for pool in sorted(by_pool, key=lambda p: p.address):
                    leased.append((pool, await pool.lease(), by_pool[pool]))
                    done.append(False)
                sent = [False] * len(leased)
                for n, (pool, conn, where) in enumerate(leased):
                    with contextlib.suppress(RedisConnectionError, OSError):
                        await pool.send_batch(conn, [commands[i] for i in where], deadline)
                        sent[n] = True
                for n, (pool, conn, where) in enumerate(leased):
                    if not sent[n]:
                        continue
                    with contextlib.suppress(RedisConnectionError, OSError):
                        got = await pool.read_batch(
                            conn, [commands[i] for i in where], [None] * len(where), deadline
                        )
                        done[n] = True
                        for i, reply in zip(where, got, strict=True):
                            replies[i] = reply
        finally:
            for n, (pool, conn, _) in enumerate(leased):
                await pool.give_back(conn, intact=done[n])

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
        for address in dict.fromkeys((*known, *self._seeds)):
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

    async def ping(self) -> bool:
        """PING every primary on its health connection; True if all answered ``PONG``.

        Raises:
            redis.exceptions.ConnectionError: the map is unknown (no node answered), or
                a primary did not answer (the message names each one and why).
        """
        failed = {address: why for address, why in (await self.probe()).items() if why != "ok"}
        if failed:
            raise RedisConnectionError(
                "; ".join(f"primary {address}: {why}" for address, why in failed.items())
            )
        return True

    async def probe(self) -> dict[str, str]:
        """Each primary's health: ``"ok"``, or why it did not answer.

        Raises:
            redis.exceptions.ConnectionError: no node answered ``CLUSTER SLOTS``.
        """
        if not await self.refresh():
            raise RedisConnectionError("no node of the cluster answered CLUSTER SLOTS")
        result: dict[str, str] = {}
        for address in self.nodes():
            try:
                pong = await self._node(address).health.execute("PING")
                result[address] = "ok" if pong == b"PONG" else f"answered {pong!r}"
            except (RedisError, OSError) as exc:
                result[address] = self._scrub(f"{type(exc).__name__}: {exc}")
        return result

    def tracking_connection(self, node: str, *, protocol: int) -> Any:  # noqa: ANN401
        """A connection to the primary ``node`` for the near cache's listener."""
        host, port = _host_port(node)
        kwargs = tracking_kwargs({**self.connection_kwargs, "host": host, "port": port}, protocol)
        return self.connection_class(**kwargs)

    def accounting(self) -> PoolAccounting:
        """The data pools' accounting, summed over the nodes."""
        books = [node.data.accounting() for node in list(self._nodes.values())]
        return PoolAccounting(
            **{f.name: sum(getattr(b, f.name) for b in books) for f in fields(PoolAccounting)}
        )

    async def close(self, grace: float) -> None:
        """Close every node's pools; wait for a background map check."""
        self._closed = True
        for node in list(self._nodes.values()):
            for pool in (node.data, node.admin, node.health):
                await pool.close(grace)
        verifier = self._verifier
        if verifier is not None:
            await verifier.join(timeout=self._settings.socket_connect_timeout)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _command(
    args: tuple[Any, ...],
    check: Any,  # noqa: ANN401
) -> Callable[[AsyncClusterNodePool, bool], Awaitable[Any]]:
    async def run(pool: AsyncClusterNodePool, asking: bool) -> Any:  # noqa: ANN401
        if asking:
            return await pool.asking(args, check)
        return await pool.execute(*args, check=check)

    return run


def _script(
    script: ScriptLike, keys: Sequence[Any], args: Sequence[Any]
) -> Callable[[AsyncClusterNodePool, bool], Awaitable[Any]]:
    async def run(pool: AsyncClusterNodePool, asking: bool) -> Any:  # noqa: ANN401
        if asking:
            return await pool.asking_evalsha(script, keys, args)
        return await pool.evalsha(script, keys, args)

    return run
