"""The SQL preference store on SQLite and PostgreSQL: table, versions, fields, concurrency."""

from __future__ import annotations

import threading
from collections.abc import Callable
from uuid import uuid4

import pytest
from sqlalchemy import inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from conftest import postgres_url
from crmcache import ClientPreferences, ConfigurationError, MessageChannel, StaleVersionError
from crmcache.store import PreferenceStore, SQLPreferenceStore
from helpers import prefs

THREADS = 8
ZONES = (
    "UTC",
    "Europe/Berlin",
    "Asia/Tokyo",
    "America/Los_Angeles",
    "Africa/Cairo",
    "Australia/Sydney",
    "America/Sao_Paulo",
    "Asia/Kolkata",
)


def run_threads(count: int, target: Callable[[int], object]) -> list[object]:
    """Run ``target(i)`` in ``count`` threads released together; return results/exceptions."""
    barrier = threading.Barrier(count)
    results: list[object] = [None] * count

    def worker(i: int) -> None:
        barrier.wait(timeout=10)
        try:
            results[i] = target(i)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    return results


def test_creates_missing_table_and_reuses_an_existing_one(
    store: SQLPreferenceStore, store_url: str
) -> None:
    """A missing table is created; a second store on an existing table shares its rows."""
    name = f"crm_prefs_{uuid4().hex[:12]}"
    assert not inspect(store.engine).has_table(name)
    first = SQLPreferenceStore(store_url, table_name=name)
    try:
        assert inspect(store.engine).has_table(name)
        first.save_preferences(prefs(0, tz="Asia/Tokyo"))
        second = SQLPreferenceStore(store_url, table_name=name)
        try:
            loaded = second.load_preferences("client-123")
            assert loaded is not None
            assert (loaded.version, loaded.timezone) == (1, "Asia/Tokyo")
        finally:
            second.close()
    finally:
        first.drop_table()
        first.close()
    assert not inspect(store.engine).has_table(name)


def test_unknown_client_loads_as_none(store: SQLPreferenceStore) -> None:
    """Loading a client that has no row returns None (and counts the load)."""
    assert store.load_preferences("nobody") is None
    assert store.loads == 1


def test_save_at_version_zero_creates_version_one(store: SQLPreferenceStore) -> None:
    """A save based on version 0 inserts the row at version 1 and returns it."""
    saved = store.save_preferences(prefs(0, tz="Europe/Berlin"))
    assert saved.version == 1
    assert saved.timezone == "Europe/Berlin"
    assert store.load_preferences("client-123") == saved
    assert store.saves == 1


def test_save_on_current_version_bumps_it(store: SQLPreferenceStore) -> None:
    """A save based on the current version writes the change at version + 1."""
    v1 = store.save_preferences(prefs(0))
    v2 = store.save_preferences(v1.model_copy(update={"timezone": "Asia/Tokyo"}))
    v3 = store.save_preferences(v2.model_copy(update={"opt_out": True}))
    assert (v2.version, v3.version) == (2, 3)
    loaded = store.load_preferences("client-123")
    assert loaded == v3
    assert loaded is not None
    assert (loaded.timezone, loaded.opt_out) == ("Asia/Tokyo", True)


def test_save_on_stale_version_raises_and_leaves_the_row(store: SQLPreferenceStore) -> None:
    """A save based on an outdated version raises StaleVersionError; the row is unchanged."""
    v1 = store.save_preferences(prefs(0))
    v2 = store.save_preferences(v1.model_copy(update={"timezone": "Asia/Tokyo"}))
    with pytest.raises(StaleVersionError) as info:
        store.save_preferences(v1.model_copy(update={"timezone": "Europe/Berlin"}))
    assert (info.value.expected, info.value.actual) == (1, 2)
    assert store.load_preferences("client-123") == v2
    assert store.saves == 2


def test_create_over_an_existing_row_is_stale(store: SQLPreferenceStore) -> None:
    """A save at version 0 for a client that already has a row raises StaleVersionError."""
    v1 = store.save_preferences(prefs(0, tz="Asia/Tokyo"))
    with pytest.raises(StaleVersionError) as info:
        store.save_preferences(prefs(0, tz="Europe/Berlin"))
    assert (info.value.expected, info.value.actual) == (0, 1)
    assert store.load_preferences("client-123") == v1
    # The failed insert left the connection usable: a proper save still works.
    assert store.save_preferences(v1).version == 2


def test_update_of_a_missing_row_is_stale(store: SQLPreferenceStore) -> None:
    """A save based on version 3 of a row that does not exist is stale with actual None."""
    with pytest.raises(StaleVersionError) as info:
        store.save_preferences(prefs(3))
    assert (info.value.expected, info.value.actual) == (3, None)
    assert store.load_preferences("client-123") is None


@pytest.mark.parametrize(
    "fields",
    [
        {
            "preferred_channels": [
                MessageChannel.WHATSAPP,
                MessageChannel.SMS,
                MessageChannel.EMAIL,
            ],
            "timezone": "America/Los_Angeles",
            "language": "pt-BR",
            "opt_out": True,
            "quiet_hours_start": 22,
            "quiet_hours_end": 7,
        },
        {
            "preferred_channels": [MessageChannel.EMAIL, MessageChannel.WHATSAPP],
            "timezone": "Asia/Kolkata",
            "language": "en",
            "opt_out": False,
            "quiet_hours_start": None,
            "quiet_hours_end": None,
        },
        {
            "preferred_channels": [],
            "timezone": "UTC",
            "language": "fr",
            "opt_out": False,
            "quiet_hours_start": 0,
            "quiet_hours_end": 23,
        },
    ],
    ids=["all-set", "quiet-hours-none", "no-channels-edge-hours"],
)
def test_every_field_round_trips(store: SQLPreferenceStore, fields: dict[str, object]) -> None:
    """Channels (in order), timezone, language, opt-out and quiet hours come back as saved."""
    original = ClientPreferences(client_id="client-123", **fields)  # type: ignore[arg-type]
    saved = store.save_preferences(original)
    loaded = store.load_preferences("client-123")
    assert loaded is not None
    assert loaded == saved
    assert loaded.model_dump(exclude={"version"}) == original.model_dump(exclude={"version"})
    assert loaded.preferred_channels == fields["preferred_channels"]


def test_insert_many(store: SQLPreferenceStore) -> None:
    """insert_many writes every row at version 1 in one call and returns how many."""
    rows = [prefs(0, client_id=f"bulk-{i}", tz=ZONES[i]) for i in range(5)]
    assert store.insert_many(rows) == 5
    assert store.insert_many([]) == 0
    for i in range(5):
        loaded = store.load_preferences(f"bulk-{i}")
        assert loaded is not None
        assert (loaded.version, loaded.timezone) == (1, ZONES[i])


def test_insert_many_is_one_transaction(store: SQLPreferenceStore) -> None:
    """A batch holding an existing client fails as a whole: none of its rows are inserted."""
    store.save_preferences(prefs(0, client_id="taken"))
    batch = [prefs(0, client_id="fresh"), prefs(0, client_id="taken")]
    with pytest.raises(IntegrityError):
        store.insert_many(batch)
    assert store.load_preferences("fresh") is None


def test_concurrent_saves_on_one_version_let_exactly_one_win(store: SQLPreferenceStore) -> None:
    """Eight threads saving on version 1 at once: one succeeds, seven get StaleVersionError."""
    base = store.save_preferences(prefs(0))
    results = run_threads(
        THREADS,
        lambda i: store.save_preferences(base.model_copy(update={"timezone": ZONES[i]})),
    )
    winners = [r for r in results if isinstance(r, ClientPreferences)]
    losers = [r for r in results if isinstance(r, StaleVersionError)]
    assert len(winners) == 1, results
    assert len(losers) == THREADS - 1, results
    assert all((e.expected, e.actual) == (1, 2) for e in losers)
    assert store.load_preferences("client-123") == winners[0]
    assert winners[0].version == 2


def test_concurrent_creates_let_exactly_one_win(store: SQLPreferenceStore) -> None:
    """Eight threads creating the same client at version 0: one row, seven stale errors."""
    results = run_threads(THREADS, lambda i: store.save_preferences(prefs(0, tz=ZONES[i])))
    winners = [r for r in results if isinstance(r, ClientPreferences)]
    losers = [r for r in results if isinstance(r, StaleVersionError)]
    assert len(winners) == 1, results
    assert len(losers) == THREADS - 1, results
    assert store.load_preferences("client-123") == winners[0]


def test_default_in_memory_store_is_shared_by_threads() -> None:
    """SQLPreferenceStore() (in-memory SQLite) serves many threads from one database."""
    db = SQLPreferenceStore()
    try:
        assert db.engine.dialect.name == "sqlite"
        saved = run_threads(
            THREADS, lambda i: db.save_preferences(prefs(0, client_id=f"c{i}", tz=ZONES[i]))
        )
        assert all(isinstance(r, ClientPreferences) for r in saved), saved
        loaded = run_threads(THREADS, lambda i: db.load_preferences(f"c{i}"))
        assert [r.timezone for r in loaded] == list(ZONES)  # type: ignore[attr-defined]
        base = db.load_preferences("c0")
        assert base is not None
        raced = run_threads(THREADS, lambda i: db.save_preferences(base))
        assert sum(isinstance(r, ClientPreferences) for r in raced) == 1, raced
        assert sum(isinstance(r, StaleVersionError) for r in raced) == THREADS - 1, raced
    finally:
        db.close()


def test_repr_hides_the_password() -> None:
    """repr of a store on a URL with a password names host and table but not the password."""
    url = make_url(postgres_url()).set(password="secret")
    db = SQLPreferenceStore(
        url.render_as_string(hide_password=False), table_name=f"crm_prefs_{uuid4().hex[:12]}"
    )
    try:
        # A real connection: the server (trust auth) accepted it and the table exists.
        db.save_preferences(prefs(0))
        assert db.load_preferences("client-123") is not None
        text = repr(db)
        assert "secret" not in text
        assert "127.0.0.1" in text or str(url.host) in text
        assert db.table.name in text
    finally:
        db.drop_table()
        db.close()


@pytest.mark.parametrize(
    "url",
    ["not a url", "nosuchdb://user:secret@localhost/db", "postgresql+nodriver://u:secret@h/db"],
)
def test_bad_url_raises_configuration_error(url: str) -> None:
    """An unparseable URL or an unknown driver raises ConfigurationError without the password."""
    with pytest.raises(ConfigurationError) as info:
        SQLPreferenceStore(url)
    assert isinstance(info.value, ValueError)
    assert "secret" not in str(info.value)


def test_is_a_preference_store(store: SQLPreferenceStore) -> None:
    """The shipped store satisfies the PreferenceStore protocol; a plain object does not."""
    assert isinstance(store, PreferenceStore)
    assert not isinstance(object(), PreferenceStore)


def test_save_rejects_a_non_model(store: SQLPreferenceStore) -> None:
    """Saving anything but ClientPreferences raises TypeError and writes nothing."""
    with pytest.raises(TypeError, match="ClientPreferences"):
        store.save_preferences({"client_id": "client-123"})  # type: ignore[arg-type]
    assert store.load_preferences("client-123") is None


def test_a_long_language_tag_round_trips(store: SQLPreferenceStore) -> None:
    """A valid BCP 47 tag longer than 16 characters is saved by both backends alike."""
    saved = store.save_preferences(
        ClientPreferences(client_id="c", language="de-CH-1996-x-phonebk")
    )
    assert store.load_preferences("c") == saved
