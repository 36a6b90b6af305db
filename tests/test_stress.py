"""Stress: exact rate limits across processes, and a seeded randomized race of preference
reads, saves, invalidations and slow readers through the repository on a real database.

The randomized test records every committed version (after the save returned) in a ledger;
a read that returns a version older than the one committed before the read began is a
stale read, and a slow reader's old row accepted by the cache after a newer version was
committed is a stale write. Both must never happen, and at the end the cache must agree
with the database for every client.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import pytest
import redis

from crmcache import ClientPreferences, CRMCacheManager, StaleVersionError
from crmcache.repository import CommunicationRepository
from crmcache.store import SQLPreferenceStore

#: Deadline for subprocesses and for anything polled.
DEADLINE = 120.0

# -- rate limits across processes ------------------------------------------------------------

RATE_WORKER = textwrap.dedent(
    """
    import sys, threading, time
    import redis
    from crmcache import CRMCacheManager

    url, threads, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    totals = {"allowed": 0, "refused": 0, "degraded": 0}
    lock = threading.Lock()
    with CRMCacheManager(redis_url=url, max_connections=threads) as cache:
        assert not cache.check_rate_limit("warm-up", 10, 60).degraded  # imported, connected
        go = redis.Redis.from_url(url)
        go.incr("ready")
        deadline = time.monotonic() + 60
        while not go.exists("go"):  # all processes start together
            if time.monotonic() > deadline:
                sys.exit("never told to go")
            time.sleep(0.002)
        go.close()
        barrier = threading.Barrier(threads)

        def work():
            mine = dict.fromkeys(totals, 0)
            barrier.wait(timeout=60)
            for _ in range(calls):
                result = cache.check_rate_limit("shared", 1000, 3600)
                mine["allowed" if result.allowed else "refused"] += 1
                mine["degraded"] += result.degraded
            with lock:
                for name, n in mine.items():
                    totals[name] += n

        workers = [threading.Thread(target=work) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    print(totals["allowed"], totals["refused"], totals["degraded"])
    """
)


@pytest.mark.slow
def test_rate_limit_exact_across_processes_and_threads(redis_url: str, raw: redis.Redis) -> None:
    """4 processes x 8 threads x 100 calls against limit=1000 allow exactly 1000."""
    processes, threads, calls = 4, 8, 100
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RATE_WORKER, redis_url, str(threads), str(calls)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(processes)
    ]
    try:
        deadline = time.monotonic() + DEADLINE
        while int(raw.get("ready") or 0) < processes:  # every process imported and connected
            assert all(p.poll() is None for p in procs), "a worker exited early"
            assert time.monotonic() < deadline, "the workers never got ready"
            time.sleep(0.01)
        raw.set("go", 1)
        outputs = [p.communicate(timeout=DEADLINE) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    counts = [tuple(int(n) for n in out.split()) for out, _ in outputs]
    allowed = sum(c[0] for c in counts)
    refused = sum(c[1] for c in counts)
    print(f"\n[rate limit] allowed per process {[c[0] for c in counts]}, total {allowed}")
    assert allowed == 1000
    assert allowed + refused == processes * threads * calls
    assert sum(c[2] for c in counts) == 0  # nothing degraded: every answer came from Redis
    assert raw.get("crm:ratelimit:shared:3600") == b"1000"
    assert 0 < raw.pttl("crm:ratelimit:shared:3600") <= 3600 * 1000


# -- the randomized preference race ---------------------------------------------------------

CLIENTS = 20
ZONES = ("UTC", "Europe/Paris", "America/New_York", "Asia/Tokyo", "Australia/Sydney")
#: Most attempts an update makes when other saves keep beating it.
MAX_ATTEMPTS = 100


class Ledger(Protocol):
    """Committed versions per client: read before a read begins, raised after a save."""

    def committed(self, client_id: str) -> int:
        """The highest version known committed (its save returned)."""
        ...

    def commit(self, client_id: str, version: int) -> None:
        """Record that ``version`` was committed."""
        ...


class LocalLedger:
    """The ledger of one process: a dict under a lock."""

    def __init__(self, clients: list[str]) -> None:
        self._lock = threading.Lock()
        self._versions = dict.fromkeys(clients, 1)

    def committed(self, client_id: str) -> int:
        """The highest version known committed."""
        with self._lock:
            return self._versions[client_id]

    def commit(self, client_id: str, version: int) -> None:
        """Raise the client's committed version to ``version``."""
        with self._lock:
            self._versions[client_id] = max(self._versions[client_id], version)


#: HSET the field to ARGV[1] unless it already holds more; atomic, so processes can share it.
_RAISE = """
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > current then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
"""


class RedisLedger:
    """A ledger shared by processes: a Redis hash (keys outside crmcache's ``crm:`` space)."""

    KEY = "test:committed"

    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(url, protocol=2)
        self._raise = self._client.register_script(_RAISE)

    def committed(self, client_id: str) -> int:
        """The highest version known committed by any process."""
        return int(self._client.hget(self.KEY, client_id) or 1)

    def commit(self, client_id: str, version: int) -> None:
        """Raise the client's committed version to ``version``."""
        self._raise(keys=[self.KEY], args=[client_id, version])

    def close(self) -> None:
        """Close the connection."""
        self._client.close()


@dataclass
class Report:
    """What one stress run did and every violation it saw."""

    reads: int = 0
    cache_hits: int = 0
    updates: int = 0
    conflicts: int = 0
    invalidations: int = 0
    slow_writes: int = 0
    slow_writes_refused: int = 0
    stale_reads: list[str] = field(default_factory=list)
    stale_writes_accepted: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def merge(self, other: Report) -> None:
        """Add ``other``'s counts and violations to this one."""
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


def client_ids() -> list[str]:
    """The clients of the race."""
    return [f"client-{i:02d}" for i in range(CLIENTS)]


def seed_clients(store: SQLPreferenceStore) -> None:
    """One row per client, at version 1."""
    store.insert_many(ClientPreferences(client_id=cid) for cid in client_ids())


def race_thread(
    rng: random.Random,
    ops: int,
    *,
    repo: CommunicationRepository,
    cache: CRMCacheManager,
    store: SQLPreferenceStore,
    ledger: Ledger,
    report: Report,
) -> None:
    """``ops`` random operations on random clients, checking every read and slow write."""
    clients = client_ids()
    pending: list[tuple[int, ClientPreferences]] = []  # (due at op, old row) of slow readers

    def read(cid: str) -> ClientPreferences:
        before = ledger.committed(cid)
        got = repo.get_client_preferences(cid)
        report.reads += 1
        if got is None or got.version < before:
            report.stale_reads.append(f"{cid}: read {got and got.version}, committed {before}")
        assert got is not None
        return got

    def slow_write(row: ClientPreferences) -> None:
        before = ledger.committed(row.client_id)
        stored = cache.set_client_preferences(row)
        report.slow_writes += 1
        report.slow_writes_refused += not stored
        if stored and row.version < before:
            report.stale_writes_accepted.append(
                f"{row.client_id}: version {row.version} cached after {before} was committed"
            )

    for step in range(ops):
        while pending and pending[0][0] <= step:
            slow_write(pending.pop(0)[1])
        cid = rng.choice(clients)
        roll = rng.random()
        if roll < 0.5:
            read(cid)
        elif roll < 0.7:
            zone = rng.choice(ZONES)
            for _ in range(MAX_ATTEMPTS):
                current = read(cid)
                try:
                    saved = repo.save_client_preferences(
                        current.model_copy(update={"timezone": zone})
                    )
                except StaleVersionError:
                    report.conflicts += 1
                    continue
                ledger.commit(cid, saved.version)
                report.updates += 1
                break
            else:
                report.errors.append(f"{cid}: update lost {MAX_ATTEMPTS} races in a row")
        elif roll < 0.8:
            if rng.random() < 0.5:
                cache.invalidate_client_preferences(cid)
            else:
                row = store.load_preferences(cid)
                assert row is not None
                cache.invalidate_client_preferences(cid, version=row.version)
            report.invalidations += 1
        else:
            # A slow reader: the row now, put in the cache a few operations later.
            row = store.load_preferences(cid)
            assert row is not None
            pending.append((step + rng.randint(1, 8), row))
            pending.sort(key=lambda item: item[0])
    for _, row in pending:
        slow_write(row)


def run_race(
    seed: int,
    threads: int,
    ops: int,
    *,
    repo: CommunicationRepository,
    cache: CRMCacheManager,
    store: SQLPreferenceStore,
    ledger: Ledger,
) -> Report:
    """Run ``threads`` race threads (thread i seeded ``seed * 1000 + i``) and merge their
    reports."""
    reports = [Report() for _ in range(threads)]
    barrier = threading.Barrier(threads)

    def work(i: int) -> None:
        try:
            barrier.wait(timeout=DEADLINE)
            race_thread(
                random.Random(seed * 1000 + i),
                ops,
                repo=repo,
                cache=cache,
                store=store,
                ledger=ledger,
                report=reports[i],
            )
        except Exception as exc:
            reports[i].errors.append(f"thread {i}: {type(exc).__name__}: {exc}")

    workers = [threading.Thread(target=work, args=(i,), name=f"race-{i}") for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=DEADLINE)
        assert not worker.is_alive(), f"{worker.name} is stuck"
    total = Report()
    for report in reports:
        total.merge(report)
    stats = repo.stats
    total.cache_hits = stats.cache_hits
    return total


def assert_cache_agrees_with_database(
    cache: CRMCacheManager, store: SQLPreferenceStore, ledger: Ledger
) -> int:
    """Every cached value is the database's row; the database holds every committed version.
    Returns how many clients were cached."""
    cached = 0
    for cid in client_ids():
        row = store.load_preferences(cid)
        assert row is not None
        assert row.version == ledger.committed(cid), cid
        value = cache.get_client_preferences(cid)
        if value is not None:
            cached += 1
            assert value == row, f"{cid}: cache {value!r} != database {row!r}"
    return cached


def check(report: Report) -> None:
    """No errors, no stale read, no stale write accepted."""
    assert not report.errors, report.errors[:5]
    assert not report.stale_reads, report.stale_reads[:5]
    assert not report.stale_writes_accepted, report.stale_writes_accepted[:5]
    assert report.updates > 0
    assert report.slow_writes_refused > 0  # the race was real: some old rows came too late


def describe(label: str, report: Report, cached: int, elapsed: float) -> str:
    """A one-line summary of a run."""
    return (
        f"\n[{label}] {elapsed:.1f}s: {report.reads} reads ({report.cache_hits} cache hits), "
        f"{report.updates} updates ({report.conflicts} conflicts), {report.invalidations} "
        f"invalidations, {report.slow_writes} slow writes ({report.slow_writes_refused} "
        f"refused); {cached}/{CLIENTS} clients cached at the end"
    )


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_randomized_preference_race(
    seed: int,
    store: SQLPreferenceStore,
    cache: CRMCacheManager,
    repo: CommunicationRepository,
) -> None:
    """8 threads x 300 seeded random ops: no stale read or write; cache == database."""
    seed_clients(store)
    ledger = LocalLedger(client_ids())
    started = time.monotonic()
    report = run_race(seed, 8, 300, repo=repo, cache=cache, store=store, ledger=ledger)
    elapsed = time.monotonic() - started
    check(report)
    cached = assert_cache_agrees_with_database(cache, store, ledger)
    print(describe(f"race seed={seed} {store.engine.dialect.name}", report, cached, elapsed))


# -- the same race from two processes sharing the database and Redis ------------------------

PROCESS_WORKER = textwrap.dedent(
    """
    import json, sys, time
    from dataclasses import asdict
    import redis
    sys.path.insert(0, sys.argv[1])
    import test_stress as t
    from crmcache import CRMCacheManager
    from crmcache.repository import CommunicationRepository
    from crmcache.store import SQLPreferenceStore

    _, _, redis_url, db_url, table, seed, threads, ops = sys.argv
    go = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 60
    while not go.exists("go"):  # both processes start together
        if time.monotonic() > deadline:
            sys.exit("never told to go")
        time.sleep(0.005)
    go.close()
    store = SQLPreferenceStore(db_url, table_name=table)
    ledger = t.RedisLedger(redis_url)
    with CRMCacheManager(redis_url=redis_url) as cache:
        repo = CommunicationRepository(db_manager=store, cache_manager=cache)
        report = t.run_race(
            int(seed), int(threads), int(ops), repo=repo, cache=cache, store=store, ledger=ledger
        )
    ledger.close()
    store.close()
    print(json.dumps(asdict(report)))
    """
)


@pytest.fixture
def shared_ledger(redis_url: str, raw: redis.Redis) -> Iterator[RedisLedger]:
    """The cross-process ledger, on the session's (flushed) Redis."""
    ledger = RedisLedger(redis_url)
    yield ledger
    ledger.close()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [7])
def test_randomized_preference_race_two_processes(
    seed: int,
    store: SQLPreferenceStore,
    cache: CRMCacheManager,
    shared_ledger: RedisLedger,
    raw: redis.Redis,
) -> None:
    """2 processes x 4 threads x 200 seeded ops on one database and one Redis: no stale
    read or write across processes; cache == database."""
    seed_clients(store)
    redis_url = cache.settings.redis_url
    db_url = store.engine.url.render_as_string(hide_password=False)
    tests_dir = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                PROCESS_WORKER,
                tests_dir,
                redis_url,
                db_url,
                store.table.name,
                str(seed * 10 + n),
                "4",
                "200",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for n in range(2)
    ]
    started = time.monotonic()
    try:
        raw.set("go", 1)
        outputs = [p.communicate(timeout=DEADLINE) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    elapsed = time.monotonic() - started
    assert all(p.returncode == 0 for p in procs), [err[-3000:] for _, err in outputs]
    report = Report()
    for out, _ in outputs:
        report.merge(Report(**json.loads(out.strip().splitlines()[-1])))
    check(report)
    cached = assert_cache_agrees_with_database(cache, store, shared_ledger)
    print(describe(f"2-process race {store.engine.dialect.name}", report, cached, elapsed))
