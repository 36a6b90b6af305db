"""A lean connection pool for the hot calls, on redis-py's own connection objects.

redis-py 8's pool and command wrapper cost more per call than a loopback round trip, so
the hot calls run here: a LIFO list of idle connections bounded by fair slots. Kept from
redis-py: the connection class and settings (TLS, auth, db, client name), its socket
set-up, command packer, hiredis reader and error types. Done here:

* **One deadline per call** (``call_timeout``, from the moment the call has its slot,
  whose wait ``timeout`` bounds): the handshake of a new connection (``AUTH``,
  ``SELECT``, ``CLIENT SETNAME`` and the ``INFO`` probe in one write; the guard never
  logs its error text, which may echo the password), every write, read and the retry.
* **Every reply is checked** against its command's contract (``crmcache._replies``)
  before the connection is reused: a reply that breaks it, is larger than the call can
  use, or announces a huge aggregate raises ``ProtocolError`` and closes the connection,
  as does an idle connection holding bytes nobody asked for.
* ``PoolExhaustedError`` after ``timeout``, one retry on a dropped connection, none on a
  timeout, scripts re-loaded on ``NOSCRIPT``, connections dropped after ``fork()``.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from redis._parsers.hiredis import NOT_ENOUGH_DATA
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, NoScriptError, ResponseError

from .._guard import PoolClosedError, PoolExhaustedError
from .._replies import (
    ERROR_REPLY,
    Check,
    ProtocolError,
    check_reply,
    huge_array_header,
    reply_budget,
)
from .._resp import pack, pack_all
from .._stats import PoolAccounting
from .primitives import FairSlots, connected, dirty, receive, send, sleep, within

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection

    from .._scripts import ScriptLike

__all__ = ["AsyncLeanPool"]

#: Replies up to this size skip the budget computation (every budget is larger).
_SMALL = 64 * 1024
#: Seconds between checks for calls still in flight while the pool closes.
_DRAIN_POLL = 0.005


class AsyncLeanPool:
    """At most ``max_connections`` redis-py connections, handed out LIFO.

    Cancellation-safe (and, in the sync twin, safe against ``KeyboardInterrupt``): a call
    that ends in any way but a complete reply never returns its connection to the pool.
    The connection is closed instead, because a reply may still be on its way and would
    be read by the next caller (the bug behind CVE-2023-28858/28859 in redis-py's asyncio
    client). The call's slot is always given back; a caller cancelled while it waits for a
    slot takes none.

    Args:
        factory: makes a new (unconnected) redis-py connection.
        max_connections: connections open at most; callers beyond wait.
        timeout: seconds a caller waits for a free connection.
        retry_dropped: send once more on a fresh connection when the first attempt finds
            the connection dropped (how a restarted Redis is reconnected).
        address: the node's ``host:port`` (or socket path), for logs and stats.
        call_timeout: seconds one call may take once it has its slot (handshake,
            writes, reads, retry); default 5.
        whole_call: count ``call_timeout`` from the start of the call, the wait for a
            slot included (a health probe's one bound), instead of from the slot.
        connect_timeout: seconds a new connection's socket set-up may take at most
            (within the call's deadline); default ``call_timeout``.
        max_value_bytes: the largest value a GET or MGET may return, per key.
        on_info: called with the ``INFO server`` and ``INFO replication`` replies of
            every new connection (asked in its handshake's one write): what the node is.
        locate: where a new connection goes, asked before each connect with the call's
            deadline: ``(host, port)`` (a Sentinel-discovered primary); None keeps the
            factory's address.
    """

    def __init__(
        self,
        factory: Callable[[], AbstractConnection],
        *,
        max_connections: int,
        timeout: float,
        retry_dropped: bool = True,
        address: str = "",
        call_timeout: float = 5.0,
        whole_call: bool = False,
        connect_timeout: float | None = None,
        max_value_bytes: int = 1024 * 1024,
        on_info: Callable[[bytes, bytes], None] | None = None,
        locate: Callable[[float], Awaitable[tuple[str, int]]] | None = None,
    ) -> None:
        self.address = address
        self._locate = locate
        self._call_timeout = call_timeout
        self._whole_call = whole_call
        self._connect_timeout = self._call_timeout if connect_timeout is None else connect_timeout
        self._max_value = max_value_bytes
        self._on_info = on_info
        self._factory = factory
        self._retry_dropped = retry_dropped
        self.max_connections = max_connections
        self._timeout = timeout
        self._slots = FairSlots(max_connections)
        # list.append/list.pop are atomic: the slots bound how many connections exist,
        # the list only holds the idle ones.
        self._idle: list[AbstractConnection] = []
        self._all: list[AbstractConnection] = []
        self._discarded = 0
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._closed = False
        #: Bumped by drop_idle: a connection of an earlier one is not used again.
        self._generation = 0

    async def execute(self, *args: Any, check: Check | None = None) -> Any:  # noqa: ANN401 - a raw Redis reply
        """Send one command and return its reply, checked against its contract.

        Args:
            args: the command and its arguments.
            check: the reply's contract, when it is not the command's own (a script's).

        Raises:
            PoolExhaustedError: no connection freed up within the timeout (a
                ``redis.exceptions.ConnectionError``, message ``"No connection available."``).
            PoolClosedError: the pool is closed.
            ProtocolError: the reply broke its contract (the connection is closed).
            redis.exceptions.ConnectionError: Redis could not be reached twice in a row.
            redis.exceptions.TimeoutError, TimeoutError: the call's deadline passed.
            redis.exceptions.ResponseError: Redis answered with an error.
        """
        if os.getpid() != self._pid:
            self._after_fork()
        if self._closed:
            raise PoolClosedError
        start = time.monotonic()
        slots = self._slots
        released = slots.released
        if not await slots.acquire(self._timeout):
            raise PoolExhaustedError(
                slots=slots.slots,
                waited=time.monotonic() - start,
                released=slots.released - released,
            )
        try:
            # One deadline for everything this call does on the wire.
            deadline = (start if self._whole_call else time.monotonic()) + self._call_timeout
            if self._closed:
                raise PoolClosedError  # closed while this call waited for its slot
            # list.pop/list.append are atomic: the slots bound how many connections
            # exist, the list holds the idle ones.
            conn = self._take()
            if conn.crm_generation != self._generation:  # type: ignore[attr-defined]
                conn = await self._renew(conn)
            refusal: ResponseError | None = None
            try:
                async with within(deadline - time.monotonic()):
                    reply = await self._call(conn, args, check, deadline)
            except ResponseError as exc:
                refusal = exc  # an error reply was read in full: the stream is in step
            except BaseException:
                # A timeout, a dropped connection, a broken reply, a cancellation or an
                # interrupt: a reply may still be on its way (or the stream is out of
                # step), so this connection is never used again.
                await self._discard(conn)
                raise
            if self._closed:
                await self._drop(conn)  # this call was its connection's last user
            else:
                self._idle.append(conn)
            if refusal is not None:
                raise refusal
            return reply
        finally:
            self._slots.release()

    async def _call(
        self, conn: AbstractConnection, args: Sequence[Any], check: Check | None, deadline: float
    ) -> Any:  # noqa: ANN401
        if dirty(conn):
            # Bytes nobody asked for (a late or unrequested reply, or the server closed
            # the connection while it was idle): reading on would shift every reply.
            await conn.disconnect(nowait=True)
        try:
            return await self._exchange(conn, args, check, deadline)
        except RedisConnectionError:
            if self._closed or not self._retry_dropped:
                raise
            # A connection dropped while idle (Redis restarted, or a proxy closed it):
            # reconnect and try once more, as redis-py's Retry(retries=1) would, within
            # the same deadline.
            await conn.disconnect(nowait=True)
            return await self._exchange(conn, args, check, deadline)

    async def _exchange(
        self, conn: AbstractConnection, args: Sequence[Any], check: Check | None, deadline: float
    ) -> Any:  # noqa: ANN401
        if not connected(conn):
            await self._connect(conn, deadline)
        try:  # pack_all, inline: the hot path
            packed = [pack(args)]
        except TypeError:  # an argument only redis-py knows how to send
            packed = conn.pack_command(*args)
        await send(conn, packed, deadline)
        return await self._read(conn, args, check, deadline)

    async def _connect(self, conn: AbstractConnection, deadline: float) -> None:
        """Open ``conn`` (socket, TLS) and run the handshake, all before ``deadline``."""
        if self._locate is not None:
            tcp: Any = conn  # a TCP connection (locate is never given for a socket path)
            tcp.host, tcp.port = await self._locate(deadline)
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the call's deadline passed before connecting")
        conn.socket_connect_timeout = min(self._connect_timeout, left)
        conn.redis_connect_func = functools.partial(self._handshake, deadline=deadline)
        await conn.connect_check_health(check_health=False, retry_socket_connect=False)

    async def _handshake(self, conn: AbstractConnection, *, deadline: float) -> None:
        """AUTH, SELECT and CLIENT SETNAME in one write, their replies read before
        ``deadline``. A refusal's text may echo the password (a server that renamed AUTH
        quotes its arguments): the guard logs a fixed description instead."""
        parser: Any = conn._parser
        parser.on_connect(conn)
        commands: list[tuple[Any, ...]] = []
        username, password = getattr(conn, "username", None), getattr(conn, "password", None)
        if password is not None or username is not None:
            commands.append(("AUTH", username, password) if username else ("AUTH", password))
        learn = self._on_info
        if learn is not None:
            # What the node is (standalone, replica, cluster node, Sentinel), asked before
            # SELECT and CLIENT SETNAME, which a Sentinel may refuse.
            commands.append(("INFO", "server"))
            commands.append(("INFO", "replication"))
        if getattr(conn, "db", 0):
            commands.append(("SELECT", conn.db))
        if getattr(conn, "client_name", None):
            commands.append(("CLIENT", "SETNAME", conn.client_name))
        if not commands:
            return
        await send(conn, pack_all(conn, commands), deadline)
        info: list[bytes] = []
        for index, command in enumerate(commands, 1):
            # A refusal propagates as it is: the guard knows errors raised from here
            # (``_guard.is_handshake_error``) and never logs their text.
            reply = await self._read(conn, command, None, deadline, more=index < len(commands))
            if command[0] == "INFO":
                info.append(reply)
                if learn is not None and len(info) == 2:
                    learn(info[0], info[1])

    async def _read(
        self,
        conn: AbstractConnection,
        args: Sequence[Any],
        check: Check | None,
        deadline: float,
        *,
        more: bool = False,
    ) -> Any:  # noqa: ANN401
        """Read one reply before ``deadline``, within its size budget, and check it;
        ``more``: replies to further commands may follow (a pipelined handshake)."""
        parser: Any = conn._parser
        reader = parser._reader
        reply = reader.gets()
        if reply is NOT_ENOUGH_DATA:
            reply = await self._receive(conn, reader, args, deadline)
        if not more and reader.has_data():
            raise ProtocolError(f"more than one reply to {args[0]}")
        if isinstance(reply, ERROR_REPLY):
            raise reply
        check_reply(reply, args, check)
        return reply

    async def _receive(
        self,
        conn: AbstractConnection,
        reader: Any,  # noqa: ANN401 - hiredis.Reader
        args: Sequence[Any],
        deadline: float,
    ) -> Any:  # noqa: ANN401
        """Feed ``reader`` from the socket until it holds a whole reply."""
        total = 0
        tail = b""
        while True:
            chunk = await receive(conn, deadline)
            total += len(chunk)
            if total > _SMALL and total > reply_budget(args, self._max_value):
                raise ProtocolError(f"reply to {args[0]} larger than the call can use")
            # Seen before hiredis parses it: hiredis allocates an aggregate at its header.
            if huge_array_header(chunk, at_start=not total - len(chunk)) or (
                tail and huge_array_header(tail + bytes(chunk[:24]), at_start=False)
            ):
                raise ProtocolError(f"reply to {args[0]} announces a huge aggregate")
            reader.feed(chunk)
            try:
                reply = reader.gets()
            except InvalidResponse as exc:  # bytes that are not RESP at all
                raise ProtocolError(f"reply to {args[0]} is not RESP: {exc}") from None
            if reply is not NOT_ENOUGH_DATA:
                return reply
            tail = bytes(chunk[-24:])

    async def execute_large(self, *args: Any, check: Check | None = None) -> Any:  # noqa: ANN401
        """The pool's own :meth:`execute`: a call has its connection to itself here."""
        return await AsyncLeanPool.execute(self, *args, check=check)

    async def evalsha(self, script: ScriptLike, keys: Sequence[Any], args: Sequence[Any]) -> Any:  # noqa: ANN401
        """Run a registered script by SHA, its reply checked against the script's contract,
        loading it first if Redis answers ``NOSCRIPT`` (after a restart or ``SCRIPT
        FLUSH``)."""
        check = script.check
        try:
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args, check=check)
        except NoScriptError:
            await self.execute("SCRIPT", "LOAD", script.script)
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args, check=check)

    def _take(self) -> AbstractConnection:
        """An idle connection, else a new one."""
        try:
            return self._idle.pop()
        except IndexError:
            return self._new()

    async def _renew(self, conn: AbstractConnection) -> AbstractConnection:
        """``conn`` was busy during a primary switch (:meth:`drop_idle`) and may point at
        the former primary: close it, and every other such one found idle; a connection
        of the current generation instead."""
        while conn.crm_generation != self._generation:  # type: ignore[attr-defined]
            await self._drop(conn)
            conn = self._take()
        return conn

    def _new(self) -> AbstractConnection:
        conn: Any = self._factory()
        conn.crm_generation = self._generation
        with self._lock:
            self._all.append(conn)
        return conn  # type: ignore[no-any-return]

    async def _discard(self, conn: AbstractConnection) -> None:
        with self._lock:
            self._discarded += 1
        await self._drop(conn)

    async def _drop(self, conn: AbstractConnection) -> None:
        with self._lock:
            if conn in self._all:
                self._all.remove(conn)
        # nowait: the socket is closed without a suspension point, so a second
        # cancellation cannot leave it half closed.
        await conn.disconnect(nowait=True)

    def _after_fork(self) -> None:
        # The parent's sockets belong to the parent: forget them without closing them.
        with self._lock:
            if os.getpid() == self._pid:
                return
            self._idle = []
            self._all = []
            self._slots = FairSlots(self.max_connections)
            self._pid = os.getpid()

    async def drop_idle(self, keep: Callable[[AbstractConnection], bool]) -> int:
        """Close the idle connections ``keep`` rejects (a former primary's); how many.

        A connection busy meanwhile was taken before the switch and may still point at
        the former primary: it comes back of an earlier generation, and is closed when
        a call next finds it idle instead of being used (a replayed invalidation must
        reach the new primary, not the one being demoted)."""
        with self._lock:
            self._generation += 1
            idle, self._idle = self._idle, []
        dropped = 0
        while True:
            # pop, not iteration: a caller that took the old list just before the swap
            # may still pop from it, and each connection must go to one of us only.
            try:
                conn = idle.pop()
            except IndexError:
                return dropped
            if keep(conn):
                conn.crm_generation = self._generation  # type: ignore[attr-defined]
                self._idle.append(conn)
            else:
                dropped += 1
                await self._drop(conn)

    def accounting(self) -> PoolAccounting:
        """Where every slot and connection is (see :class:`PoolAccounting`)."""
        slots = self._slots
        with self._lock:
            created, idle = len(self._all), len(self._idle)
            return PoolAccounting(
                slots_held=slots.held,
                checked_out=created - idle,
                idle=idle,
                created=created,
                waiting=slots.waiting,
                waits=slots.waits,
                timeouts=slots.timeouts,
                discarded=self._discarded,
                wait_time=tuple(slots.wait_time) if slots.waits else (),
            )

    async def close(self, grace: float) -> None:
        """Close the pool: new calls fail at once with :class:`PoolClosedError`, idle
        connections close now, and calls in flight keep their connection for up to
        ``grace`` seconds to read their reply; whatever is still open then is closed."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            await self._drop(conn)
        deadline = time.monotonic() + grace
        while len(self._all) > len(self._idle) and time.monotonic() < deadline:
            await sleep(_DRAIN_POLL)  # shutdown only: a poll is simpler than a wake-up
        with self._lock:
            left, self._all, self._idle = self._all, [], []
        for conn in left:
            # A call still waiting on one of these sees a ConnectionError (not retried on a
            # closed pool) and degrades.
            await conn.disconnect(nowait=True)
