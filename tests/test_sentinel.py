"""``redis+sentinel://``: the primary of a Sentinel group, on real servers (one primary, one
replica, three sentinels), through whichever facade the run drives (``--facade=async``
runs every test here on the async one). The failover test forces ``SENTINEL FAILOVER``
under a thread of reads and writes."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from crmcache import ClientPreferences, ConfigurationError, CRMCacheManager, MessageChannel
from crmcache._config import mask_url, resolve_settings, sentinel_target
from crmcache._keys import KeySpace, template_key
from crmcache._pending import PendingKind
from crmcache._stats import StatsRecorder
from crmcache._sync import replay
from crmcache._sync.primitives import Event
from crmcache.testing import SentinelGroup, find_redis_server_binary, free_loopback_port
from helpers import poll, prefs

SERVICE = "crm"
PASSWORD = "s3nt!nel-pa55"


@pytest.fixture
def group() -> Iterator[SentinelGroup]:
    """Started, with every sentinel aware of the replica and of each other."""
    if find_redis_server_binary() is None:
        pytest.skip("needs a redis-server binary")
    with SentinelGroup(service=SERVICE, password=PASSWORD) as started:
        yield started


def test_the_api_works_through_a_sentinel_url(group: SentinelGroup) -> None:
    """Preferences, templates, rate limits, health and stats through ``redis+sentinel://``;
    the data lands on the primary the sentinels name."""
    with CRMCacheManager(redis_url=group.url) as cache:
        assert cache.health_check() is True
        assert cache.set_client_preferences(prefs(1)) is True
        got = cache.get_client_preferences("client-123")
        assert got is not None
        assert got.language == "de"
        assert cache.set_template("welcome", "email", "Hello") is True
        assert cache.get_template("welcome", "email") == "Hello"
        assert cache.get_templates([("welcome", "email"), ("nope", "sms")]) == {
            ("welcome", "email"): "Hello",
            ("nope", "sms"): None,
        }
        results = [cache.check_rate_limit("sms", limit=2) for _ in range(3)]
        assert [r.allowed for r in results] == [True, True, False]
        assert not any(r.degraded for r in results)
        assert cache.invalidate_client_preferences("client-123", version=1) is True
        assert cache.get_client_preferences("client-123") is None
        stats = cache.get_stats()
        assert stats.topology == "standalone"
        assert stats.counters["redis_errors"] == 0
        assert PASSWORD not in repr(cache)
        assert PASSWORD not in repr(stats)
        with group.node(group.primary_port()) as node:
            assert node.exists(template_key(MessageChannel.EMAIL, "welcome")) == 1
    # The CLI takes the same URL; it shows it masked.
    proc = subprocess.run(
        [sys.executable, "-m", "crmcache", "health", "--redis-url", group.url, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "healthy": True,
        "redis_url": mask_url(group.url),
        "reason": None,
    }
    assert PASSWORD not in proc.stdout + proc.stderr


def test_a_failover_loses_no_invalidation(
    group: SentinelGroup,
    caplog: pytest.LogCaptureFixture,
    record_property: Callable[[str, object], None],
) -> None:
    """``SENTINEL FAILOVER`` while a thread reads and writes: no call raises, writes
    succeed on the new primary once it is found, and an invalidation confirmed by the
    former primary during the switch is replayed to the new one (no stale preference
    once the group settles)."""
    caplog.set_level(logging.INFO, logger="crmcache")
    old_port = group.primary_port()
    stale = "client-stale"
    errors: list[BaseException] = []
    stop = threading.Event()
    with (
        CRMCacheManager(
            redis_url=group.url, socket_timeout=1.0, socket_connect_timeout=0.5
        ) as cache,
        CRMCacheManager(redis_url=group.url, near_cache=True) as near_cached,
    ):
        assert cache.set_client_preferences(prefs(1, client_id=stale)) is True
        # A near cache follows the primary too: live before, served from memory.
        assert cache.set_template("near", "email", "before") is True
        near = near_cached._near
        assert near is not None
        near_cached.get_template("near", "email")
        poll(lambda: near.live, what="near cache live")
        assert near_cached.get_template("near", "email") == "before"
        with group.node(old_port) as old:
            # Replicated before the switch: the new primary starts with version 1 cached.
            assert old.wait(1, 2000) == 1

        def work() -> None:
            i = 0
            while not stop.is_set():
                try:
                    cache.set_template(f"t{i % 50}", "email", f"body {i}")
                    cache.get_template(f"t{(i + 7) % 50}", "email")
                    cache.set_client_preferences(prefs(1, client_id=f"c{i % 20}"))
                    cache.get_client_preferences(f"c{(i + 3) % 20}")
                    cache.check_rate_limit("sms", limit=1_000_000)
                except BaseException as exc:  # every one is a failure here
                    errors.append(exc)
                i += 1
                time.sleep(0.002)

        worker = threading.Thread(target=work, name="sentinel-load")
        worker.start()
        try:
            time.sleep(0.3)
            started = time.monotonic()
            with group.sentinel(0) as client:
                assert client.execute_command("SENTINEL", "FAILOVER", SERVICE)
            poll(lambda: group.primary_port() != old_port, timeout=15.0, what="sentinel switch")
            new_port = group.primary_port()
            # The former primary may still take writes for a while: this invalidation is
            # made in that window, and must reach the new primary all the same.
            assert cache.invalidate_client_preferences(stale, version=2) is True

            def written_on_new_primary() -> bool:
                marker = f"after-{time.monotonic()}"
                if not cache.set_template("probe", "email", marker):
                    return False
                with group.node(new_port) as new:
                    value = new.get(template_key(MessageChannel.EMAIL, "probe"))
                return value is not None and marker.encode() in value

            poll(written_on_new_primary, timeout=15.0, interval=0.05, what="new primary writes")
            recovery = time.monotonic() - started
            # Settled: the former primary is a replica of the new one, in sync.
            with group.node(old_port) as old:
                poll(
                    lambda: old.info("replication").get("master_link_status") == "up",
                    timeout=30.0,
                    interval=0.1,
                    what="former primary demoted and in sync",
                )
        finally:
            stop.set()
            worker.join(timeout=10)
        assert errors == [], errors[:3]
        # The listener reconnects to the new primary once its manager sees the switch (on
        # its own calls): a write there then reaches the near cache.
        poll(
            lambda: (
                near_cached.set_template("probe", "email", "x")
                and near_cached._transport.primary == ("127.0.0.1", new_port)
            ),
            timeout=10.0,
            interval=0.05,
            what="the near-cached manager found the new primary",
        )
        near_cached.get_template("near", "email")
        poll(lambda: near.live, timeout=10.0, what="near cache live again")
        assert cache.set_template("near", "email", "after") is True
        poll(
            lambda: near_cached.get_template("near", "email") == "after",
            timeout=5.0,
            what="near cache invalidated by the new primary",
        )
        assert cache.get_client_preferences(stale) is None
        assert cache.set_template("after", "email", "ok") is True
        assert cache.get_stats().topology == "standalone"
        assert cache.health_check() is True
    changes = [r for r in caplog.records if f"primary of {SERVICE} is now" in r.getMessage()]
    assert [r.getMessage() for r in changes][-1].endswith(f":{new_port}")
    # Shown with -s, and in the JUnit report's properties.
    record_property("failover_recovery_seconds", round(recovery, 3))
    print(f"\nsentinel failover: writes on the new primary {recovery:.2f} s after FAILOVER")
    assert recovery < 10.0


# -- the URL --------------------------------------------------------------------------


def test_sentinel_urls_parse() -> None:
    target = sentinel_target("redis+sentinel://u:pw@h1:1,h2,[::1]:3/svc/2?socket_timeout=2")
    assert target.sentinels == (("h1", 1), ("h2", 26379), ("::1", 3))
    assert target.service == "svc"
    assert target.node_url == "redis://u:pw@h1:1/2?socket_timeout=2"
    tls = sentinel_target("rediss+sentinel://h:5/svc?ssl_cert_reqs=none")
    assert tls.node_url == "rediss://h:5?ssl_cert_reqs=none"
    settings = resolve_settings(redis_url="rediss+sentinel://:pw@h:5/svc?socket_timeout=2")
    assert settings.socket_timeout == 2.0


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://h1:1", "names no service"),
        ("redis+sentinel://h1:1/", "names no service"),
        ("redis+sentinel://:pw@h1:1,h2:x/svc", "not host:port"),
        ("redis+sentinel://h1:1,,h2:2/svc", "not host:port"),
        ("redis+sentinel://h1:99999/svc", "not host:port"),
        ("redis+sentinel:///svc", "names no sentinel"),
        ("redis+sentinel://h1/svc/x", "database"),
        ("redis+sentinel://h1/svc/-1", "database"),
        ("redis+sentinel://h1/svc/1/2", "/<service_name>[/<db>]"),
        ("redis+sentinel://h1/svc?bogus=1", "'bogus' is not supported"),
        ("redis+sentinel://h1/svc?ssl_cert_reqs=none", "needs a rediss:// URL"),
        ("redis+sentinel://h1/svc/1?db=2", "two databases"),
        ("sentinel://h1/svc", "must start with"),
    ],
)
def test_bad_sentinel_urls_are_named(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        CRMCacheManager(redis_url=url)


def test_sentinel_passwords_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "redis+sentinel://user:p%40ss-word@h1:1,h2:2/svc/0"
    assert mask_url(url) == "redis+sentinel://user:***@h1:1,h2:2/svc/0"
    with pytest.raises(ConfigurationError) as info:
        CRMCacheManager(redis_url="redis+sentinel://:hunter2-secret@h1:x/svc")
    assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigurationError) as info:
        CRMCacheManager(redis_url="redis+sentinel://:hunter2-secret@h1/svc/hunter2-secret")
    assert "hunter2" not in str(info.value)
    monkeypatch.setenv("REDIS_URL", "rediss+sentinel://:hunter2-secret@h1:1/svc")
    settings = resolve_settings()
    assert settings.redis_url.startswith("rediss+sentinel://")
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in settings.masked_url


def test_unreachable_sentinels_degrade(caplog: pytest.LogCaptureFixture) -> None:
    """No sentinel answers: calls degrade (no exception), health_check is False, and the
    log names the service without the password."""
    caplog.set_level(logging.WARNING, logger="crmcache")
    port = free_loopback_port()
    url = f"redis+sentinel://:hunter2-secret@127.0.0.1:{port}/{SERVICE}"
    with CRMCacheManager(redis_url=url, socket_connect_timeout=0.2) as cache:
        assert cache.get_template("welcome", "email") is None
        assert cache.set_client_preferences(ClientPreferences(client_id="c")) is False
        assert cache.health_check() is False
        assert "hunter2" not in repr(cache)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"primary of {SERVICE!r}" in text
    assert "hunter2" not in text


def test_a_primary_change_requeues_recent_invalidations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the former primary confirmed since the sentinels last named it (less the
    replication margin) is queued again; past what can be remembered, every cached
    preference's TTL is shortened instead."""
    stopping = Event()
    stopping.set()  # no background replay: only the record is looked at
    replayer = replay.InvalidationReplayer(
        None,
        call=lambda *args: None,
        stats=StatsRecorder(),
        settings=resolve_settings(redis_url="redis://127.0.0.1:1/0"),
        stopping=stopping,
        forget=lambda *keys: None,
        keys=KeySpace("crm"),
    )
    replayer.requeue_confirmed(time.monotonic())  # not remembering: nothing to do
    monkeypatch.setattr(replay, "_REMEMBERED", 3)
    replayer.remember_confirmed()
    replayer.confirmed(PendingKind.PREFERENCES, "crm:prefs:a", 2)
    replayer.confirmed(PendingKind.TEMPLATE, "crm:template:email:t", None)
    replayer.requeue_confirmed(time.monotonic() + 5)  # all older than the window
    assert len(replayer.pending) == 0
    replayer.requeue_confirmed(time.monotonic())
    assert {e.key for e in replayer.pending.snapshot()} == {"crm:prefs:a", "crm:template:email:t"}
    assert not replayer.pending.prefs_overflowed
    for key in ("b", "c", "d"):
        replayer.confirmed(PendingKind.PREFERENCES, f"crm:prefs:{key}", 1)
    replayer.requeue_confirmed(time.monotonic())
    assert replayer.pending.prefs_overflowed


# -- crmcache.testing.SentinelGroup's own helpers -------------------------------------


def test_group_kill_primary_waits_for_the_takeover(group: SentinelGroup) -> None:
    """kill_primary() returns once every sentinel names the replica, now a primary."""
    old = group.primary()
    killed = group.kill_primary()
    assert killed is old
    assert not killed.running
    new = group.primary()
    assert new is not old
    assert new.running
    with group.node(new.port) as node:
        assert node.execute_command("ROLE")[0] == b"master"
    assert group.url.startswith(
        f"redis+sentinel://:s3nt%21nel-pa55@127.0.0.1:{group.sentinel_ports[0]},"
    )


@pytest.mark.slow
def test_group_failover_waits_until_settled(group: SentinelGroup) -> None:
    """failover() returns with the new primary named by every sentinel and the former one
    replicating it, in sync."""
    old = group.primary()
    new = group.failover()
    assert new is not old
    assert group.primary_port() == new.port
    with group.node(old.port) as node:
        info = node.info("replication")
    assert info["role"] == "slave"
    assert info["master_port"] == new.port
    assert info["master_link_status"] == "up"
