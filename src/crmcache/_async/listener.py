"""The near cache's invalidation listener: Redis ``CLIENT TRACKING`` messages turned into
local invalidations (off the hot path; see ``crmcache._near`` for the coherence rules).

One background task (a thread in the sync facade) per node keeps a dedicated connection
subscribed. The near cache serves only while every listener is subscribed; each disconnect
flushes it, and the loop reconnects with backoff until the manager closes. In a child
process made by ``fork()`` the listener starts afresh on the first read.
"""

from __future__ import annotations

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
        self._lock = threading.Lock()
        self._task: Background | None = None
        self._conn: Any = None
        reset_after_fork(self)

    def _after_fork_in_child(self) -> None:
        """In a forked child the parent's listener does not run (nor may its connection be
        used): forget both, so that :meth:`ensure` starts the child's own listener on the
        first read (the near cache, flushed, serves nothing until it is subscribed)."""
        self._lock = threading.Lock()
        self._task = None
        self._conn = None

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
        """The primary moved (failover): stop serving at once and drop the tracking
        connection; the listener reconnects to the node the transport names now."""
        self._near.set_live(False)
        conn = self._conn
        if conn is not None:
            spawn(lambda: conn.disconnect(nowait=True), "crmcache-near-cache-reconnect")

    async def stop(self, timeout: float) -> None:
        """Stop listening: unblock the read (closing the socket, cancelling the task) and
        wait up to ``timeout`` seconds for the loop to end."""
        task = self._task
        if task is None:
            return
        task.cancel()
        if self._conn is not None:
            await self._conn.disconnect(nowait=True)
        await task.join(timeout=timeout)

    async def _listen(self) -> None:
        near = self._near
        # One node today; a transport with several gets a listener per node.
        node = self._transport.nodes()[0]
        delay = NEAR_RECONNECT_FIRST
        while not self._stopping.is_set():
            if not await self._transport.refresh():  # e.g. no sentinel answered yet
                await self._stopping.wait(delay)
                delay = min(delay * 2, NEAR_RECONNECT_MAX)
                continue
            conn = self._transport.tracking_connection(node, protocol=self._protocol)
            self._conn = conn
            try:
                await self._subscribe(conn)
                near.set_live(True)
                delay = NEAR_RECONNECT_FIRST
                logger.info("near cache live: tracking %s keys", " and ".join(self._tracked))
                while not self._stopping.is_set():
                    keys = invalidated_keys(await conn.read_response(push_request=True))
                    if keys is not NOT_AN_INVALIDATION:
                        near.invalidate(keys)
            except (RedisError, OSError) as exc:
                if not self._stopping.is_set():
                    logger.warning(
                        "near cache off until Redis tracking is back: %s",
                        describe_failure(exc, self._scrub),
                    )
            except Exception as exc:  # noqa: BLE001 - the listener must outlive any message
                logger.error(  # noqa: TRY400 - one scrubbed line; a traceback could show a secret
                    "near cache off after an unexpected error in its listener; reconnecting: %s",
                    describe_failure(exc, self._scrub),
                )
            finally:
                # Cancelled included: nothing is served once no invalidation can arrive.
                near.set_live(False)
                await conn.disconnect(nowait=True)
            await self._stopping.wait(delay)
            delay = min(delay * 2, NEAR_RECONNECT_MAX)

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
