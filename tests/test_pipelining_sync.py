"""Auto-pipelining for threads (``crmcache._mux_sync``, ``pipelining=True`` on the sync
facade): threads share a few connections, and whatever they queue while one of them is
writing goes out in that thread's next write.

On real servers: threads get their own replies, also while the main thread is interrupted
(``KeyboardInterrupt``) at random points of its calls, hundreds of times; commands go out
in fewer writes than calls; a hung server fails the calls within their deadline and a
new connection serves the next ones; a restart is reconnected and scripts reload; a
forked child opens its own connections and leaves the parent's alone. Every module
that drives the data path also runs on it (``pytest --pipelining=on``, in CI), on one
node, a cluster and a Sentinel group."""

from __future__ import annotations

import multiprocessing
import random
import signal
import threading
import time
from collections.abc import Callable

import pytest

from crmcache._mux_sync import MuxNodeTransport, MuxPool
from crmcache._sync.manager import CRMCacheManager
from crmcache.testing import RedisServer
from helpers import poll, prefs

pytestmark = pytest.mark.sync_only  # threads and signals: the sync facade's own machinery

KEYS = 100


def mux_of(cache: CRMCacheManager) -> MuxPool:
    transport = cache._transport
    assert isinstance(transport, MuxNodeTransport)
    return transport


def seeded(cache: CRMCacheManager) -> None:
    for i in range(KEYS):
        assert cache.set_template(f"t{i}", "email", f"v{i}") is True
        assert cache.set_client_preferences(prefs(i + 1, client_id=f"c{i}")) is True


def one_call(cache: CRMCacheManager, n: int) -> None:
    """A read or a rate-limit check whose answer says whose reply it was."""
    kind = n % 3
    if kind == 0:
        assert cache.get_template(f"t{n % KEYS}", "email") == f"v{n % KEYS}"
    elif kind == 1:
        got = cache.get_client_preferences(f"c{n % KEYS}")
        assert got is not None
        assert got.client_id == f"c{n % KEYS}"
    else:
        result = cache.check_rate_limit(f"api-{n % 7}", 10**9, 60)
        assert result.allowed
        assert not result.degraded


def run_threads(work: Callable[[int], None], threads: int) -> list[BaseException]:
    errors: list[BaseException] = []

    def body(index: int) -> None:
        try:
            work(index)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=body, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    return errors


def test_it_is_opt_in(own_server: RedisServer, pytestconfig: pytest.Config) -> None:
    if pytestconfig.getoption("--pipelining") == "default":  # --pipelining=on flips it
        with CRMCacheManager(redis_url=own_server.url) as pooled:
            assert not isinstance(pooled._transport, MuxPool)
    with CRMCacheManager(redis_url=own_server.url, pipelining=False) as pooled:
        assert not isinstance(pooled._transport, MuxPool)
    with CRMCacheManager(
        redis_url=own_server.url, pipelining=True, pipeline_connections=3
    ) as cache:
        seeded(cache)
        errors = run_threads(lambda t: [one_call(cache, t * 1000 + i) for i in range(50)], 8)
        assert errors == []
        assert mux_of(cache).accounting().created == 3


def test_threads_get_their_own_replies_in_fewer_writes(own_server: RedisServer) -> None:
    with CRMCacheManager(redis_url=own_server.url, pipelining=True) as cache:
        seeded(cache)
        mux = mux_of(cache)
        commands, writes = mux.commands, mux.writes
        errors = run_threads(lambda t: [one_call(cache, t * 7919 + i) for i in range(400)], 16)
        assert errors == []
        sent = mux.commands - commands
        assert sent >= 16 * 400
        # Threads that queued while another was writing went out in its next write.
        assert mux.writes - writes < sent, (mux.writes - writes, sent)
        stats = cache.get_stats()
        assert stats.counters["redis_errors"] == 0
        assert stats.counters["protocol_errors"] == 0
        assert mux.discarded == 0


# An interrupt that lands in a garbage-collector callback (Hypothesis installs one when a
# module of the session imports it) is swallowed by Python as "unraisable": that call just
# goes on uninterrupted, which the test allows.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("seed", [21, 22])
def test_interrupted_calls_never_get_or_leave_a_wrong_reply(
    own_server: RedisServer, interrupt_after: Callable[[float], None], seed: int
) -> None:
    """The main thread's calls are interrupted at random points (queueing, writing,
    waiting, decoding) while worker threads call on the same shared connections: every
    call that completes, in any thread, got its own key's value (what CVE-2023-28858/28859
    broke for asyncio), and the connections serve the next calls."""
    rng = random.Random(seed)
    with CRMCacheManager(redis_url=own_server.url, pipelining=True) as cache:
        seeded(cache)
        stop = threading.Event()
        wrong: list[BaseException] = []

        def worker(index: int) -> None:
            n = index
            while not stop.is_set():
                n += 13
                try:
                    one_call(cache, n)
                except AssertionError as exc:
                    wrong.append(exc)
                    return

        workers = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for thread in workers:
            thread.start()
        interrupted = completed = 0
        try:
            for _ in range(1500):
                n = rng.randrange(1_000_000)
                try:
                    interrupt_after(rng.uniform(0.00005, 0.002))
                    one_call(cache, n)
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    completed += 1
                except KeyboardInterrupt:
                    interrupted += 1
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            stop.set()
            for thread in workers:
                thread.join(30)
        assert wrong == []
        assert interrupted > 100, interrupted
        assert completed > 100, completed
        mux = mux_of(cache)
        poll(lambda: mux.accounting().slots_held == 0, what="nothing in flight")
        counters = cache.get_stats().counters
        assert counters["protocol_errors"] == 0
        assert counters["reads_failed"] == 0
        # An interrupt never cuts a write or a queueing in half (the main thread hands its
        # commands to a writer thread), so no shared connection had to be closed.
        assert mux.discarded == 0
        for i in range(KEYS):
            assert cache.get_template(f"t{i}", "email") == f"v{i}"
        assert cache.health_check() is True


def test_a_hung_server_fails_calls_within_the_deadline_then_recovers(
    own_server: RedisServer,
) -> None:
    with CRMCacheManager(
        redis_url=own_server.url,
        pipelining=True,
        socket_timeout=0.3,
        socket_connect_timeout=0.3,
    ) as cache:
        seeded(cache)
        results: list[object] = []
        own_server.pause_process()
        try:
            started = time.monotonic()
            errors = run_threads(
                lambda t: results.append(cache.get_template(f"t{t}", "email")), 12
            )
            waited = time.monotonic() - started
        finally:
            own_server.resume_process()
        assert errors == []  # misses, never an exception
        assert results == [None] * 12
        assert waited < 5.0  # bounded by the deadline, not stuck (generous: shared box)
        assert cache.get_stats().counters["reads_failed"] == 12
        assert mux_of(cache).discarded >= 1
        # The breaker opened; its probe, a second later, finds Redis back.
        poll(lambda: cache.get_template("t1", "email") == "v1", timeout=10, what="recovered")
        assert cache.get_template("t2", "email") == "v2"


def test_a_restarted_redis_is_reconnected_without_a_failed_call(own_server: RedisServer) -> None:
    with CRMCacheManager(redis_url=own_server.url, pipelining=True) as cache:
        assert cache.set_template("a", "email", "x") is True
        own_server.restart()
        # The server came back empty: a miss, then a write and a hit, none failed.
        assert cache.get_template("a", "email") is None
        assert cache.set_template("a", "email", "y") is True
        assert cache.get_template("a", "email") == "y"
        # Scripts were flushed with the restart: reloaded on NOSCRIPT.
        result = cache.check_rate_limit("sms", 5, 60)
        assert result.allowed
        assert not result.degraded
        assert cache.get_stats().counters["redis_errors"] == 0


def _child(cache: CRMCacheManager, out: multiprocessing.Queue[object]) -> None:
    out.put([cache.get_template(f"t{i}", "email") for i in range(10)])
    out.put(mux_of(cache).accounting().created)


def test_a_forked_child_opens_its_own_connections(own_server: RedisServer) -> None:
    with CRMCacheManager(
        redis_url=own_server.url, pipelining=True, pipeline_connections=2
    ) as cache:
        seeded(cache)
        mux = mux_of(cache)
        assert mux.accounting().created == 2
        context = multiprocessing.get_context("fork")
        out: multiprocessing.Queue[object] = context.Queue()
        child = context.Process(target=_child, args=(cache, out))
        child.start()
        assert out.get(timeout=30) == [f"v{i}" for i in range(10)]
        assert out.get(timeout=30) == 2  # its own, opened for its calls
        child.join(30)
        assert child.exitcode == 0
        # The parent's connections were neither used nor closed by the child.
        assert mux.discarded == 0
        assert [cache.get_template(f"t{i}", "email") for i in range(10)] == [
            f"v{i}" for i in range(10)
        ]
        assert mux.accounting().created == 2
