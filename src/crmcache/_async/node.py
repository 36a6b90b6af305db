"""The single-node transport: one Redis (``redis://``, ``rediss://``, ``unix://``).

The data path is the lean pool itself (this class *is* an :class:`AsyncLeanPool`), so a
keyed command costs exactly what a lean-pool call costs: the seam adds no call. Admin
commands (``SCAN``, ``INFO``) run on a small pool of their own, so a slow stats call never
takes a data-path connection; health checks run on one connection whose read timeout is
the connect timeout, so a probe stays bounded by it even when the data path is saturated.

redis-py parses the URL and holds the connection settings (class, TLS, auth, db,
timeouts); crmcache never sends a command through redis-py's own pool.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from .._config import CacheSettings
from .._errors import ConfigurationError
from .._scripts import register_scripts
from .._topology import Topology, classify, explain
from .pool import AsyncLeanPool
from .transport import AsyncAdminNode, AsyncTransport

__all__ = [
    "ADMIN_CONNECTIONS",
    "HEALTH_CHECK_INTERVAL",
    "MAX_PREFERENCES_BYTES",
    "AsyncNodeTransport",
    "health_kwargs",
    "parse_node_url",
    "tracking_kwargs",
]

logger = logging.getLogger("crmcache")

#: Connections for SCAN and INFO (get_cache_stats) and the replay's TTL shortening.
ADMIN_CONNECTIONS = 2
#: Seconds between connection health checks (PING before reuse of an idle connection).
HEALTH_CHECK_INTERVAL = 30
#: The largest preferences value a read accepts, in bytes (a model's JSON is far smaller).
MAX_PREFERENCES_BYTES = 1024 * 1024


def _retry(retries: int) -> Retry:
    # One retry on a dropped connection reconnects after a Redis restart; a timeout is
    # not retried (it would double the stall).
    return Retry(
        ExponentialWithJitterBackoff(cap=0.1, base=0.01),
        retries=retries,
        supported_errors=(RedisConnectionError,),
    )


def parse_node_url(url: str, settings: CacheSettings, scrub: Callable[[str], str]) -> Any:  # noqa: ANN401 - redis-py's pool, used for its parsing only
    """redis-py's reading of a node's ``url`` (class, TLS, auth, db, timeouts), as a pool
    that is never used to send a command.

    Raises:
        ConfigurationError: redis-py cannot use ``url``.
    """
    s = settings
    try:
        return ConnectionPool.from_url(
            url,
            socket_timeout=s.socket_timeout,
            socket_connect_timeout=s.socket_connect_timeout,
            retry=_retry(1),
            protocol=2,
            health_check_interval=HEALTH_CHECK_INTERVAL,
            client_name="crmcache",
        )
    except ValueError as exc:
        raise ConfigurationError(
            f"redis_url {s.masked_url!r} is not usable: {scrub(str(exc))}"
        ) from None


def health_kwargs(kwargs: dict[str, Any], settings: CacheSettings) -> dict[str, Any]:
    """A health connection's settings: its read bounded by the connect timeout, and a
    dropped connection not retried (that would double the bound)."""
    return {
        **kwargs,
        "socket_timeout": settings.socket_connect_timeout,
        "retry": _retry(0),
        "client_name": "crmcache-health",
    }


def tracking_kwargs(kwargs: dict[str, Any], protocol: int) -> dict[str, Any]:
    """A near-cache listener connection's settings: no read timeout (it waits for
    messages; a dead server is seen as a closed socket), keepalive on TCP."""
    tracking = {
        **kwargs,
        "protocol": protocol,
        "socket_timeout": None,
        "client_name": "crmcache-near-cache",
    }
    if "path" not in tracking:  # TCP only: a unix socket has no keepalive to set
        tracking["socket_keepalive"] = True
    return tracking


class AsyncNodeTransport(AsyncLeanPool, AsyncTransport):
    """One Redis node: the data path on this lean pool, admin and health beside it.

    Args:
        settings: the manager's resolved settings (URL, pool size, timeouts).
        scrub: removes the password from a message (for errors raised here).

    Raises:
        ConfigurationError: redis-py cannot use ``settings.redis_url``.
    """

    def __init__(
        self,
        settings: CacheSettings,
        scrub: Callable[[str], str],
        *,
        locate: Callable[[float], Awaitable[tuple[str, int]]] | None = None,
    ) -> None:
        s = settings
        parsed = parse_node_url(s.redis_url, s, scrub)
        self.connection_class = cls = parsed.connection_class
        self.connection_kwargs = kwargs = parsed.connection_kwargs
        path = kwargs.get("path")
        address = str(path) if path else f"{kwargs.get('host')}:{kwargs.get('port')}"
        # One deadline per call once it has a connection: the handshake, every write,
        # every read and the retry within socket_timeout (the wait for a connection is
        # bounded by pool_timeout).
        call_timeout = s.socket_timeout
        self.topology = Topology.UNKNOWN
        self._masked_url = s.masked_url
        self._told = threading.Lock()
        self._told_about: Topology | None = None
        super().__init__(
            lambda: cls(**kwargs),
            max_connections=s.max_connections,
            timeout=s.pool_timeout,
            address=address,
            on_info=self._learn,
            call_timeout=call_timeout,
            connect_timeout=s.socket_connect_timeout,
            max_value_bytes=max(s.max_template_bytes, MAX_PREFERENCES_BYTES),
            locate=locate,
        )
        # register_script computes each SHA locally: no round trip here.
        self.scripts = register_scripts(Redis(connection_pool=parsed))
        self.admin = AsyncLeanPool(
            lambda: cls(**kwargs),
            max_connections=ADMIN_CONNECTIONS,
            timeout=s.pool_timeout,
            address=self.address,
            call_timeout=call_timeout,
            connect_timeout=s.socket_connect_timeout,
            locate=locate,
        )
        health = health_kwargs(kwargs, s)
        # The whole probe, waiting for the connection included, within the connect timeout.
        self.health = AsyncLeanPool(
            lambda: cls(**health),
            max_connections=1,
            timeout=s.socket_connect_timeout,
            retry_dropped=False,
            call_timeout=s.socket_connect_timeout,
            whole_call=True,
            on_info=self._learn,
            locate=locate,
        )

    def _learn(self, server: bytes, replication: bytes) -> None:
        """A new connection's INFO: what the node is; one ERROR line the first time it is
        something crmcache cannot serve (and again if it changes, e.g. a failover)."""
        topology = classify(server, replication)
        self.topology = topology
        with self._told:
            if topology is self._told_about:
                return
            self._told_about = topology
        message = explain(topology, self._masked_url)
        if message is not None:
            logger.error(message)
        elif topology is Topology.STANDALONE:
            logger.debug("redis_url %s is a standalone Redis or primary", self._masked_url)

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """One ``MGET`` for every key (values may be large: :meth:`execute_large`)."""
        return await self.execute_large("MGET", *keys)  # type: ignore[no-any-return]

    async def mset(self, values: Mapping[str, bytes]) -> None:
        """One ``MSET`` for every key (atomic)."""
        await self.execute("MSET", *[part for pair in values.items() for part in pair])

    def primaries(self) -> Sequence[AsyncAdminNode]:
        """This node, on its admin pool."""
        return (self.admin,)

    def nodes(self) -> list[str]:
        """This node's address."""
        return [self.address]

    async def ping(self) -> bool:
        """PING on the health connection; True if Redis answered ``PONG``."""
        return bool(await self.health.execute("PING") == b"PONG")

    def tracking_connection(self, node: str, *, protocol: int) -> Any:  # noqa: ANN401
        """A connection to this node for the near cache's invalidation listener."""
        kwargs = tracking_kwargs(self.connection_kwargs, protocol)
        return self.connection_class(**kwargs)

    async def close(self, grace: float) -> None:
        """Close the data, admin and health pools (calls in flight get ``grace``)."""
        await super().close(grace)
        await self.admin.close(grace)
        await self.health.close(grace)
