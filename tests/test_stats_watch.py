"""`crmcache stats` and `crmcache stats --watch` against a real server: keys per kind, ops/s
from deltas, per-node rows on a cluster, Ctrl-C, and a Redis that dies and comes back.

The in-process tests sample through the facade under test (the async sampler with
``--facade=async``); the command itself (sync) runs as a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import IO, Any

import pytest
import redis
from rich.console import Console

import crmcache
from crmcache import ClientPreferences, MessageChannel, RateLimit
from crmcache._serverstats import ServerSample
from crmcache._statsview import StatsView
from crmcache._sync.server_view import sample_server
from crmcache.testing import RedisServer


def take_sample(cache: Any, scan_budget: float = 2.0) -> ServerSample:
    """A sample through the manager's own facade (async: the async sampler on the loop)."""
    target = getattr(cache, "_target", None)
    if target is not None:  # the --facade=async stand-in
        import facades  # noqa: PLC0415
        from crmcache._async.server_view import sample_server as async_sample  # noqa: PLC0415

        sample: ServerSample = facades.run(async_sample(target, scan_budget=scan_budget))
        return sample
    return sample_server(cache, scan_budget=scan_budget)


def primaries(redis_server: Any) -> int:
    """How many primaries the session's Redis has (1 unless --topology=cluster)."""
    return len(redis_server.cluster.primaries()) if redis_server.cluster is not None else 1


def write_one_of_each(cache: Any) -> None:
    """Two preferences, one tombstone, three templates, a rate-limit counter, two send
    claims and a lease (the lease is held: the test releases it)."""
    for client in ("c1", "c2", "c3"):
        prefs = ClientPreferences(
            client_id=client, preferred_channels=[MessageChannel.EMAIL], version=1
        )
        assert cache.set_client_preferences(prefs)
    assert cache.invalidate_client_preferences("c3")  # leaves a tombstone
    for name in ("a", "b", "c"):
        assert cache.set_template(name, MessageChannel.SMS, "hello")
    assert cache.check_rate_limits([RateLimit("sms", limit=10, window=60)]).allowed
    assert cache.claim_send("message-1")
    assert cache.claim_send("message-2")


EXPECTED_KINDS = {
    "preferences": 2,
    "tombstones": 1,
    "templates": 3,
    "rate_limits": 1,
    "send_claims": 2,
    "leases": 1,
    "other": 0,
}


def test_keys_per_kind_match_what_was_written(
    cache: crmcache.CRMCacheManager, raw: redis.Redis, redis_server: Any
) -> None:
    """Every kind is counted from its prefix (tombstones from their value), per node,
    in full (SCAN finished within its budget); one node row per primary."""
    write_one_of_each(cache)
    lease = cache.acquire_load_lease("c9")
    assert lease.state.value == "acquired"
    view = StatsView(sample=lambda: take_sample(cache), url="x", console=Console())
    figures, sample = view.once()
    assert len(figures.nodes) == primaries(redis_server)
    assert all(node.error is None for node in figures.nodes)
    assert figures.keys_exact
    assert dict(figures.total.keys) == EXPECTED_KINDS
    assert figures.total.total_keys == sum(EXPECTED_KINDS.values())
    # Per node, the counts are the node's own: they add up, each node as SCAN saw it.
    for node in sample.nodes:
        assert node.info is not None
    assert sum(node.total_keys or 0 for node in figures.nodes) == figures.total.total_keys
    lease.release()
    assert view.once()[0].total.keys["leases"] == 0


@pytest.mark.single_only
def test_scan_budget_makes_a_sample(cache: crmcache.CRMCacheManager, raw: redis.Redis) -> None:
    """Past its budget SCAN stops and the counts are a lower bound, said so."""
    raw.mset({f"crm:template:email:t{i}": "x" for i in range(5000)})
    sample = take_sample(cache, scan_budget=1e-9)
    assert not sample.nodes[0].keys_exact
    counted = sum(sample.nodes[0].keys.values())
    assert 0 < counted < 5000
    console = Console(record=True, width=200)
    view = StatsView(sample=lambda: sample, url="x", console=console, scan_budget=1e-9)
    view.show_once()
    assert "a sample, SCAN stopped at its" in " ".join(console.export_text().split())


def test_ops_per_second_from_deltas_while_commands_run(
    cache: crmcache.CRMCacheManager, raw: redis.Redis, redis_url: str
) -> None:
    """A watch of three refreshes while a thread issues GETs: from the second refresh
    ops/s is the delta of total_commands_processed and is > 0; the hit ratio over the
    interval counts the thread's lookups (all misses here), not the sampler's own reads."""
    raw.set("crm:prefs:someone", "1:{}")  # read by the sampler's tombstone check
    stop = threading.Event()

    def load() -> None:
        client = redis.Redis.from_url(redis_url) if "+" not in redis_url else raw
        while not stop.is_set():
            client.get("crm:missing")

    worker = threading.Thread(target=load, daemon=True)
    rows: list[Any] = []
    view = StatsView(sample=lambda: take_sample(cache), url="x", console=Console(), interval=0.2)
    worker.start()
    try:
        for _ in range(3):
            rows.append(view.once()[0].total)
            stop.wait(0.2)
    finally:
        stop.set()
        worker.join()
    assert rows[0].ops_per_sec_source == "redis"
    assert rows[0].hit_ratio_interval is None
    for row in rows[1:]:
        assert row.ops_per_sec_source == "delta"
        assert row.ops_per_sec > 0
        assert row.hit_ratio_interval == 0.0  # only misses: the sampler's hits left out
        assert row.hit_ratio_since_start == 0.0


def test_watch_stops_after_count_with_a_fake_clock(cache: crmcache.CRMCacheManager) -> None:
    """`watch(count)` refreshes N times, sleeping the rest of each interval on its clock,
    renders the live tables and returns 0."""
    now = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    console = Console(record=True, width=200)
    view = StatsView(
        sample=lambda: take_sample(cache),
        url="redis://x",
        console=console,
        interval=5.0,
        clock=lambda: now[0],
        sleep=sleep,
    )
    assert view.watch(count=3) == 0
    assert slept == [5.0, 5.0]
    text = " ".join(console.export_text().split())
    assert "every 5 s (Ctrl-C to stop)" in text
    assert "hit % (ivl / start / all)" in text


# -- the command ---------------------------------------------------------------------------


def cli(*args: str, tty: bool = False) -> subprocess.Popen[str]:
    """``python -m crmcache ARGS`` in the background (``tty``: Rich writes as to a
    terminal, so the live view shows on the pipe)."""
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "CACHE_KEY_PREFIX"}}
    if tty:
        env |= {"TTY_COMPATIBLE": "1", "COLUMNS": "200"}
    return subprocess.Popen(
        [sys.executable, "-m", "crmcache", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def json_lines(stream: IO[str]) -> Iterator[dict[str, Any]]:
    """The JSON lines of a watch, as they come."""
    for line in stream:
        yield json.loads(line)


def test_watch_json_count(
    cache: crmcache.CRMCacheManager, raw: redis.Redis, redis_url: str, redis_server: Any
) -> None:
    """`stats --watch --json --count 3`: three JSON lines, keys per kind as written, a
    row per primary, exit 0."""
    write_one_of_each(cache)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "crmcache",
            "stats",
            "--redis-url",
            redis_url,
            "--watch",
            "--json",
            "--count",
            "3",
            "--interval",
            "0.1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == 3
    expected = EXPECTED_KINDS | {"leases": 0}
    for line in lines:
        assert line["total"]["keys"] == expected
        assert len(line["nodes"]) == primaries(redis_server)
        assert all(node["unreachable_since"] is None for node in line["nodes"])
    assert lines[-1]["total"]["ops_per_sec_source"] == "delta"
    assert lines[-1]["total"]["evicted_keys_delta"] == 0


@pytest.mark.parametrize("tty", [True, False], ids=["live-tables", "json-lines"])
def test_ctrl_c_exits_0_without_a_traceback(redis_url: str, raw: redis.Redis, tty: bool) -> None:
    """SIGINT during a watch: the view stops, exit code 0, nothing on stderr."""
    args = ["stats", "--watch", "--redis-url", redis_url, "--interval", "0.2"]
    proc = cli(*args, tty=tty) if tty else cli(*args, "--json")
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the first refresh is on screen
        assert ("crmcache stats" in first) if tty else json.loads(first)["nodes"]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert err == ""
    if tty:
        assert "keys: templates" in out


@pytest.mark.slow
def test_watch_shows_unreachable_since_then_recovers(own_server: RedisServer) -> None:
    """A Redis that dies under a watch: the view goes on with "unreachable since", and
    shows figures again once the server is back (same port); Ctrl-C still exits 0."""
    proc = cli("stats", "--watch", "--json", "--redis-url", own_server.url, "--interval", "0.1")
    try:
        assert proc.stdout is not None
        lines = json_lines(proc.stdout)
        assert next(lines)["nodes"][0]["error"] is None
        own_server.kill()
        down = next(line for line in lines if line["nodes"][0]["unreachable_since"])
        assert down["nodes"][0]["used_memory"] is None
        assert down["error"]
        since = down["nodes"][0]["unreachable_since"]
        later = next(lines)
        assert later["nodes"][0]["unreachable_since"] == since  # since the first failure
        own_server.restart()
        back = next(line for line in lines if line["nodes"][0]["unreachable_since"] is None)
        assert back["nodes"][0]["used_memory"] > 0
        assert back["nodes"][0]["error"] is None
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_one_shot_json_is_the_same_figures(
    cache: crmcache.CRMCacheManager, raw: redis.Redis, redis_url: str, redis_server: Any
) -> None:
    """`stats --json` (once): the same figures as a watch's refresh, without rates that
    need two samples (ops/s is Redis's own estimate)."""
    write_one_of_each(cache)
    proc = subprocess.run(
        [sys.executable, "-m", "crmcache", "stats", "--redis-url", redis_url, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    assert stats["total"]["keys"] == EXPECTED_KINDS | {"leases": 0}
    assert stats["total"]["ops_per_sec_source"] == "redis"
    assert stats["total"]["evicted_keys_delta"] is None
    assert stats["total"]["maxmemory_policy"]
    assert len(stats["nodes"]) == primaries(redis_server)


@pytest.mark.parametrize(
    "args",
    [["--interval", "0"], ["--count", "2"], ["--watch", "--count", "0"]],
    ids=["interval", "count-without-watch", "count-zero"],
)
def test_bad_watch_arguments_are_one_line(args: list[str], redis_url: str) -> None:
    """Bad --interval / --count: one line naming the option, exit 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "crmcache", "stats", "--redis-url", redis_url, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("crmcache: --")
