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

Each primary has its own circuit breaker: a primary that keeps failing is not asked (its
keys degrade in microseconds, as ``NodeDownError``) while the others are served, and the
manager's breaker is left closed. The slot map (``cluster_map.py``) is also checked about
once a second while calls are made. ``max_connections`` applies per node.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

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

from .._cluster import group_by_slot, slot_of
from .._guard import BreakerState, NodeDownError, PoolClosedError, PoolExhaustedError
from .._scripts import ScriptLike
from .._stats import PoolAccounting
from .cluster_map import VERIFY_INTERVAL, AsyncClusterMap, _address, _host_port, logger
from .cluster_node import AsyncClusterNodePool
from .node import tracking_kwargs
from .primitives import sleep, within
from .transport import AsyncTransport

__all__ = ["MAX_REDIRECTS", "AsyncClusterTransport"]

#: Redirections and retries one call follows at most.
MAX_REDIRECTS = 5
#: The first back-off after ``TRYAGAIN`` / ``CLUSTERDOWN`` (doubled each time).
FIRST_BACKOFF = 0.01
#: Errors after which a call is routed again (the pool's own are not among them).
_REROUTED = (MovedError, AskError, TryAgainError, ClusterDownError, RedisConnectionError)
#: Stands for a batch command whose group failed: it is sent again on its own.
_AGAIN = object()


class AsyncClusterTransport(AsyncClusterMap, AsyncTransport):
    """Every primary of a Redis Cluster, routed by slot (see the module docstring).

    Args:
        settings: the manager's settings; ``redis_url`` is a Cluster URL.
        scrub: removes the password from a message.

    Raises:
        ConfigurationError: the URL cannot be used.
    """

    #: Slots can change primary under the transport (failover, resharding).
    may_fail_over = True

    # -- the data path ----------------------------------------------------------------

    async def execute(self, *args: Any, check: Any = None) -> Any:  # noqa: ANN401 - a raw Redis reply
        """The command on the primary of ``args[1]``'s slot, redirections followed."""
        slot = slot_of(args[1])
        pool = self._owners[slot]
        now = time.monotonic()
        if now - self._checked_at > VERIFY_INTERVAL:
            self._checked_at = now
            self._verify_soon()
        if pool is None or pool.breaker.state is not BreakerState.CLOSED:
            return await self._guarded(slot, _command(args, check))
        try:
            reply = await pool.execute(*args, check=check)
        except (PoolExhaustedError, PoolClosedError):
            raise
        except _REROUTED as exc:
            return await self._reroute(exc, slot, _command(args, check))
        except (TimeoutError, RedisTimeoutError) as exc:
            raise self._down(pool, exc) from exc
        if pool.breaker.failures:
            pool.breaker.record_success()
        return reply

    async def evalsha(self, script: ScriptLike, keys: Sequence[Any], args: Sequence[Any]) -> Any:  # noqa: ANN401
        """The script on the primary of ``keys[0]``'s slot, loaded there on ``NOSCRIPT``."""
        slot = slot_of(keys[0])
        pool = self._owners[slot]
        now = time.monotonic()
        if now - self._checked_at > VERIFY_INTERVAL:
            self._checked_at = now
            self._verify_soon()
        if pool is None or pool.breaker.state is not BreakerState.CLOSED:
            return await self._guarded(slot, _script(script, keys, args))
        try:
            reply = await pool.evalsha(script, keys, args)
        except (PoolExhaustedError, PoolClosedError):
            raise
        except _REROUTED as exc:
            return await self._reroute(exc, slot, _script(script, keys, args))
        except (TimeoutError, RedisTimeoutError) as exc:
            raise self._down(pool, exc) from exc
        if pool.breaker.failures:
            pool.breaker.record_success()
        return reply

    async def _guarded(
        self, slot: int, run: Callable[[AsyncClusterNodePool, bool], Awaitable[Any]]
    ) -> Any:  # noqa: ANN401
        """A call whose slot has no known primary yet, or whose primary's breaker is not
        closed: learn the map, or fail fast while the breaker is open (half open: this
        call is the probe)."""
        pool = self._owners[slot]
        if pool is None:
            return await self._reroute(None, slot, run)
        if not pool.breaker.allow():
            raise NodeDownError(pool.address, "not asked while its circuit breaker is open")
        try:
            reply = await run(pool, False)
        except (PoolExhaustedError, PoolClosedError):
            pool.breaker.release_probe()
            raise
        except _REROUTED as exc:
            pool.breaker.release_probe()  # a failure is noted on it if it stays the owner
            return await self._reroute(exc, slot, run)
        except (TimeoutError, RedisTimeoutError) as exc:
            raise self._down(pool, exc) from exc
        except BaseException:
            pool.breaker.release_probe()
            raise
        pool.breaker.record_success()
        return reply

    def _down(self, pool: AsyncClusterNodePool, exc: BaseException) -> NodeDownError:
        """``pool``'s primary did not answer: note it on its breaker, check the map in
        the background (a failover may be under way), and say which node it was."""
        self._checked_at = 0.0
        if pool.breaker.record_failure():
            logger.warning(
                "cluster %s: primary %s keeps failing; its keys degrade without asking it "
                "until a probe succeeds",
                self._masked_url,
                pool.address,
            )
        return NodeDownError(pool.address, f"{type(exc).__name__}: {self._scrub(str(exc))}")

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
            pool, asking = await self._next(exc, slot, attempt, deadline)
            if attempt == MAX_REDIRECTS or time.monotonic() >= deadline:
                break
            try:
                reply = await run(pool, asking)
            except (PoolExhaustedError, PoolClosedError):
                raise
            except _REROUTED as again:
                exc = again
            except (TimeoutError, RedisTimeoutError) as again:
                raise self._down(pool, again) from again
            else:
                if pool.breaker.failures:
                    pool.breaker.record_success()
                return reply
        raise exc or ClusterDownError(f"slot {slot}: no primary answered")

    async def _next(
        self, exc: BaseException | None, slot: int, attempt: int, deadline: float
    ) -> tuple[AsyncClusterNodePool, bool]:
        """Where the call goes after ``exc``, and whether after ``ASKING``.

        Raises:
            the error itself, or ``NodeDownError``: no other primary serves the slot.
        """
        if isinstance(exc, MovedError):
            return self._moved(exc), False
        if isinstance(exc, AskError):
            return self._node(_address(exc.host, exc.port)).data, True
        before = self._owners[slot]
        if exc is None or isinstance(exc, TryAgainError | ClusterDownError):
            if exc is not None:
                left = max(0.0, deadline - time.monotonic())
                await sleep(min(FIRST_BACKOFF * 2**attempt, left))
            if not isinstance(exc, TryAgainError):
                await self._refresh(deadline, force=exc is not None)
            found = self._owners[slot]
            if found is None:
                raise exc or ClusterDownError(f"slot {slot} is served by no known primary")
            return found, False
        # The connection dropped or was refused: is there a new primary?
        await self._refresh(deadline, force=True)
        found = self._owners[slot]
        if found is not None and found is not before:
            return found, False
        if before is None:
            raise exc
        raise self._down(before, exc) from exc

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
            # A primary whose breaker is not closed is left to the keyed path (which
            # fails fast, or probes it once).
            if pool is not None and pool.breaker.state is BreakerState.CLOSED:
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

    # -- admin, health, lifecycle

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
        return PoolAccounting.total(
            [node.data.accounting() for node in list(self._nodes.values())]
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
