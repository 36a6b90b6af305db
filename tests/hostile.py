"""A hostile RESP server on loopback: it answers the connection handshake like Redis, then
answers data commands from a table of wrong replies (for tests only).

Each connection runs in a thread of its own. Requests are parsed with hiredis; replies
are written raw, so anything a buggy server, proxy or network could send can be sent.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import hiredis

#: Commands answered like Redis whatever the row (the connection handshake and probes).
_HANDSHAKE = {b"AUTH", b"SELECT", b"CLIENT", b"HELLO"}


@dataclass(frozen=True)
class Row:
    """How the server answers every data command.

    Attributes:
        name: the case, for test ids.
        reply: raw bytes sent as the answer (may be anything).
        drip: seconds between bytes (0: all at once).
        delay: seconds to wait before answering.
        close: close the connection after sending ``reply``.
        silent: never answer.
        handshake_delay: seconds to wait before each handshake answer.
    """

    name: str
    reply: bytes = b""
    drip: float = 0.0
    delay: float = 0.0
    close: bool = False
    silent: bool = False
    handshake_delay: float = 0.0


class HostileServer:
    """A loopback server answering per ``row`` (changeable while it runs)."""

    def __init__(self, row: Row) -> None:
        self.row = row
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self.requests: list[list[bytes]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self._listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        reader = hiredis.Reader()
        conn.settimeout(0.1)
        try:
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    return
                reader.feed(data)
                while (request := reader.gets()) is not False:
                    if not self._answer(conn, request):
                        return
        except OSError:
            return
        finally:
            conn.close()

    def _answer(self, conn: socket.socket, request: list[bytes]) -> bool:
        row = self.row
        self.requests.append(request)
        command = request[0].upper()
        if command in _HANDSHAKE:
            self._sleep(row.handshake_delay)
            conn.sendall(b":7\r\n" if request[1:2] == [b"ID"] else b"+OK\r\n")
            return True
        if row.silent:
            return True
        self._sleep(row.delay)
        if row.drip:
            for byte in row.reply:
                if self._stop.is_set():
                    return False
                conn.sendall(bytes([byte]))
                self._sleep(row.drip)
        else:
            conn.sendall(row.reply)
        return not row.close

    def _sleep(self, seconds: float) -> None:
        if seconds:
            self._stop.wait(seconds)

    def close(self) -> None:
        """Stop serving and close every connection."""
        self._stop.set()
        self._listener.close()
        for conn in self._conns:
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=2)


@contextmanager
def hostile(row: Row) -> Iterator[HostileServer]:
    """A running :class:`HostileServer` for ``row``."""
    server = HostileServer(row)
    try:
        yield server
    finally:
        server.close()


def timed(call: Callable[[], object]) -> tuple[object, float]:
    """``call()``'s result and the seconds it took."""
    start = time.monotonic()
    result = call()
    return result, time.monotonic() - start
