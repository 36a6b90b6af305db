"""One primary of a Redis Cluster: its lean pool, with batches and ``ASKING`` on top.

A keyed call on a cluster node is a plain lean-pool call (:meth:`AsyncLeanPool.execute`).
Two things a single node never needs are added here, on the same connections, slots and
deadlines:

* **batches**: several commands written at once and their replies read in order (one
  ``MGET`` per slot on this node: a cluster refuses keys of two slots in one command).
  :meth:`lease`, :meth:`send_batch`, :meth:`read_batch` and :meth:`give_back` are separate
  so that the transport writes to every node first and then reads every node: the nodes
  work concurrently, in both facades, without a thread or a task per node;
* **``ASKING``**: a slot being migrated answers ``ASK`` for a key that has already moved,
  and the target serves it only right after ``ASKING`` on the same connection.

An error reply inside a batch is returned in its place (the stream stays in step); any
other failure (a timeout, a dropped connection, a broken reply, a cancellation) closes the
connection, as :meth:`AsyncLeanPool.execute` does.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError, ResponseError

from .._guard import CircuitBreaker, PoolClosedError, PoolExhaustedError
from .._replies import Check
from .._resp import pack_all
from .pool import AsyncLeanPool
from .primitives import connected, dirty, send, within

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection

    from .._scripts import ScriptLike

__all__ = ["AsyncAskingMixin", "AsyncClusterNodePool"]

_ASKING = ("ASKING",)


class AsyncAskingMixin:
    """``ASKING`` before a command (or a script) on the same connection, for any pool
    whose :meth:`batch` keeps commands adjacent on one connection (this module's, and
    the shared connections' of ``crmcache._mux``). It comes after the pool in the bases:
    its ``batch`` and ``execute`` only declare what it needs."""

    async def batch(
        self, commands: Sequence[tuple[Any, ...]], checks: Sequence[Check | None]
    ) -> list[Any]:
        """The commands' replies (an error reply in its place), sent together."""
        raise NotImplementedError

    async def execute(self, *args: Any, check: Check | None = None) -> Any:  # noqa: ANN401 - a raw Redis reply
        """One command's reply."""
        raise NotImplementedError

    async def asking(self, args: tuple[Any, ...], check: Check | None = None) -> Any:  # noqa: ANN401 - a raw Redis reply
        """``ASKING`` then ``args`` on one connection (a key of a slot being migrated
        here); the command's reply, or its error raised."""
        replies = await self.batch((_ASKING, args), (None, check))
        for reply in replies:
            if isinstance(reply, ResponseError):
                raise reply
        return replies[1]

    async def asking_evalsha(
        self, script: ScriptLike, keys: Sequence[Any], args: Sequence[Any]
    ) -> Any:  # noqa: ANN401 - a raw Redis reply
        """A script run after ``ASKING``, loaded first on ``NOSCRIPT``."""
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            return await self.asking(command, script.check)
        except NoScriptError:
            await self.execute("SCRIPT", "LOAD", script.script)
            return await self.asking(command, script.check)


class AsyncClusterNodePool(AsyncLeanPool, AsyncAskingMixin):
    """A cluster primary's lean pool (see the module docstring).

    Attributes:
        breaker: this node's own circuit breaker: a primary that keeps failing is not
            asked (its keys degrade in microseconds) while the others are served.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401 - AsyncLeanPool's
        super().__init__(*args, **kwargs)
        self.breaker = CircuitBreaker()

    async def lease(self) -> AbstractConnection:
        """A connection of this pool for a batch, its slot taken; give it back with
        :meth:`give_back`, whatever happens.

        Raises:
            PoolExhaustedError, PoolClosedError: as :meth:`execute`.
        """
        if os.getpid() != self._pid:
            self._after_fork()
        if self._closed:
            raise PoolClosedError
        slots = self._slots
        released, start = slots.released, time.monotonic()
        if not await slots.acquire(self._timeout):
            raise PoolExhaustedError(
                slots=slots.slots,
                waited=time.monotonic() - start,
                released=slots.released - released,
            )
        try:
            if self._closed:
                raise PoolClosedError  # noqa: TRY301 - closed while this call waited
            conn = self._take()
            if dirty(conn):
                await conn.disconnect(nowait=True)
        except BaseException:
            self._slots.release()
            raise
        return conn

    async def give_back(self, conn: AbstractConnection, *, intact: bool) -> None:
        """Return a leased connection: to the idle list if every reply was read
        (``intact``), closed otherwise; its slot is released either way."""
        try:
            if not intact:
                await self._discard(conn)
            elif self._closed:
                await self._drop(conn)
            else:
                self._idle.append(conn)
        finally:
            self._slots.release()

    async def send_batch(
        self, conn: AbstractConnection, commands: Sequence[tuple[Any, ...]], deadline: float
    ) -> None:
        """Connect ``conn`` if needed and write ``commands`` in one go."""
        if not connected(conn):
            await self._connect(conn, deadline)
        await send(conn, pack_all(conn, commands), deadline)

    async def read_batch(
        self,
        conn: AbstractConnection,
        commands: Sequence[tuple[Any, ...]],
        checks: Sequence[Check | None],
        deadline: float,
    ) -> list[Any]:
        """The replies to ``commands``, in order, each checked; an error reply is
        returned in its place as a ``ResponseError``."""
        replies: list[Any] = []
        last = len(commands) - 1
        for index, command in enumerate(commands):
            try:
                reply = await self._read(conn, command, checks[index], deadline, more=index < last)
            except ResponseError as exc:
                reply = exc
            replies.append(reply)
        return replies

    async def batch(
        self, commands: Sequence[tuple[Any, ...]], checks: Sequence[Check | None]
    ) -> list[Any]:
        """Send ``commands`` in one write on one connection and read their replies (an
        error reply in its place), all within one call's deadline."""
        conn = await self.lease()
        intact = False
        try:
            deadline = time.monotonic() + self._call_timeout
            async with within(self._call_timeout):
                await self.send_batch(conn, commands, deadline)
                replies = await self.read_batch(conn, commands, checks, deadline)
            intact = True
        finally:
            await self.give_back(conn, intact=intact)
        return replies
