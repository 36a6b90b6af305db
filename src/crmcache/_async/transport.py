"""The transport seam: every byte the cache sends to Redis goes through this interface.

The mixins (preferences, templates, rate limits, leases, stats and health) never touch a
connection; they call a transport. A transport decides where each command goes:

* keyed calls (:meth:`~AsyncTransport.execute`, :meth:`~AsyncTransport.evalsha`,
  :meth:`~AsyncTransport.get`) run on the node that serves the key. By contract the key is
  ``args[1]`` of a command (``GET key``, ``SET key ...``, ``DEL key``) and ``keys[0]`` of a
  script (every crmcache script touches only ``KEYS[1]``);
* batches (:meth:`~AsyncTransport.mget`, :meth:`~AsyncTransport.mset`) are grouped by
  whatever the transport can send in one round trip (one ``MGET`` on one node; per slot
  and per node on a cluster), and the groups are sent concurrently;
* admin calls (``SCAN``, ``INFO``, ``SCRIPT LOAD``) run on every primary
  (:meth:`~AsyncTransport.primaries`), health probes on connections of their own
  (:meth:`~AsyncTransport.ping`), and the near cache's ``CLIENT TRACKING`` listener gets one
  dedicated connection per node (:meth:`~AsyncTransport.tracking_connection`).

Errors are redis-py's: a transport raises ``ConnectionError``/``TimeoutError`` when a node
cannot be reached, a ``ResponseError`` subclass for an error reply (the topology-moved
replies ``MOVED``/``ASK``/``READONLY``/``TRYAGAIN``/``CLUSTERDOWN`` as their own classes, see
``crmcache._guard.TOPOLOGY_ERRORS``), ``PoolExhaustedError`` when saturated and
``PoolClosedError`` once closed. The core's ``_call`` turns every one of them into a
degraded result; a transport never degrades by itself.

Implementations: :class:`~crmcache._async.node.AsyncNodeTransport` (one Redis node, on the
lean pool) and :class:`~crmcache._async.sentinel.AsyncSentinelTransport` (the primary a
Sentinel group names, on the same pools). A slot-routed Cluster transport and a
multiplexed (auto-pipelined) one would each implement this class in a file of their own;
the core picks one by URL scheme (``open_transport`` in ``core.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from redis.exceptions import ResponseError

from .._codec import WRONG_TYPE
from .._topology import Topology

if TYPE_CHECKING:
    from .._scripts import ScriptLike, Scripts
    from .._stats import PoolAccounting

__all__ = ["AsyncAdminNode", "AsyncTransport"]


class AsyncAdminNode(Protocol):
    """One primary, for admin commands (``SCAN`` loops, ``INFO``)."""

    @property
    def address(self) -> str:
        """``host:port`` (or the socket path) of the node."""
        ...

    async def execute(self, *args: Any) -> Any:  # noqa: ANN401 - a raw Redis reply
        """Send one command to this node and return its reply."""
        ...


class AsyncTransport(ABC):
    """Where and how the cache's commands reach Redis (see the module docstring).

    Attributes:
        scripts: the Lua scripts, registered once (``register_script``) for this
            transport; pass them to :meth:`evalsha`.
        topology: what the URL turned out to point at; a topology the transport cannot
            serve makes :meth:`health_check` report False.
        connection_class, connection_kwargs: how a connection to a node is made (TLS,
            auth, db, timeouts), as redis-py parsed them from the URL.
    """

    scripts: Scripts
    connection_class: type[Any]
    connection_kwargs: dict[str, Any]
    #: What the node(s) turned out to be (``crmcache._topology``), learnt on connecting.
    topology: Topology = Topology.UNKNOWN
    #: True if the primary can change under the transport (Sentinel failover): the core
    #: then remembers recently confirmed invalidations, to replay them after a switch.
    may_fail_over: bool = False
    #: Told when the primary changed, with the monotonic time since which writes may
    #: have gone to the former primary (set by the core).
    on_primary_change: Callable[[float], None] | None = None

    @abstractmethod
    async def execute(self, *args: Any) -> Any:  # noqa: ANN401 - a raw Redis reply
        """Send one keyed command (the key is ``args[1]``) and return its reply."""

    @abstractmethod
    async def evalsha(self, script: ScriptLike, keys: Sequence[Any], args: Sequence[Any]) -> Any:  # noqa: ANN401
        """Run a registered script on the node of ``keys[0]``, loading it on ``NOSCRIPT``."""

    async def execute_large(self, *args: Any) -> Any:  # noqa: ANN401 - a raw Redis reply
        """:meth:`execute` for a command whose reply may be large (template reads). A
        transport that shares connections among callers sends it on a connection of its
        own, so its transfer never delays the small calls' replies (``crmcache._mux``);
        others simply execute it."""
        return await self.execute(*args)

    async def get(self, key: str) -> object:
        """``GET key``; a value of another type is returned as ``WRONG_TYPE``, not raised."""
        try:
            return await self.execute("GET", key)
        except ResponseError as exc:
            return _wrong_type(exc)

    async def get_large(self, key: str) -> object:
        """:meth:`get` of a value that may be large (:meth:`execute_large`)."""
        try:
            return await self.execute_large("GET", key)
        except ResponseError as exc:
            return _wrong_type(exc)

    @abstractmethod
    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of ``keys`` (None where absent), in order, in as few round trips as
        the topology allows."""

    @abstractmethod
    async def mset(self, values: Mapping[str, bytes]) -> None:
        """Set every key of ``values`` (no expiry), in as few round trips as the topology
        allows. Each key is set atomically; the batch as a whole is atomic only where one
        command can carry it."""

    @abstractmethod
    def primaries(self) -> Sequence[AsyncAdminNode]:
        """Every primary, for admin commands that must see the whole keyspace."""

    @abstractmethod
    def nodes(self) -> list[str]:
        """The address of every node data may live on (``host:port``)."""

    @abstractmethod
    async def ping(self) -> bool:
        """PING every primary on a connection reserved for health checks, each bounded by
        the connect timeout. True if every one answered ``PONG``.

        Raises:
            redis.exceptions.RedisError, OSError: a node could not be asked (the reason).
        """

    async def refresh(self) -> bool:
        """Learn where the nodes are now, before a tracking connection is made; False if
        that cannot be known yet (logged by the transport). Never raises a Redis error.
        A fixed node has nothing to learn."""
        return True

    @abstractmethod
    def tracking_connection(self, node: str, *, protocol: int) -> Any:  # noqa: ANN401
        """A new, unconnected connection to ``node`` for the near cache's ``CLIENT
        TRACKING`` listener: no read timeout (it waits for messages), keepalive on."""

    @abstractmethod
    def accounting(self) -> PoolAccounting:
        """Where the data path's slots and connections are now (summed over nodes)."""

    @abstractmethod
    async def close(self, grace: float) -> None:
        """Close every connection; calls in flight get ``grace`` seconds to finish."""


def _wrong_type(exc: ResponseError) -> object:
    """``WRONG_TYPE`` for a ``WRONGTYPE`` error reply; any other error is raised."""
    if str(exc).startswith("WRONGTYPE"):
        return WRONG_TYPE
    raise exc
