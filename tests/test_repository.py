"""The read-through repository on a real database and a real Redis: reads, saves, stampedes."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from functools import partial

import pytest
import redis

import helpers
from crmcache import ClientPreferences, CRMCacheManager, MessageChannel, StaleVersionError
from crmcache.cache_manager import LeaseState
from crmcache.repository import CommunicationRepository
from crmcache.store import SQLPreferenceStore
from crmcache.testing import RedisServer
from helpers import prefs

THREADS = 16
KEY = "crm:prefs:client-123"
LEASE = "crm:lease:prefs:client-123"


#: Polls in this module wait up to 15 s, checking every 5 ms.
poll = partial(helpers.poll, timeout=15.0, interval=0.005)


class SlowStore:
    """A PreferenceStore over a real store whose gated loads read the row, then wait.

    A gated load emulates a slow reader: it has read the row from the database and is
    held (``loaded`` is set) until the test sets ``gate``. ``before_load`` runs first on
    every load, to look at Redis while a load is in progress.
    """

    def __init__(
        self,
        inner: SQLPreferenceStore,
        *,
        gated_loads: int = 1,
        before_load: Callable[[], None] | None = None,
    ) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.loaded = threading.Event()
        self._gated_left = gated_loads
        self._lock = threading.Lock()
        self._before_load = before_load

    def load_preferences(self, client_id: str) -> ClientPreferences | None:
        """Load from the real store; the first ``gated_loads`` loads then wait for the gate."""
        if self._before_load is not None:
            self._before_load()
        row = self.inner.load_preferences(client_id)
        with self._lock:
            gated = self._gated_left > 0
            self._gated_left -= 1
        if gated:
            self.loaded.set()
            assert self.gate.wait(timeout=30), "the test never opened the gate"
        return row

    def save_preferences(self, preferences: ClientPreferences) -> ClientPreferences:
        """Save through the real store."""
        return self.inner.save_preferences(preferences)


class Background:
    """Run one call in a thread and keep its result or exception."""

    def __init__(self, call: Callable[[], object]) -> None:
        self.result: object = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._call = call
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.result = self._call()
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()

    def join(self) -> object:
        """Wait for the call (bounded) and return its result, re-raising its exception."""
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "background call hung"
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def other(redis_url: str, raw: redis.Redis) -> Iterator[CRMCacheManager]:
    """A second manager on the same Redis: another process of the same service."""
    with CRMCacheManager(redis_url=redis_url) as manager:
        yield manager


# -- the spec's flow -----------------------------------------------------------------------


def test_spec_flow_miss_loads_db_and_fills_then_hits(
    repo: CommunicationRepository, store: SQLPreferenceStore, raw: redis.Redis
) -> None:
    """get_client_preferences: a miss loads the database and fills the cache; then a hit."""
    row = store.save_preferences(prefs(0, tz="America/Los_Angeles"))
    loads = store.loads

    first = repo.get_client_preferences("client-123")
    assert first == row
    assert store.loads == loads + 1
    cached = raw.get(KEY)
    assert cached is not None
    assert cached.startswith(b"1:")
    assert 0 < raw.pttl(KEY) <= 3_600_000

    second = repo.get_client_preferences("client-123")
    assert second == row
    assert store.loads == loads + 1
    stats = repo.stats
    assert (stats.cache_hits, stats.db_loads) == (1, 1)


def test_unknown_client_is_none_and_nothing_is_cached(
    repo: CommunicationRepository, raw: redis.Redis
) -> None:
    """A client without a row reads as None; no value (and no lease) is left in Redis."""
    assert repo.get_client_preferences("nobody") is None
    assert raw.exists("crm:prefs:nobody") == 0
    assert raw.exists("crm:lease:prefs:nobody") == 0
    assert repo.stats.db_loads == 1


def test_save_updates_db_and_cache_at_once(
    repo: CommunicationRepository, store: SQLPreferenceStore, raw: redis.Redis
) -> None:
    """A save writes the database and caches the new version: the next get needs no load."""
    store.save_preferences(prefs(0))
    loaded = repo.get_client_preferences("client-123")
    assert loaded is not None

    saved = repo.save_client_preferences(loaded.model_copy(update={"timezone": "Asia/Tokyo"}))
    assert saved.version == 2
    in_db = store.load_preferences("client-123")
    assert in_db is not None
    assert (in_db.version, in_db.timezone) == (2, "Asia/Tokyo")
    cached = raw.get(KEY)
    assert cached is not None
    assert cached.startswith(b"2:")

    loads = store.loads
    got = repo.get_client_preferences("client-123")
    assert got is not None
    assert (got.version, got.timezone) == (2, "Asia/Tokyo")
    assert store.loads == loads
    assert repo.stats.saves == 1


def test_save_creates_a_new_client(
    repo: CommunicationRepository, store: SQLPreferenceStore, raw: redis.Redis
) -> None:
    """A save at version 0 creates the row at version 1 and caches it."""
    saved = repo.save_client_preferences(prefs(0, tz="Europe/Berlin"))
    assert saved.version == 1
    assert store.load_preferences("client-123") == saved
    cached = raw.get(KEY)
    assert cached is not None
    assert cached.startswith(b"1:")


def test_stale_save_raises_and_leaves_the_cache(
    repo: CommunicationRepository, store: SQLPreferenceStore, raw: redis.Redis
) -> None:
    """A save based on an outdated version raises StaleVersionError; the cache is untouched."""
    store.save_preferences(prefs(0))
    loaded = repo.get_client_preferences("client-123")
    assert loaded is not None
    store.save_preferences(loaded.model_copy(update={"timezone": "Europe/Berlin"}))  # elsewhere
    before = raw.get(KEY)
    assert before is not None

    with pytest.raises(StaleVersionError) as info:
        repo.save_client_preferences(loaded.model_copy(update={"timezone": "Asia/Tokyo"}))
    assert (info.value.expected, info.value.actual) == (1, 2)
    assert raw.get(KEY) == before
    assert raw.pttl(KEY) > 0
    assert repo.stats.saves == 0
    in_db = store.load_preferences("client-123")
    assert in_db is not None
    assert in_db.timezone == "Europe/Berlin"


def test_no_stale_read_after_save(
    repo: CommunicationRepository, cache: CRMCacheManager, store: SQLPreferenceStore
) -> None:
    """A slow reader that loaded the old row before a save cannot put it in the cache after."""
    store.save_preferences(prefs(0))
    old_row = repo.db.load_preferences("client-123")  # the slow reader's database load
    assert old_row is not None

    repo.save_client_preferences(old_row.model_copy(update={"timezone": "Asia/Tokyo"}))

    assert cache.set_client_preferences(old_row) is False  # the slow reader's fill
    got = repo.get_client_preferences("client-123")
    assert got is not None
    assert (got.version, got.timezone) == (2, "Asia/Tokyo")


def test_slow_leader_fill_after_save_is_refused(
    store: SQLPreferenceStore, cache: CRMCacheManager, raw: redis.Redis
) -> None:
    """With real threads: a load begun before a save ends after it; the cache keeps the save."""
    store.save_preferences(prefs(0))
    slow = SlowStore(store)
    repo = CommunicationRepository(db_manager=slow, cache_manager=cache)

    reader = Background(lambda: repo.get_client_preferences("client-123"))
    assert slow.loaded.wait(timeout=10)  # it has read version 1 and is stalled
    old_row = store.load_preferences("client-123")
    assert old_row is not None
    repo.save_client_preferences(old_row.model_copy(update={"timezone": "Asia/Tokyo"}))
    slow.gate.set()

    read = reader.join()
    assert isinstance(read, ClientPreferences)
    assert read.version == 1  # it started before the save: the old row is a fair answer
    cached = raw.get(KEY)
    assert cached is not None
    assert cached.startswith(b"2:")
    got = repo.get_client_preferences("client-123")
    assert got is not None
    assert (got.version, got.timezone) == (2, "Asia/Tokyo")


# -- stampedes: single-flight in a process, a lease across processes ----------------------


def test_single_flight_one_db_load_for_concurrent_misses(
    store: SQLPreferenceStore, cache: CRMCacheManager
) -> None:
    """Sixteen threads missing the same client at once share exactly one database load."""
    row = store.save_preferences(prefs(0))
    slow = SlowStore(store)
    repo = CommunicationRepository(db_manager=slow, cache_manager=cache)
    loads = store.loads
    barrier = threading.Barrier(THREADS)
    results: list[object] = [None] * THREADS

    def worker(i: int) -> None:
        barrier.wait(timeout=10)
        try:
            results[i] = repo.get_client_preferences("client-123")
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    try:
        poll(lambda: repo.stats.single_flight_joins == THREADS - 1)
    finally:
        slow.gate.set()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)

    assert results == [row] * THREADS
    assert store.loads - loads == 1
    stats = repo.stats
    assert (stats.db_loads, stats.single_flight_joins) == (1, THREADS - 1)
    assert stats.lease_waits == 0  # held in-process, not by the Redis lease


def test_save_retires_an_in_flight_load(store: SQLPreferenceStore) -> None:
    """A reader starting after a save does not join a load begun before it (no old row)."""
    store.save_preferences(prefs(0))
    slow = SlowStore(store)  # only the first load is held
    repo = CommunicationRepository(db_manager=slow, cache_manager=None)

    early = Background(lambda: repo.get_client_preferences("client-123"))
    assert slow.loaded.wait(timeout=10)  # in flight, holding version 1
    before = store.load_preferences("client-123")
    assert before is not None
    repo.save_client_preferences(before.model_copy(update={"timezone": "Asia/Tokyo"}))

    late = Background(lambda: repo.get_client_preferences("client-123"))
    try:
        # Either the late reader finishes on its own, or it joined the stalled flight.
        poll(lambda: late.done.is_set() or repo.stats.single_flight_joins > 0)
        assert repo.stats.single_flight_joins == 0
    finally:
        slow.gate.set()
    late_row = late.join()
    assert isinstance(late_row, ClientPreferences)
    assert (late_row.version, late_row.timezone) == (2, "Asia/Tokyo")
    early_row = early.join()
    assert isinstance(early_row, ClientPreferences)
    assert early_row.version == 1
    assert repo.stats.db_loads == 2


def test_db_error_propagates_and_releases_lease_and_flight(
    store: SQLPreferenceStore, cache: CRMCacheManager, raw: redis.Redis
) -> None:
    """A failing database load raises to the caller, frees the lease, and a retry works."""
    row = store.save_preferences(prefs(0))
    failures = [RuntimeError("database is down")]

    def fail_once() -> None:
        if failures:
            raise failures.pop()

    repo = CommunicationRepository(
        db_manager=SlowStore(store, gated_loads=0, before_load=fail_once), cache_manager=cache
    )
    with pytest.raises(RuntimeError, match="database is down"):
        repo.get_client_preferences("client-123")
    assert raw.exists(LEASE) == 0
    assert repo.get_client_preferences("client-123") == row


def test_lease_has_ttl_while_held_and_is_released_after_load(
    store: SQLPreferenceStore, cache: CRMCacheManager, raw: redis.Redis
) -> None:
    """During the database load the lease exists with a TTL; afterwards it is gone."""
    store.save_preferences(prefs(0))
    seen: dict[str, int] = {}

    def look() -> None:
        seen["exists"] = int(raw.exists(LEASE))
        seen["pttl"] = int(raw.pttl(LEASE))

    repo = CommunicationRepository(
        db_manager=SlowStore(store, gated_loads=0, before_load=look),
        cache_manager=cache,
        lease_ttl=5,
    )
    assert repo.get_client_preferences("client-123") is not None
    assert seen["exists"] == 1
    assert 0 < seen["pttl"] <= 5000
    assert raw.exists(LEASE) == 0


def test_lease_holder_elsewhere_fills_and_we_do_not_load(
    store: SQLPreferenceStore, cache: CRMCacheManager, other: CRMCacheManager, raw: redis.Redis
) -> None:
    """While another process holds the lease, a miss waits for its fill instead of loading."""
    row = store.save_preferences(prefs(0))
    lease = other.acquire_load_lease("client-123", ttl=30)
    assert lease.state is LeaseState.ACQUIRED
    repo = CommunicationRepository(db_manager=store, cache_manager=cache, lease_wait=10)
    loads = store.loads
    try:
        reader = Background(lambda: repo.get_client_preferences("client-123"))
        poll(lambda: repo.stats.lease_waits == 1)
        assert other.set_client_preferences(row)  # the holder fills the cache
        assert reader.join() == row
    finally:
        lease.release()
    assert store.loads == loads
    stats = repo.stats
    assert (stats.lease_waits, stats.lease_wait_hits, stats.db_loads) == (1, 1, 0)
    assert raw.exists(LEASE) == 0


def test_lease_wait_times_out_then_loads_itself(
    store: SQLPreferenceStore, cache: CRMCacheManager, other: CRMCacheManager, raw: redis.Redis
) -> None:
    """If the lease holder never fills, the waiter loads the database after lease_wait."""
    row = store.save_preferences(prefs(0))
    lease = other.acquire_load_lease("client-123", ttl=30)
    assert lease.state is LeaseState.ACQUIRED
    repo = CommunicationRepository(db_manager=store, cache_manager=cache, lease_wait=0.1)
    loads = store.loads
    try:
        assert repo.get_client_preferences("client-123") == row
        assert store.loads == loads + 1
        stats = repo.stats
        assert (stats.lease_waits, stats.lease_wait_hits, stats.db_loads) == (1, 0, 1)
        cached = raw.get(KEY)
        assert cached is not None
        assert cached.startswith(b"1:")
        # The other process's lease is not ours to release.
        assert raw.exists(LEASE) == 1
    finally:
        lease.release()
    assert raw.exists(LEASE) == 0


# -- without a cache ------------------------------------------------------------------------


@pytest.fixture(params=["disabled", "none"])
def cacheless(
    request: pytest.FixtureRequest, redis_url: str, raw: redis.Redis
) -> Iterator[CRMCacheManager | None]:
    """No cache: a disabled manager, or cache_manager=None."""
    if request.param == "none":
        yield None
        return
    with CRMCacheManager(redis_url=redis_url, enabled=False) as manager:
        yield manager


def test_everything_works_from_the_db_without_a_cache(
    store: SQLPreferenceStore, cacheless: CRMCacheManager | None, raw: redis.Redis
) -> None:
    """With the cache disabled or absent, gets and saves go to the database; Redis is untouched."""
    repo = CommunicationRepository(db_manager=store, cache_manager=cacheless)
    assert repo.get_client_preferences("client-123") is None
    created = repo.save_client_preferences(prefs(0))
    assert created.version == 1
    loads = store.loads
    assert repo.get_client_preferences("client-123") == created
    updated = repo.save_client_preferences(created.model_copy(update={"timezone": "Asia/Tokyo"}))
    got = repo.get_client_preferences("client-123")
    assert got == updated
    assert got is not None
    assert (got.version, got.timezone) == (2, "Asia/Tokyo")
    assert store.loads == loads + 2
    assert repo.stats.cache_hits == 0
    assert raw.keys("crm:*") == []


def test_redis_down_then_back(store: SQLPreferenceStore, own_server: RedisServer) -> None:
    """Redis killed: get and save work from the database; after a restart caching resumes."""
    with CRMCacheManager(
        redis_url=own_server.url,
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        pool_timeout=0.5,
    ) as cache:
        repo = CommunicationRepository(db_manager=store, cache_manager=cache)
        row = store.save_preferences(prefs(0))
        assert repo.get_client_preferences("client-123") == row  # fills the cache

        own_server.kill()
        assert repo.get_client_preferences("client-123") == row
        saved = repo.save_client_preferences(row.model_copy(update={"timezone": "Asia/Tokyo"}))
        assert saved.version == 2
        in_db = store.load_preferences("client-123")
        assert in_db == saved
        got = repo.get_client_preferences("client-123")
        assert got == saved

        own_server.restart()
        own_raw = redis.Redis.from_url(own_server.url, protocol=2)
        try:
            poll(
                lambda: (
                    repo.get_client_preferences("client-123") == saved and own_raw.exists(KEY) == 1
                )
            )
            cached = own_raw.get(KEY)
            assert cached is not None
            assert cached.startswith(b"2:")
            loads = store.loads
            assert repo.get_client_preferences("client-123") == saved
            assert store.loads == loads
        finally:
            own_raw.close()


# -- arguments ------------------------------------------------------------------------------


class LoadOnly:
    """Has load_preferences but no save_preferences: not a PreferenceStore."""

    def load_preferences(self, client_id: str) -> ClientPreferences | None:
        """Never called."""
        return None


@pytest.mark.parametrize(
    "db", [object(), LoadOnly(), "sqlite://"], ids=["object", "load-only", "str"]
)
def test_db_manager_without_the_methods_is_a_type_error(db: object) -> None:
    """A db_manager lacking load_preferences/save_preferences is refused with TypeError."""
    with pytest.raises(TypeError, match="db_manager"):
        CommunicationRepository(db_manager=db)  # type: ignore[arg-type]


def test_bad_cache_manager_and_lease_wait(store: SQLPreferenceStore, redis_url: str) -> None:
    """A cache_manager that is not a CRMCacheManager, or lease_wait out of range, is refused."""
    with pytest.raises(TypeError, match="cache_manager"):
        CommunicationRepository(db_manager=store, cache_manager=redis_url)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lease_wait"):
        CommunicationRepository(db_manager=store, lease_wait=11)
    with pytest.raises(ValueError, match="lease_wait"):
        CommunicationRepository(db_manager=store, lease_wait=-1)


def test_bad_lease_ttl_is_refused_at_construction(
    store: SQLPreferenceStore, cache: CRMCacheManager
) -> None:
    """lease_ttl=0 is refused when the repository is built, not on the first cache miss."""
    with pytest.raises(ValueError, match="ttl"):
        CommunicationRepository(db_manager=store, cache_manager=cache, lease_ttl=0)


@pytest.mark.parametrize("bad", [123, "", "a\x00b"], ids=["int", "empty", "control-char"])
def test_bad_client_id_without_a_cache(store: SQLPreferenceStore, bad: object) -> None:
    """A bad client_id raises TypeError/ValueError even with no cache in front."""
    repo = CommunicationRepository(db_manager=store, cache_manager=None)
    with pytest.raises((TypeError, ValueError)):
        repo.get_client_preferences(bad)  # type: ignore[arg-type]


# -- update_client_preferences: read, change, save, retry on a race ------------------------


def add_channel(channel: MessageChannel) -> Callable[[ClientPreferences], ClientPreferences]:
    """A change that appends ``channel`` to the preferred channels."""

    def change(current: ClientPreferences) -> ClientPreferences:
        channels = [*current.preferred_channels, channel]
        return current.model_copy(update={"preferred_channels": channels})

    return change


def test_update_creates_then_changes(
    repo: CommunicationRepository, store: SQLPreferenceStore, raw: redis.Redis
) -> None:
    """A client without a row is created by its first update; the next changes it; both
    versions land in the database and the cache."""
    created = repo.update_client_preferences(
        "client-123", lambda p: p.model_copy(update={"timezone": "Europe/Paris"})
    )
    assert (created.version, created.timezone) == (1, "Europe/Paris")
    changed = repo.update_client_preferences(
        "client-123", lambda p: p.model_copy(update={"opt_out": True})
    )
    assert (changed.version, changed.timezone, changed.opt_out) == (2, "Europe/Paris", True)
    assert store.load_preferences("client-123") == changed
    cached = raw.get(KEY)
    assert cached is not None
    assert cached.startswith(b"2:")
    assert repo.stats.update_retries == 0


def test_update_retries_after_a_concurrent_writer(
    repo: CommunicationRepository, store: SQLPreferenceStore, raw: redis.Redis
) -> None:
    """Another writer saves the row between our read and our save: the save raises
    StaleVersionError inside, the change is re-applied to the writer's row, and neither
    change is lost."""
    store.save_preferences(prefs(0))  # version 1, channels [sms, email]
    calls: list[int] = []

    def change(current: ClientPreferences) -> ClientPreferences:
        calls.append(current.version)
        if len(calls) == 1:
            # A concurrent writer (another process, through the database) wins the race.
            def write() -> None:
                row = store.load_preferences("client-123")
                assert row is not None
                store.save_preferences(row.model_copy(update={"language": "fr"}))

            writer = Background(write)
            writer.join()
        return current.model_copy(update={"timezone": "Asia/Tokyo"})

    saved = repo.update_client_preferences("client-123", change)
    assert calls == [1, 2]
    assert (saved.version, saved.timezone, saved.language) == (3, "Asia/Tokyo", "fr")
    assert store.load_preferences("client-123") == saved
    cached = raw.get(KEY)
    assert cached is not None
    assert cached.startswith(b"3:")
    assert repo.stats.update_retries == 1


def test_update_gives_up_after_retries(
    repo: CommunicationRepository, store: SQLPreferenceStore
) -> None:
    """A writer that wins every race: after ``retries`` retries the StaleVersionError is
    raised, and the database keeps the writer's rows."""
    store.save_preferences(prefs(0))
    calls = 0

    def change(current: ClientPreferences) -> ClientPreferences:
        nonlocal calls
        calls += 1
        row = store.load_preferences("client-123")
        assert row is not None
        store.save_preferences(row)  # someone else saves again, every time
        return current.model_copy(update={"opt_out": True})

    with pytest.raises(StaleVersionError):
        repo.update_client_preferences("client-123", change, retries=2)
    assert calls == 3
    in_db = store.load_preferences("client-123")
    assert in_db is not None
    assert (in_db.version, in_db.opt_out) == (4, False)
    assert repo.stats.update_retries == 2


def test_concurrent_updates_lose_nothing(
    repo: CommunicationRepository, store: SQLPreferenceStore
) -> None:
    """Three threads add one channel each to the same row at once: every channel is in
    the final row (a lost update would drop one)."""
    store.save_preferences(prefs(0).model_copy(update={"preferred_channels": []}))
    channels = [MessageChannel.EMAIL, MessageChannel.SMS, MessageChannel.WHATSAPP]
    workers = [
        Background(
            partial(repo.update_client_preferences, "client-123", add_channel(c), retries=20)
        )
        for c in channels
    ]
    for worker in workers:
        worker.join()
    final = repo.get_client_preferences("client-123")
    assert final is not None
    assert sorted(final.preferred_channels) == sorted(channels)
    assert final.version == 1 + len(channels)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"change": "not callable"}, TypeError, "change"),
        ({"retries": -1}, ValueError, "retries"),
        ({"retries": 1.5}, TypeError, "retries"),
        ({"retries": True}, TypeError, "retries"),
        ({"change": lambda p: None}, TypeError, "ClientPreferences"),
        ({"change": lambda p: p.model_copy(update={"client_id": "other"})}, ValueError, "other"),
    ],
    ids=["change", "negative-retries", "float-retries", "bool-retries", "returns-none", "other"],
)
def test_update_bad_arguments(
    repo: CommunicationRepository,
    store: SQLPreferenceStore,
    kwargs: dict[str, object],
    error: type[Exception],
    match: str,
) -> None:
    """Bad arguments (or a change returning something else) raise TypeError/ValueError
    naming them, and nothing is saved."""
    arguments: dict[str, object] = {"change": lambda p: p, **kwargs}
    with pytest.raises(error, match=match):
        repo.update_client_preferences("client-123", **arguments)  # type: ignore[arg-type]
    assert store.load_preferences("client-123") is None
