"""Fault matrix: a mixed, multi-threaded workload before, during and after real faults.

Each fault runs against a dedicated ``redis-server`` (``own_server``) and a manager with
short timeouts. For every call of the workload the test records whether it raised (it
never may), how long it took (every call must return within the bound stated for the
fault) and what it returned; after the fault ends it polls until service is back (a
set+get round trip succeeds and ``check_rate_limit`` is not degraded) and requires that
to happen within ``RECOVERY_BOUND``. Run with ``-s`` to see the measured worst cases.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

import pytest
import redis

import helpers
from crmcache import BreakerState, ClientPreferences, CRMCacheManager
from crmcache._stats import Counter
from crmcache.testing import RedisServer

SOCKET_TIMEOUT = 0.5
CONNECT_TIMEOUT = 0.5
POOL_TIMEOUT = 0.5
#: Scheduling slack on a noisy 2-core machine (GC, 36 runnable threads, the server itself).
MARGIN = 1.5
#: How long a fault the test ends by hand is held at least, in seconds.
FAULT_HOLD = 1.5
#: Service must be back this long after the fault ended (the breaker's probe backs off
#: 1 s, 2 s, 4 s ... while the fault lasts).
RECOVERY_BOUND = 10.0
#: Deadline for any condition the test polls for.
DEADLINE = 20.0
THREADS = 4
#: WARNING+ lines one fault may log: first failure, breaker opened, recovered, the test's
#: own "Low cache hit rate", and up to THREADS - 1 false recoveries (up to three lines
#: each: recovered, failing, breaker opened) when calls answered just before a SIGKILL
#: report success after another thread's failure (the guard counts such a late success as
#: a recovery).
MAX_LOG_LINES = 4 + 3 * (THREADS - 1)
#: Calls each workload thread makes in a phase before the test moves on.
MIN_CALLS = 25
#: Keys (templates, clients) each workload thread owns.
KEYS = 3
ZONES = ("UTC", "Europe/Paris", "America/New_York", "Asia/Tokyo", "Australia/Sydney")
#: Seconds a workload thread pauses after a call that degraded in less than that.
PACE = 0.002
#: A limit no workload reaches: a refused check would be a bug, not a limit.
HUGE_LIMIT = 10**9

READ_OPS = ("get_prefs", "get_template", "get_templates", "rate_limit")
ALL_OPS = (*READ_OPS, "set_prefs", "set_template")


#: Polls in this module wait up to DEADLINE, checking every 20 ms.
poll = partial(helpers.poll, timeout=DEADLINE, interval=0.02)


def template_name(owner: int, k: int) -> str:
    """A template owned by workload thread ``owner``."""
    return f"t{owner}-{k}"


def template_text(name: str) -> str:
    """The only content a template is ever written with."""
    return f"<p>{name}</p>"


def client_id(owner: int, k: int) -> str:
    """A client owned by workload thread ``owner``."""
    return f"w{owner}-{k}"


def prefs_at(cid: str, version: int) -> ClientPreferences:
    """The preferences written at ``version``: the timezone is a function of it."""
    return ClientPreferences(client_id=cid, version=version, timezone=ZONES[version % 5])


@dataclass(slots=True)
class Call:
    """One recorded call of the workload."""

    thread: int
    op: str
    phase: str
    start: float
    end: float
    degraded: bool  # a read missed, a write returned False, a rate limit was degraded
    wrong: str | None = None  # a result that can never be right
    error: str | None = None  # the call raised

    @property
    def duration(self) -> float:
        """Seconds the call took."""
        return self.end - self.start


class Workload:
    """Threads calling every kind of cache operation in a loop, recording each call.

    Thread ``i`` owns templates ``t<i>-*``, clients ``w<i>-*`` and API ``api-<i>``: it is
    the only writer of them, so every read can be checked exactly (templates have one
    possible content; a preference's timezone follows from its version, and no version
    above the highest one written can ever be read).
    """

    def __init__(self, cache: CRMCacheManager, threads: int = THREADS) -> None:
        self.cache = cache
        self.phase = "before"
        self._stop = threading.Event()
        #: Set when a call made during the fault degraded: the workload felt it.
        self.felt = threading.Event()
        self._owners = threads
        self._lists: list[list[Call]] = []
        self._threads: list[threading.Thread] = []
        self.attempted: dict[str, int] = {}
        self.prepopulate()
        for i in range(threads):
            self._spawn(i, i, ALL_OPS, None, None)

    def prepopulate(self) -> None:
        """Write every key the workload reads, so a read that misses means a failure."""
        for owner in range(self._owners):
            for k in range(KEYS):
                name = template_name(owner, k)
                assert self.cache.set_template(name, "email", template_text(name))
                cid = client_id(owner, k)
                self.attempted[cid] = 1
                assert self.cache.set_client_preferences(prefs_at(cid, 1))

    def _spawn(
        self,
        index: int,
        owner: int,
        ops: tuple[str, ...],
        calls: int | None,
        barrier: threading.Barrier | None,
    ) -> threading.Thread:
        record: list[Call] = []
        self._lists.append(record)
        thread = threading.Thread(
            target=self._run,
            args=(index, owner),
            kwargs={"ops": ops, "calls": calls, "barrier": barrier, "record": record},
            name=f"workload-{index}",
            daemon=True,
        )
        self._threads.append(thread)
        return thread

    def start(self) -> None:
        """Start the looping threads."""
        for thread in self._threads:
            thread.start()

    def burst(self, threads: int, calls: int) -> list[threading.Thread]:
        """Start ``threads`` more threads that each make ``calls`` read calls at once."""
        barrier = threading.Barrier(threads)
        first = len(self._threads)
        burst = [
            self._spawn(first + j, j % self._owners, READ_OPS, calls, barrier)
            for j in range(threads)
        ]
        for thread in burst:
            thread.start()
        return burst

    def stop(self) -> None:
        """Stop every thread and wait for it."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=DEADLINE)
            assert not thread.is_alive(), f"{thread.name} did not stop"

    @property
    def calls(self) -> list[Call]:
        """Every call recorded so far."""
        return [call for record in self._lists for call in record]

    def _trailing(self, keep: Callable[[Call], bool]) -> int:
        """Fewest trailing calls matching ``keep`` of any looping thread (calls are
        recorded in time order, so the phase or start time of interest is at the end)."""
        counts = []
        for record in self._lists[: self._owners]:
            n = 0
            for i in range(len(record) - 1, -1, -1):  # no copy: threads keep appending
                if not keep(record[i]):
                    break
                n += 1
            counts.append(n)
        return min(counts)

    def progress(self, phase: str) -> int:
        """Fewest calls any looping thread has made in ``phase`` (the current one)."""
        return self._trailing(lambda call: call.phase == phase)

    def calls_since(self, since: float) -> int:
        """Fewest calls any looping thread has started at or after ``since``."""
        return self._trailing(lambda call: call.start >= since)

    def wait_calls_since(self, since: float, n: int = MIN_CALLS) -> None:
        """Poll until every looping thread has started ``n`` calls since ``since``."""
        poll(lambda: self.calls_since(since) >= n, what=f"{n} calls per thread")

    def wait_progress(self, phase: str, n: int = MIN_CALLS) -> None:
        """Poll until every looping thread has made ``n`` calls in ``phase``."""
        poll(lambda: self.progress(phase) >= n, what=f"{n} calls per thread in {phase}")

    def _run(
        self,
        index: int,
        owner: int,
        *,
        ops: tuple[str, ...],
        calls: int | None,
        barrier: threading.Barrier | None,
        record: list[Call],
    ) -> None:
        rng = random.Random(index)
        if barrier is not None:
            barrier.wait(timeout=DEADLINE)
        made = 0
        while not self._stop.is_set() and (calls is None or made < calls):
            op = rng.choice(ops)
            k = rng.randrange(KEYS)
            phase = self.phase
            start = time.monotonic()
            wrong = error = None
            try:
                degraded, wrong = getattr(self, f"_op_{op}")(owner, k)
            except Exception as exc:
                degraded, error = True, f"{type(exc).__name__}: {exc}"
            end = time.monotonic()
            record.append(Call(index, op, phase, start, end, degraded, wrong, error))
            if degraded and phase == "during":
                self.felt.set()
            if degraded and end - start < PACE:
                # Pacing, not synchronisation: a short-circuited call returns in
                # microseconds, and a spinning loop would starve the server and the
                # test's own control of the 2 cores.
                self._stop.wait(PACE)
            made += 1

    # -- the operations: each returns (degraded, wrong) -----------------------------------

    def _op_get_prefs(self, owner: int, k: int) -> tuple[bool, str | None]:
        cid = client_id(owner, k)
        got = self.cache.get_client_preferences(cid)
        if got is None:
            return True, None
        if (
            got.client_id != cid
            or got.version > self.attempted[cid]
            or got != prefs_at(cid, got.version)
        ):
            return False, f"read {got!r}, highest version written {self.attempted[cid]}"
        return False, None

    def _op_set_prefs(self, owner: int, k: int) -> tuple[bool, str | None]:
        cid = client_id(owner, k)
        version = self.attempted[cid] + 1
        self.attempted[cid] = version  # before the call: Redis may apply it and time out
        return not self.cache.set_client_preferences(prefs_at(cid, version)), None

    def _op_get_template(self, owner: int, k: int) -> tuple[bool, str | None]:
        name = template_name(owner, k)
        got = self.cache.get_template(name, "email")
        if got is None:
            return True, None
        return False, None if got == template_text(name) else f"{name} read {got!r}"

    def _op_get_templates(self, owner: int, k: int) -> tuple[bool, str | None]:
        refs = [(template_name(owner, j), "email") for j in range(KEYS)]
        got = self.cache.get_templates(refs)
        if list(got) != refs:
            return False, f"get_templates answered for {list(got)}, asked {refs}"
        for (name, _), text in got.items():
            if text is not None and text != template_text(name):
                return False, f"{name} read {text!r}"
        return any(text is None for text in got.values()), None

    def _op_set_template(self, owner: int, k: int) -> tuple[bool, str | None]:
        name = template_name(owner, k)
        return not self.cache.set_template(name, "email", template_text(name)), None

    def _op_rate_limit(self, owner: int, k: int) -> tuple[bool, str | None]:
        result = self.cache.check_rate_limit(f"api-{owner}", HUGE_LIMIT, 60)
        if not result.allowed:
            return result.degraded, f"refused under a limit of {HUGE_LIMIT}: {result!r}"
        return result.degraded, None


@dataclass
class Ctx:
    """What a fault acts on."""

    server: RedisServer
    admin: redis.Redis
    cache: CRMCacheManager
    workload: Workload
    saved: dict[str, object] = field(default_factory=dict)
    #: When the fault stopped acting (set just before undoing it); None: when end() returned.
    off: float | None = None

    def undoing(self) -> None:
        """Note that the fault is about to be undone."""
        self.off = time.monotonic()


def hold(ctx: Ctx, since: float) -> None:
    """Keep a fault on for FAULT_HOLD seconds and until the workload has felt it."""
    poll(
        lambda: time.monotonic() - since >= FAULT_HOLD and ctx.workload.felt.is_set(),
        what="the workload to feel the fault",
    )


# -- the faults: begin() puts the fault in place, end() waits for or undoes its end --------


def kill_begin(ctx: Ctx) -> None:
    """SIGKILL the server (it comes back on the same port in kill_end)."""
    ctx.server.kill()


def kill_end(ctx: Ctx, since: float) -> None:
    """Hold, then restart the server on its port."""
    hold(ctx, since)
    ctx.undoing()
    ctx.server.restart()


def pause_begin(ctx: Ctx) -> None:
    """CLIENT PAUSE 1500 ALL: Redis stops serving every client for 1.5 s."""
    ctx.admin.execute_command("CLIENT", "PAUSE", "1500", "ALL")


def pause_end(ctx: Ctx, since: float) -> None:
    """The admin client's PING is paused too: it returns when the pause is over."""
    assert ctx.admin.ping()


def debug_sleep_begin(ctx: Ctx) -> None:
    """DEBUG SLEEP 1.5 from a background thread: the single-threaded server blocks."""
    errors: list[BaseException] = []

    def sleep() -> None:
        try:
            ctx.admin.execute_command("DEBUG", "SLEEP", "1.5")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=sleep, name="debug-sleep", daemon=True)
    thread.start()
    ctx.saved["sleeper"] = (thread, errors)


def debug_sleep_end(ctx: Ctx, since: float) -> None:
    """The sleeper's DEBUG SLEEP returns when the server wakes up."""
    thread, errors = ctx.saved["sleeper"]  # type: ignore[misc]
    thread.join(timeout=DEADLINE)
    assert not thread.is_alive()
    assert not errors, errors


def sigstop_begin(ctx: Ctx) -> None:
    """SIGSTOP: the process is frozen; the kernel still accepts connections for it."""
    ctx.server.pause_process()


def sigstop_end(ctx: Ctx, since: float) -> None:
    """Hold, then SIGCONT."""
    try:
        hold(ctx, since)
    finally:
        ctx.undoing()
        ctx.server.resume_process()


def flush_begin(ctx: Ctx) -> None:
    """SCRIPT FLUSH while scripted calls are running."""
    ctx.admin.script_flush()


def flush_end(ctx: Ctx, since: float) -> None:
    """Two more flushes, each after every thread made progress with the scripts gone."""
    for _ in range(2):
        ctx.workload.wait_calls_since(since, 10)
        since = time.monotonic()
        ctx.admin.script_flush()
    ctx.workload.wait_calls_since(since, 10)


def maxclients_begin(ctx: Ctx) -> None:
    """Drop every client but the admin and cap maxclients at the count left, atomically:
    the manager's reconnects are refused ("max number of clients reached")."""
    ctx.saved["maxclients"] = ctx.admin.config_get("maxclients")["maxclients"]
    pipe = ctx.admin.pipeline(transaction=True)
    pipe.client_kill_filter(_type="normal", skipme=True)
    pipe.config_set("maxclients", 1)
    pipe.execute()
    assert ctx.admin.info("clients")["connected_clients"] == 1


def maxclients_end(ctx: Ctx, since: float) -> None:
    """Hold, then restore maxclients."""
    try:
        hold(ctx, since)
    finally:
        ctx.undoing()
        ctx.admin.config_set("maxclients", ctx.saved["maxclients"])


def oom_begin(ctx: Ctx) -> None:
    """maxmemory 1 with noeviction: every write is refused with OOM."""
    ctx.saved.update(ctx.admin.config_get("maxmemory*"))
    ctx.admin.config_set("maxmemory-policy", "noeviction")
    ctx.admin.config_set("maxmemory", 1)


def oom_end(ctx: Ctx, since: float) -> None:
    """Hold until every thread made progress, then restore the memory settings."""
    try:
        ctx.workload.wait_calls_since(since)
    finally:
        ctx.undoing()
        ctx.admin.config_set("maxmemory", ctx.saved["maxmemory"])
        ctx.admin.config_set("maxmemory-policy", ctx.saved["maxmemory-policy"])


def pool_begin(ctx: Ctx) -> None:
    """32 more threads read at once through the 10-connection pool."""
    ctx.saved["burst"] = ctx.workload.burst(32, 40)


def pool_end(ctx: Ctx, since: float) -> None:
    """The burst is over when its threads are."""
    for thread in ctx.saved["burst"]:  # type: ignore[attr-defined]
        thread.join(timeout=DEADLINE * 3)
        assert not thread.is_alive()


@dataclass(frozen=True)
class Fault:
    """One row of the matrix and what it must and must not do."""

    name: str
    begin: Callable[[Ctx], None]
    end: Callable[[Ctx, float], None]
    #: Most seconds any call may take, and why.
    bound: float
    why: str
    #: Redis errors are expected (an outage) / the breaker must have opened.
    outage: bool
    trips: bool
    #: No call may degrade at all (the fault must be absorbed, not merely survived).
    absorbed: bool = False
    needs_debug: bool = False
    #: The data is gone afterwards (a restart without persistence): reads may miss.
    loses_data: bool = False


FAULTS = [
    Fault(
        "sigkill+restart",
        kill_begin,
        kill_end,
        POOL_TIMEOUT + CONNECT_TIMEOUT + MARGIN,
        "refused connects fail at once; a call may wait for a pooled connection and for "
        "one connect to a server coming back",
        outage=True,
        trips=True,
        loses_data=True,
    ),
    Fault(
        "client-pause-1500",
        pause_begin,
        pause_end,
        POOL_TIMEOUT + SOCKET_TIMEOUT + MARGIN,
        "one read timeout (a timeout is never retried) after a pool wait",
        outage=True,
        trips=True,
    ),
    Fault(
        "debug-sleep-1.5",
        debug_sleep_begin,
        debug_sleep_end,
        POOL_TIMEOUT + SOCKET_TIMEOUT + MARGIN,
        "one read timeout (a timeout is never retried) after a pool wait",
        outage=True,
        trips=True,
        needs_debug=True,
    ),
    Fault(
        "sigstop-1.5s",
        sigstop_begin,
        sigstop_end,
        POOL_TIMEOUT + SOCKET_TIMEOUT + MARGIN,
        "the kernel accepts connections, so even a new connection costs one read timeout",
        outage=True,
        trips=True,
    ),
    Fault(
        "script-flush",
        flush_begin,
        flush_end,
        MARGIN,
        "NOSCRIPT costs two more round trips (SCRIPT LOAD, EVALSHA), no waiting",
        outage=False,
        trips=False,
        absorbed=True,
    ),
    Fault(
        "maxclients",
        maxclients_begin,
        maxclients_end,
        POOL_TIMEOUT + MARGIN,
        "a refused connection is answered at once; only a pool wait remains",
        outage=True,
        trips=True,
    ),
    Fault(
        "oom-noeviction",
        oom_begin,
        oom_end,
        MARGIN,
        "an OOM refusal is an immediate reply",
        outage=True,
        trips=False,
    ),
    Fault(
        "pool-exhausted",
        pool_begin,
        pool_end,
        POOL_TIMEOUT + MARGIN,
        "a caller waits for a connection at most pool_timeout, then the round trip",
        outage=False,
        trips=False,
        absorbed=True,
    ),
]


def debug_allowed(url: str) -> bool:
    """True if the server at ``url`` runs DEBUG (redis 7 refuses it by default)."""
    client = redis.Redis.from_url(url)
    try:
        client.execute_command("DEBUG", "SLEEP", "0")
    except redis.ResponseError:
        return False
    else:
        return True
    finally:
        client.close()


def healthy(cache: CRMCacheManager) -> bool:
    """A set+get round trip succeeds and a rate-limit check is not degraded."""
    token = f"probe-{time.monotonic_ns()}"
    return (
        cache.set_template("probe", "sms", token)
        and cache.get_template("probe", "sms") == token
        and not cache.check_rate_limit("probe", HUGE_LIMIT, 60).degraded
    )


def describe(calls: list[Call]) -> str:
    """The first few of ``calls``, for an assertion message."""
    return "; ".join(
        f"{c.op}@{c.phase} {c.duration:.3f}s "
        f"{c.error or c.wrong or ('degraded' if c.degraded else 'served')}"
        for c in calls[:5]
    )


def report(fault: Fault, calls: list[Call], recovery: float, stats: dict[str, object]) -> None:
    """Print the measured worst cases (run with -s; docs/guides/failure-behaviour.md has them)."""
    worst = {
        phase: max((c.duration for c in calls if c.phase == phase), default=0.0)
        for phase in ("before", "during", "ending", "recovered")
    }
    degraded = sum(c.degraded for c in calls)
    phases = " ".join(f"{p}={w * 1000:.0f}ms" for p, w in worst.items())
    print(
        f"\n[fault {fault.name}] worst call {max(worst.values()) * 1000:.0f} ms "
        f"(bound {fault.bound:.1f} s: {fault.why}); {phases}; recovered "
        f"{recovery:.2f} s after the fault ended; calls {len(calls)}, degraded {degraded}; "
        f"redis_errors {stats['redis_errors']}, breaker trips {stats['trips']}, "
        f"{stats['log_lines']} log lines"
    )


@pytest.fixture
def admin_for() -> Iterator[Callable[[str], redis.Redis]]:
    """Makes one-connection admin clients (MULTI, CLIENT KILL SKIPME need one socket)."""
    clients: list[redis.Redis] = []

    def make(url: str) -> redis.Redis:
        client = redis.Redis.from_url(url, max_connections=1, socket_timeout=DEADLINE)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


#: Faults that take over ~2 s (a held outage and the breaker's probe back-off) are slow.
SLOW = {"sigkill+restart", "client-pause-1500", "debug-sleep-1.5", "sigstop-1.5s", "maxclients"}


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(f, id=f.name, marks=[pytest.mark.slow] if f.name in SLOW else [])
        for f in FAULTS
    ],
)
def test_fault_matrix(
    fault: Fault,
    own_server: RedisServer,
    admin_for: Callable[[str], redis.Redis],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Under the fault no call raises, every call is bounded, and service recovers."""
    caplog.set_level(logging.WARNING, logger="crmcache")  # DEBUG would log every call
    with contextlib.ExitStack() as stack:
        server = own_server
        if fault.needs_debug and not debug_allowed(own_server.url):
            server = stack.enter_context(RedisServer(extra_args=["--enable-debug-command", "yes"]))
        cache = stack.enter_context(
            CRMCacheManager(
                redis_url=server.url,
                socket_timeout=SOCKET_TIMEOUT,
                socket_connect_timeout=CONNECT_TIMEOUT,
                pool_timeout=POOL_TIMEOUT,
                max_connections=10,
                # Saturation is the lean pool's (shared connections have no slots to run
                # out of); every other fault runs on the facade's default data path.
                pipelining=False if fault.name == "pool-exhausted" else None,
            )
        )
        workload = Workload(cache)
        ctx = Ctx(server, admin_for(server.url), cache, workload)
        workload.start()
        try:
            workload.wait_progress("before")
            fault_start = time.monotonic()
            workload.phase = "during"
            fault.begin(ctx)
            fault_on = time.monotonic()
            fault.end(ctx, fault_on)
            fault_off = ctx.off or time.monotonic()
            workload.phase = "ending"
            recovery = poll(
                lambda: healthy(cache), timeout=RECOVERY_BOUND, what="service to recover"
            )
            workload.phase = "recovered"
            workload.wait_progress("recovered")
        finally:
            workload.stop()
        calls = workload.calls
        stats = cache.get_stats()
        counters, breaker = stats.counters, stats.circuit_breaker
        lines = [r.getMessage() for r in caplog.records if r.name == "crmcache"]
        report(fault, calls, recovery, {**counters, **breaker, "log_lines": len(lines)})

        # 1. No call ever raised, and no call returned something that cannot be right.
        assert not [c for c in calls if c.error], describe([c for c in calls if c.error])
        assert not [c for c in calls if c.wrong], describe([c for c in calls if c.wrong])
        # 2. Every call returned within the bound of this fault.
        slow = sorted((c for c in calls if c.duration > fault.bound), key=lambda c: -c.duration)
        assert not slow, f"{len(slow)} calls over {fault.bound} s: {describe(slow)}"
        # 3. Service came back (polled above) and stays back: nothing started after the
        # recovery degraded, and nothing that ended before the fault began did.
        bad = [c for c in calls if c.end < fault_start and c.degraded]
        assert not bad, f"before the fault: {describe(bad)}"
        bad = [
            c
            for c in calls
            if c.phase == "recovered"
            and c.degraded
            and not (fault.loses_data and c.op in ("get_prefs", "get_template", "get_templates"))
        ]
        assert not bad, f"after recovery: {describe(bad)}"
        assert breaker["state"] == BreakerState.CLOSED.value
        # 4. Throttled logging: a handful of lines per fault, never one per call.
        assert len(lines) <= MAX_LOG_LINES, "\n".join(lines)

        inside = [c for c in calls if c.start >= fault_on and c.end <= fault_off]
        if fault.absorbed:
            bad = [c for c in calls if c.degraded]
            assert not bad, f"the fault was not absorbed: {describe(bad)}"
            assert counters["reads_failed"] == 0
        else:
            # The fault was real: the workload felt it.
            assert any(c.degraded for c in calls if c.phase == "during")
        if fault.outage:
            assert counters["redis_errors"] > 0
        else:
            assert counters["redis_errors"] == 0
        if fault.trips:
            assert breaker["trips"] >= 1
            assert breaker["recoveries"] >= 1
        else:
            assert breaker["trips"] == 0
        if fault.name == "oom-noeviction":
            # Reads keep being served from memory; every write is refused (False) and a
            # rate-limit check follows the policy (degraded) rather than count.
            reads = [c for c in inside if c.op in ("get_prefs", "get_template", "get_templates")]
            writes = [c for c in inside if c.op in ("set_prefs", "set_template", "rate_limit")]
            assert reads, "no read ran inside the OOM window"
            assert writes, "no write ran inside the OOM window"
            assert not [c for c in reads if c.degraded], describe([c for c in reads if c.degraded])
            assert all(c.degraded for c in writes), describe([c for c in writes if not c.degraded])
            assert counters["writes_failed"] > 0
        if fault.name == "pool-exhausted":
            # Saturated: every connection was opened, none beyond the pool's size.
            assert stats.connection_pool.created == 10
            burst = [c for c in calls if c.thread >= THREADS]
            assert len(burst) == 32 * 40
            assert all(c.op in READ_OPS for c in burst)


# -- focused regressions: what the matrix found about OOM and the breaker -------------------
# Each of these failed against an earlier src (rate_limit.lua reset an exhausted counter
# under OOM; is_critical() logged OOM in a script at ERROR; every OOM refusal logged two
# lines; a refused half-open probe left the breaker half-open for good).


@pytest.fixture
def fragile(own_server: RedisServer) -> Iterator[CRMCacheManager]:
    """A manager with the matrix's short timeouts on the test's own server."""
    with CRMCacheManager(
        redis_url=own_server.url,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=CONNECT_TIMEOUT,
        pool_timeout=POOL_TIMEOUT,
    ) as manager:
        yield manager


@contextlib.contextmanager
def out_of_memory(admin: redis.Redis) -> Iterator[None]:
    """maxmemory 1 with noeviction for the duration of the block."""
    saved = admin.config_get("maxmemory*")
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)
    try:
        yield
    finally:
        admin.config_set("maxmemory", saved["maxmemory"])
        admin.config_set("maxmemory-policy", saved["maxmemory-policy"])


def test_oom_keeps_an_exhausted_rate_limit(
    own_server: RedisServer, fragile: CRMCacheManager, admin_for: Callable[[str], redis.Redis]
) -> None:
    """Under OOM an exhausted limit is never silently reset: calls degrade or are refused."""
    admin = admin_for(own_server.url)
    for _ in range(5):
        assert fragile.check_rate_limit("api", 5, 60).allowed
    assert not fragile.check_rate_limit("api", 5, 60).allowed
    with out_of_memory(admin):
        results = [fragile.check_rate_limit("api", 5, 60) for _ in range(5)]
    assert admin.get("crm:ratelimit:api:60") == b"5"
    assert not [r for r in results if r.allowed and not r.degraded], results


def test_oom_in_a_script_is_not_an_error_log(
    own_server: RedisServer,
    fragile: CRMCacheManager,
    admin_for: Callable[[str], redis.Redis],
    crm_logs: pytest.LogCaptureFixture,
) -> None:
    """OOM is a WARNING (docs/guides/failure-behaviour.md) for scripted writes too."""
    with out_of_memory(admin_for(own_server.url)):
        assert fragile.set_client_preferences(ClientPreferences(client_id="c")) is False
        assert fragile.invalidate_client_preferences("c", version=3) is False
    errors = [r.getMessage() for r in crm_logs.records if r.levelno >= logging.ERROR]
    assert not errors, errors


def test_oom_refusals_do_not_flood_the_log(
    own_server: RedisServer,
    fragile: CRMCacheManager,
    admin_for: Callable[[str], redis.Redis],
    crm_logs: pytest.LogCaptureFixture,
) -> None:
    """Refused writes between served reads log a bounded number of lines, not one per call."""
    assert fragile.set_template("kept", "email", "x")
    with out_of_memory(admin_for(own_server.url)):
        for _ in range(100):
            assert fragile.set_template("new", "email", "y") is False
            assert fragile.get_template("kept", "email") == "x"
    lines = [r.getMessage() for r in crm_logs.records if r.levelno >= logging.WARNING]
    assert len(lines) < 10, lines[:6]


def test_breaker_recovers_after_a_refused_probe(
    own_server: RedisServer, fragile: CRMCacheManager, admin_for: Callable[[str], redis.Redis]
) -> None:
    """Down, then back but out of memory, then healthy: the cache comes back in service."""
    assert fragile.set_template("t", "email", "x")
    own_server.kill()
    poll(
        lambda: (
            fragile.get_template("t", "email") is None
            and fragile._breaker.state is BreakerState.OPEN
        ),
        what="the breaker to open",
    )
    errors = fragile._stats.counters()[Counter.REDIS_ERRORS]
    own_server.restart()  # no call is made meanwhile: the breaker waits for its probe
    admin = admin_for(own_server.url)
    with out_of_memory(admin):
        # The first write after the reset timeout is the probe; OOM refuses it.
        poll(
            lambda: (
                not fragile.set_template("t", "email", "y")
                and fragile._stats.counters()[Counter.REDIS_ERRORS] > errors
            ),
            what="the probe",
        )
    recovery = poll(lambda: healthy(fragile), timeout=RECOVERY_BOUND, what="service to recover")
    assert recovery < RECOVERY_BOUND
