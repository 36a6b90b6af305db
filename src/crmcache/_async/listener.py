"""The near cache's invalidation listener: Redis ``CLIENT TRACKING`` messages turned into
local invalidations (off the hot path; see ``crmcache._near`` for the coherence rules).

One background task (a thread in the sync facade) per primary keeps a dedicated
connection subscribed, under a supervisor task. The near cache serves only while every
primary's connection is subscribed; each disconnect, and each change of primaries (a
failover, a resharding), flushes it, and the supervisor reconnects all of them with
backoff until the manager closes. In a child
process made by ``fork()`` the listener starts afresh on the first read.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from .._guard import describe_failure
from .._near import (
    NEAR_RECONNECT_FIRST,
    NEAR_RECONNECT_MAX,
    NOT_AN_INVALIDATION,
    NearCache,
    invalidated_keys,
    reset_after_fork,
)
from .primitives import Background, Event, spawn
from .transport import AsyncTransport

__all__ = ["AsyncNearCacheListener"]

logger = logging.getLogger("crmcache")


async def _pass_push(message: Any) -> Any:  # noqa: ANN401
    """RESP3 invalidation pushes are handed back to the listener as they are."""
    return message


class AsyncNearCacheListener:
    """Keeps ``near`` coherent with Redis while the manager is open.

    Args:
        near: the near cache to invalidate.
        transport: where the tracked keys live.
        protocol: 2 (RESP2: tracking redirected to a ``__redis__:invalidate``
            subscription) or 3 (RESP3 push messages).
        tracked_prefixes: the key prefixes whose changes invalidate (the manager's
            preferences and templates).
        stopping: set when the manager closes; the listener then stops.
        scrub: removes the password from a message before it is logged.
    """

    def __init__(
        self,
        near: NearCache,
        transport: AsyncTransport,
        *,
        protocol: int,
        tracked_prefixes: tuple[str, ...],
        stopping: Event,
        scrub: Callable[[str], str],
    ) -> None:
        self._near = near
        self._transport = transport
        self._protocol = protocol
        self._tracked = tracked_prefixes
        self._stopping = stopping
        self._scrub = scrub
        self._after_fork_in_child()
        reset_after_fork(self)

    def _after_fork_in_child(self) -> None:
        """In a forked child the parent's listener does not run (nor may its connections
        be used): forget them, so that :meth:`ensure` starts the child's own listener on
        the first read (the near cache, flushed, serves nothing until it is subscribed)."""
        self._lock = threading.Lock()
        self._task: Background | None = None
        #: Set when this round's connections must go (one ended, the primaries changed,
        #: or the manager closes): the supervisor then starts a new round.
        self._changed = Event()
        self._conns: dict[str, Any] = {}
        self._nodes: tuple[str, ...] = ()
        self._subscribed: set[str] = set()

    def ensure(self) -> None:
        """Start the listener on first use (it needs a running loop), and restart one
        that ended without the manager closing (its task cancelled from outside): the near
        cache must not stay off unseen."""
        task = self._task
        if (task is not None and task.is_alive()) or self._stopping.is_set():
            return
        with self._lock:
            task = self._task
            if task is None or not task.is_alive():
                self._task = spawn(self._listen, "crmcache-near-cache-listener")

    def reconnect(self) -> None:
        """The primaries moved (a failover, a resharding): stop serving at once and drop
        the tracking connections; the listener reconnects to the nodes the transport
        names now."""
        with self._lock:
            self._changed.set()
            self._near.set_live(False)

    async def stop(self, timeout: float) -> None:
        """Stop listening: unblock the reads (closing the sockets, cancelling the tasks)
        and wait up to ``timeout`` seconds for the loop to end."""
        task = self._task
        if task is None:
            return
        task.cancel()
        self._changed.set()
        await self._drop_connections()
        await task.join(timeout=timeout)

    async def _drop_connections(self) -> None:
        with self._lock:
            conns = list(self._conns.values())
            self._conns.clear()
        for conn in conns:
            await conn.disconnect(nowait=True)

    async def _listen(self) -> None:
        """The supervisor: one follower per primary; when any ends (or the primaries
        change), all are dropped and a new round starts after a backoff."""
        delay = NEAR_RECONNECT_FIRST
        while not self._stopping.is_set():
            if not await self._transport.refresh():  # e.g. no sentinel answered yet
                await self._stopping.wait(delay)
                delay = min(delay * 2, NEAR_RECONNECT_MAX)
                continue
            with self._lock:
                changed = self._changed = Event()
                nodes = self._nodes = tuple(self._transport.nodes())
                self._subscribed = set()
            if self._stopping.is_set() or not nodes:
                break
            followers = [
                spawn(functools.partial(self._follow, node, changed), "crmcache-near-cache")
                for node in nodes
            ]
            try:
                await changed.wait()
            finally:
                with self._lock:
                    live, self._subscribed = self._subscribed.issuperset(nodes), set()
                    self._near.set_live(False)
                await self._drop_connections()
                for follower in followers:
                    follower.cancel()
                for follower in followers:
                    await follower.join(timeout=NEAR_RECONNECT_MAX)
            if live:
                delay = NEAR_RECONNECT_FIRST
            await self._stopping.wait(delay)
            delay = min(delay * 2, NEAR_RECONNECT_MAX)

    async def _follow(self, node: str, changed: Event) -> None:
        """Keep one tracking connection to ``node`` subscribed, until it fails or this
        round ends (``changed``)."""
        near = self._near
        conn = self._transport.tracking_connection(node, protocol=self._protocol)
        with self._lock:
            if changed.is_set():
                return
            self._conns[node] = conn
        try:
            await self._subscribe(conn)
            with self._lock:
                if changed.is_set():
                    return
                self._subscribed.add(node)
                live = self._subscribed.issuperset(self._nodes)
                if live:
                    near.set_live(True)
            if live:
                where = f" on {len(self._nodes)} primaries" if len(self._nodes) > 1 else ""
                logger.info(
                    "near cache live: tracking %s keys%s", " and ".join(self._tracked), where
                )
            while not changed.is_set():
                keys = invalidated_keys(await conn.read_response(push_request=True))
                if keys is not NOT_AN_INVALIDATION:
                    near.invalidate(keys)
        except (RedisError, OSError) as exc:
            if not changed.is_set():
                logger.warning(
                    "near cache off until Redis tracking is back (%s): %s",
                    node,
                    describe_failure(exc, self._scrub),
                )
        except Exception as exc:  # noqa: BLE001 - the listener must outlive any message
            logger.error(  # noqa: TRY400 - one scrubbed line; a traceback could show a secret
                "near cache off after an unexpected error in its listener; reconnecting: %s",
                describe_failure(exc, self._scrub),
            )
        finally:
            # Cancelled included: nothing is served once no invalidation can arrive.
            with self._lock:
                changed.set()
                near.set_live(False)
            await conn.disconnect(nowait=True)

    async def _subscribe(self, conn: Any) -> None:  # noqa: ANN401 - a redis-py connection
        await conn.connect()
        prefixes = [part for prefix in self._tracked for part in ("PREFIX", prefix)]
        if self._protocol == 3:
            conn._parser.set_invalidation_push_handler(_pass_push)
            await conn.send_command("CLIENT", "TRACKING", "ON", "BCAST", *prefixes)
            await conn.read_response()
            return
        await conn.send_command("CLIENT", "ID")
        client_id = await conn.read_response()
        await conn.send_command(
            "CLIENT", "TRACKING", "ON", "REDIRECT", client_id, "BCAST", *prefixes
        )
        await conn.read_response()
        await conn.send_command("SUBSCRIBE", "__redis__:invalidate")
        await conn.read_response()
