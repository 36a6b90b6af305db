"""What both auto-pipelined data paths share (``crmcache._mux`` for asyncio,
``crmcache._mux_sync`` for threads): one shared connection's reply side and its books.

A shared connection keeps its waiting calls oldest first, as ``(waiter, args, check,
sent_at)``; a waiter is an ``asyncio.Future`` or, for threads, ``_mux_sync``'s one-shot
waiter with the same four methods (``done``, ``set_result``, ``set_exception``). Replies
come back in the order the commands went out, so the oldest waiter gets each one:

* :meth:`MuxReplies.screen` refuses a chunk before hiredis sees it (the end of the
  stream, a huge aggregate header, a reply over its call's budget);
* :meth:`MuxReplies.dispatch` hands every complete reply to the oldest waiter, checked
  against its command's contract; a waiter whose caller gave up (cancelled, interrupted,
  timed out) is skipped, its reply dropped in its turn, so no reply can ever reach
  another caller (CVE-2023-28858/28859);
* :meth:`MuxReplies.fail_all` fails every waiting call when the connection closes, each
  with an exception of its own.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from redis._parsers.hiredis import NOT_ENOUGH_DATA
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse

from ._config import DEFAULT_PIPELINE_CONNECTIONS
from ._guard import PoolClosedError
from ._replies import (
    ERROR_REPLY,
    Check,
    ProtocolError,
    check_reply,
    huge_array_header,
    reply_budget,
)
from ._stats import PoolAccounting

__all__ = [
    "READ_SIZE",
    "MuxBooks",
    "MuxReplies",
    "Pending",
    "Waiter",
]

#: Replies up to this size skip the budget check.
_SMALL = 64 * 1024
#: Bytes read from a socket at once.
READ_SIZE = 65536


class Waiter(Protocol):
    """Where one call's reply goes (an ``asyncio.Future`` has these methods)."""

    def done(self) -> bool:
        """True once answered, or given up by its caller."""

    def set_result(self, result: Any, /) -> None:  # noqa: ANN401 - a raw Redis reply
        """Hand the call its reply."""

    def set_exception(self, exception: BaseException, /) -> None:
        """Hand the call its failure."""


#: One waiting call: its waiter, its command, its reply's contract, when it was queued.
Pending = tuple[Waiter, tuple[Any, ...], Check | None, float]


class MuxBooks:
    """What a shared-connection pool keeps besides the lean pool's: its connections, its
    counters (commands queued, socket writes, connections closed after a failure), and
    its accounting in the lean pool's terms. Comes before the lean pool in the bases."""

    #: Shared connections, unless given to the constructor (a subclass sets it first).
    pipeline_connections = DEFAULT_PIPELINE_CONNECTIONS

    _muxes: list[Any]

    def open_books(self, connections: int | None) -> int:
        """Set the books up (after the lean pool's constructor); the connection count."""
        count = self.pipeline_connections if connections is None else connections
        pool: Any = self  # the lean pool's settings
        self.call_timeout: float = pool._call_timeout
        self.max_value_bytes: int = pool._max_value
        self._muxes = [None] * count
        self.discarded = 0
        self.commands = 0
        self.writes = 0
        return count

    def live_connections(self) -> list[Any]:
        """The shared connections open now."""
        return [mux for mux in self._muxes if mux is not None and mux.alive]

    def in_flight(self) -> bool:
        """True while a call waits for its reply on any shared connection."""
        return any(mux.pending for mux in self.live_connections())

    def kill_where(self, keep: Callable[[Any], bool], reason: BaseException) -> int:
        """Close the shared connections whose redis-py connection ``keep`` rejects; how
        many."""
        dropped = 0
        for mux in self.live_connections():
            if not keep(mux.conn):
                mux.kill(reason)
                dropped += 1
        return dropped

    def accounting(self) -> PoolAccounting:
        """Calls in flight (as slots held) and the shared connections open (as idle)."""
        live = self.live_connections()
        return PoolAccounting(
            slots_held=sum(len(mux.pending) for mux in live),
            checked_out=0,
            idle=len(live),
            created=len(live),
            waiting=0,
            waits=0,
            timeouts=0,
            discarded=self.discarded,
        )


class MuxReplies:
    """The reply side of one shared connection (see the module docstring).

    Attributes:
        alive: False once closed (for good: a new connection replaces it).
        pending: the waiting calls, oldest first.
        reader: the connection's hiredis reader (redis-py's, with its error classes).
        address: the node, for error messages.
        max_value_bytes: the largest value a GET or MGET may return, per key.
    """

    __slots__ = ("address", "alive", "max_value_bytes", "pending", "reader")

    def __init__(self, reader: Any, address: str, max_value_bytes: int) -> None:  # noqa: ANN401 - hiredis.Reader
        self.reader = reader
        self.address = address
        self.max_value_bytes = max_value_bytes
        self.pending: deque[Pending] = deque()
        self.alive = True

    def screen(self, chunk: bytes, since: int, tail: bytes) -> None:
        """Refuse ``chunk`` before hiredis sees it: the end of the stream, a huge
        aggregate header (hiredis allocates at the header), a reply over its call's
        budget (``since``: bytes read since a reply last completed, this chunk included;
        ``tail``: the end of the previous chunk, for a header split between two).

        The budget is checked on what came before this chunk: a chunk may end one reply
        and carry the start of the next ones (a large value behind another), so the
        oldest call's reply is only known to be over its budget once it took more than
        that without completing. A reply is refused at most one chunk late."""
        if not chunk:
            raise RedisConnectionError("Connection closed by server.")
        if huge_array_header(chunk, at_start=not self.reader.has_data()) or (
            tail and huge_array_header(tail + chunk[:24], at_start=False)
        ):
            raise ProtocolError("a reply announces a huge aggregate")
        pending = self.pending
        before = since - len(chunk)
        if (
            before > _SMALL
            and pending
            and before > reply_budget(pending[0][1], self.max_value_bytes)
        ):
            raise ProtocolError(f"reply to {pending[0][1][0]} larger than the call can use")

    def dispatch(self) -> bool:
        """Hand every complete reply to the oldest waiting call, checked; True if there
        was at least one.

        Raises:
            ProtocolError: a reply is not RESP, nobody asked for it, or it broke its
                command's contract (the stream is not to be trusted: close it).
        """
        reader, pending = self.reader, self.pending
        answered = False
        while True:
            try:
                reply = reader.gets()
            except InvalidResponse as exc:  # bytes that are not RESP at all
                raise ProtocolError(f"a reply is not RESP: {exc}") from None
            if reply is NOT_ENOUGH_DATA:
                return answered
            answered = True
            try:
                waiter, args, check, _ = pending.popleft()
            except IndexError:
                raise ProtocolError("a reply nobody asked for") from None
            if waiter.done():
                continue  # its caller gave up: dropped, in its turn
            if isinstance(reply, ERROR_REPLY):
                waiter.set_exception(reply)
                continue
            # A script's contract is called here; check_reply finds a command's, and
            # words the error.
            if check is None or not check(reply, args):
                try:
                    check_reply(reply, args, check)
                except ProtocolError as exc:
                    waiter.set_exception(exc)
                    raise
            waiter.set_result(reply)

    def fail_all(self, reason: BaseException) -> None:
        """Fail every waiting call: a new exception each (one instance raised in many
        callers would gather every caller's traceback)."""
        text = f"connection to {self.address} closed: {type(reason).__name__}: {reason}"
        pending = self.pending
        while True:
            try:
                waiter = pending.popleft()[0]
            except IndexError:  # empty (the reader may be popping too: each pop is atomic)
                return
            if waiter.done():
                continue
            if isinstance(reason, PoolClosedError):
                waiter.set_exception(PoolClosedError())
            elif isinstance(reason, TimeoutError):
                waiter.set_exception(TimeoutError(str(reason)))
            else:
                waiter.set_exception(RedisConnectionError(text))
