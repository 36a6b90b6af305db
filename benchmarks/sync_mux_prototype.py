"""A throwaway prototype of a multiplexed mode for the sync facade (issue 13, item 3):
measured by test_bench_sync_mux.py, not part of crmcache.

One socket to Redis, opened and handshaken by redis-py's ``Connection``, then taken over:

* a caller packs its command (``Connection.pack_command``) and hands it, with a
  one-shot waiter (a pre-acquired ``threading.Lock``, CPython's cheapest blocking
  primitive), to the writer, then blocks on the waiter;
* ``writer="thread"``: a writer thread drains a ``queue.SimpleQueue`` (everything queued
  since its last wake-up), appends the waiters to the in-flight deque in that order and
  sends the batch in one ``sendall``;
  ``writer="inline"``: the caller itself appends its waiter and sends, under a lock (no
  writer thread, no batching: one ``send`` per call);
* a reader thread feeds ``hiredis.Reader`` and hands each reply to the oldest in-flight
  waiter (replies come back in order on one connection).

Missing on purpose (it is a measurement, not a client): reconnection, per-call
deadlines beyond a fixed wait, cancellation, error replies beyond passing them back,
RESP3, TLS. A dropped connection fails every waiter with ``ConnectionError``.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import socket
import threading
from typing import Any

import hiredis
import redis
from redis.connection import parse_url

__all__ = ["SyncMux"]


class _Waiter:
    __slots__ = ("lock", "value")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.value: Any = None


class SyncMux:
    """One shared connection for many threads; see the module docstring."""

    def __init__(self, url: str, *, writer: str = "thread", timeout: float = 5.0) -> None:
        if writer not in {"thread", "inline"}:
            raise ValueError("writer must be 'thread' or 'inline'")
        kwargs = parse_url(url)
        kwargs.pop("connection_class", None)
        self._conn = redis.Connection(**kwargs, protocol=2)
        self._conn.connect()
        sock = self._conn._sock
        assert sock is not None
        sock.settimeout(None)
        self._sock: socket.socket = sock
        self._timeout = timeout
        self._pending: collections.deque[_Waiter] = collections.deque()
        self._closed = False
        self._inline = writer == "inline"
        self._send_lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[bytes, _Waiter] | None] = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read_loop, name="mux-reader", daemon=True)
        self._reader.start()
        self._writer: threading.Thread | None = None
        if not self._inline:
            self._writer = threading.Thread(
                target=self._write_loop, name="mux-writer", daemon=True
            )
            self._writer.start()

    def execute(self, *args: Any) -> Any:
        """Send one command and block until its reply."""
        if self._closed:
            raise redis.ConnectionError("the multiplexed connection is closed")
        data = b"".join(self._conn.pack_command(*args))
        waiter = _Waiter()
        if self._inline:
            with self._send_lock:
                self._pending.append(waiter)
                self._sock.sendall(data)
        else:
            self._queue.put((data, waiter))
        if not waiter.lock.acquire(timeout=self._timeout):
            raise TimeoutError("no reply in time")
        value = waiter.value
        if isinstance(value, Exception):
            raise value
        return value

    def get(self, key: str) -> bytes | None:
        return self.execute("GET", key)  # type: ignore[no-any-return]

    def _write_loop(self) -> None:
        get, get_nowait, pending = self._queue.get, self._queue.get_nowait, self._pending
        while True:
            item = get()
            if item is None:
                return
            chunks = [item[0]]
            pending.append(item[1])
            while True:
                try:
                    item = get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                chunks.append(item[0])
                pending.append(item[1])
            try:
                self._sock.sendall(b"".join(chunks))
            except OSError as exc:
                self._fail(exc)
                return

    def _read_loop(self) -> None:
        reader = hiredis.Reader(replyError=redis.ResponseError)
        recv, feed, gets, pending = self._sock.recv, reader.feed, reader.gets, self._pending
        try:
            while data := recv(65536):
                feed(data)
                while (reply := gets()) is not False:
                    waiter = pending.popleft()
                    waiter.value = reply
                    waiter.lock.release()
        except OSError as exc:
            self._fail(exc)
        else:
            self._fail(redis.ConnectionError("Redis closed the connection"))

    def _fail(self, exc: BaseException) -> None:
        self._closed = True
        error = redis.ConnectionError(f"multiplexed connection lost: {exc}")
        while self._pending:
            waiter = self._pending.popleft()
            waiter.value = error
            waiter.lock.release()

    def close(self) -> None:
        self._closed = True
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join(2)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._reader.join(2)
        self._conn.disconnect()

    def __enter__(self) -> SyncMux:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
