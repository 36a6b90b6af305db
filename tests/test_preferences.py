"""Client preferences: keys, TTL, versioned writes, tombstones and the stale-write race."""

from __future__ import annotations

import threading
from enum import IntEnum

import pytest
import redis

from crmcache import ClientPreferences, CRMCacheManager, MessageChannel
from helpers import prefs


def test_miss_then_hit_round_trips_every_field(cache: CRMCacheManager) -> None:
    """A set value comes back equal, field for field; before it, a miss."""
    assert cache.get_client_preferences("client-123") is None
    original = prefs(3, tz="America/Los_Angeles")
    assert cache.set_client_preferences(original) is True
    assert cache.get_client_preferences("client-123") == original


def test_key_format_and_default_ttl(cache: CRMCacheManager, raw: redis.Redis) -> None:
    """The value lives at crm:prefs:<client_id> and expires after one hour."""
    cache.set_client_preferences(prefs(1))
    assert raw.exists("crm:prefs:client-123") == 1
    assert 3_590_000 < raw.pttl("crm:prefs:client-123") <= 3_600_000


def test_cache_ttl_argument_and_per_call_ttl(redis_url: str, raw: redis.Redis) -> None:
    """cache_ttl sets the default TTL; ttl= overrides it for one write."""
    with CRMCacheManager(redis_url=redis_url, cache_ttl=120) as cache:
        cache.set_client_preferences(prefs(1))
        assert 110_000 < raw.pttl("crm:prefs:client-123") <= 120_000
        cache.set_client_preferences(prefs(2), ttl=30)
        assert 20_000 < raw.pttl("crm:prefs:client-123") <= 30_000


def test_constructible_from_client_id_alone() -> None:
    """ClientPreferences needs only a client id; defaults are sensible."""
    p = ClientPreferences(client_id="c")
    assert (p.timezone, p.language, p.version) == ("UTC", "en", 0)
    assert p.preferred_channel is MessageChannel.EMAIL


def test_older_version_never_overwrites_newer(cache: CRMCacheManager) -> None:
    """A write of version 6 after version 7 is refused and version 7 stays."""
    assert cache.set_client_preferences(prefs(7, tz="Europe/Berlin"))
    assert cache.set_client_preferences(prefs(6, tz="Asia/Tokyo")) is False
    cached = cache.get_client_preferences("client-123")
    assert cached is not None
    assert (cached.version, cached.timezone) == (7, "Europe/Berlin")
    assert cache.get_stats().counters["stale_writes_refused"] == 1


def test_same_version_rewrite_is_accepted(cache: CRMCacheManager, raw: redis.Redis) -> None:
    """Re-writing the same version succeeds and refreshes the TTL."""
    cache.set_client_preferences(prefs(4), ttl=10)
    assert cache.set_client_preferences(prefs(4), ttl=100)
    assert raw.pttl("crm:prefs:client-123") > 10_000


def test_invalidate_leaves_a_versioned_tombstone(cache: CRMCacheManager, raw: redis.Redis) -> None:
    """Invalidation replaces the value with a short-lived tombstone, not a plain DEL."""
    cache.set_client_preferences(prefs(5))
    assert cache.invalidate_client_preferences("client-123", version=6)
    assert raw.get("crm:prefs:client-123") == b"T6"
    assert 0 < raw.pttl("crm:prefs:client-123") <= 30_000
    assert cache.get_client_preferences("client-123") is None


def test_stale_reader_cannot_write_back_after_update(cache: CRMCacheManager) -> None:
    """The race, step by step: miss, read old row, update+invalidate, stale write refused."""
    database = {"client-123": prefs(5, tz="UTC")}

    # Reader: misses and loads the row as it is now (version 5) ...
    assert cache.get_client_preferences("client-123") is None
    loaded_by_slow_reader = database["client-123"]

    # ... meanwhile a writer saves version 6 and invalidates the cache ...
    database["client-123"] = prefs(6, tz="America/Los_Angeles")
    assert cache.invalidate_client_preferences("client-123", version=6)

    # ... then the slow reader fills the cache with what it read: refused.
    assert cache.set_client_preferences(loaded_by_slow_reader) is False
    assert cache.get_client_preferences("client-123") is None

    # The next reader loads version 6 and may fill at once.
    assert cache.set_client_preferences(database["client-123"]) is True
    cached = cache.get_client_preferences("client-123")
    assert cached is not None
    assert cached.timezone == "America/Los_Angeles"


def test_plain_delete_would_let_the_stale_row_back(
    cache: CRMCacheManager, raw: redis.Redis
) -> None:
    """Control for the race test: with a plain DEL the stale write lands (why tombstones)."""
    cache.set_client_preferences(prefs(5))
    raw.delete("crm:prefs:client-123")
    assert cache.set_client_preferences(prefs(5)) is True


def test_invalidate_without_version_assumes_the_row_moved_on(cache: CRMCacheManager) -> None:
    """Without a version, the tombstone is one past the cached version: v5 refused, v6 ok."""
    cache.set_client_preferences(prefs(5))
    assert cache.invalidate_client_preferences("client-123")
    assert cache.set_client_preferences(prefs(5)) is False
    assert cache.set_client_preferences(prefs(6)) is True


def test_invalidate_without_version_and_nothing_cached_blocks_all(
    cache: CRMCacheManager, raw: redis.Redis
) -> None:
    """With nothing known, a bare tombstone refuses every write until it expires."""
    assert cache.invalidate_client_preferences("client-123")
    assert raw.get("crm:prefs:client-123") == b"T"
    assert cache.set_client_preferences(prefs(10**6)) is False
    raw.delete("crm:prefs:client-123")  # the tombstone expiring
    assert cache.set_client_preferences(prefs(1)) is True


def test_repeated_unversioned_invalidations_keep_moving_forward(
    cache: CRMCacheManager, raw: redis.Redis
) -> None:
    """A second unversioned invalidation bumps the tombstone again (T6 -> T7)."""
    cache.set_client_preferences(prefs(5))
    cache.invalidate_client_preferences("client-123")
    cache.invalidate_client_preferences("client-123")
    assert raw.get("crm:prefs:client-123") == b"T7"
    assert cache.set_client_preferences(prefs(6)) is False


def test_versioned_invalidation_never_lowers_the_tombstone(
    cache: CRMCacheManager, raw: redis.Redis
) -> None:
    """An out-of-order invalidation with an older version keeps the higher tombstone."""
    cache.invalidate_client_preferences("client-123", version=9)
    cache.invalidate_client_preferences("client-123", version=4)
    assert raw.get("crm:prefs:client-123") == b"T9"


def test_race_with_real_threads(cache: CRMCacheManager) -> None:
    """Two threads forced into the bad interleaving with events: no stale value survives."""
    database = {"row": prefs(5)}
    reader_loaded = threading.Event()
    writer_done = threading.Event()
    outcome: dict[str, bool] = {}

    def reader() -> None:
        assert cache.get_client_preferences("client-123") is None
        row = database["row"]
        reader_loaded.set()
        writer_done.wait(timeout=10)
        outcome["stale_write_stored"] = cache.set_client_preferences(row)

    def writer() -> None:
        reader_loaded.wait(timeout=10)
        database["row"] = prefs(6, tz="Asia/Tokyo")
        cache.invalidate_client_preferences("client-123", version=6)
        writer_done.set()

    threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert outcome == {"stale_write_stored": False}
    cached = cache.get_client_preferences("client-123")
    assert cached is None or cached.version == 6


def test_two_managers_share_versions(redis_url: str, raw: redis.Redis) -> None:
    """The version check is server-side: a second process/manager is held to it too."""
    with CRMCacheManager(redis_url=redis_url) as a, CRMCacheManager(redis_url=redis_url) as b:
        assert a.set_client_preferences(prefs(8))
        assert b.set_client_preferences(prefs(7)) is False
        got = b.get_client_preferences("client-123")
        assert got is not None
        assert got.version == 8


@pytest.mark.parametrize("version", [-1, 2**53])
def test_version_bounds(version: int) -> None:
    """Versions are non-negative and exact in Lua (below 2**53)."""
    with pytest.raises(ValueError, match="version"):
        ClientPreferences(client_id="c", version=version)


def test_invalid_timezone_is_rejected() -> None:
    """A timezone must be an IANA zone name."""
    with pytest.raises(ValueError, match="timezone"):
        ClientPreferences(client_id="c", timezone="Mars/Olympus")


# -- stored versions out of range, and int subclasses (issue 11) ------------------------


@pytest.mark.parametrize(
    "stored",
    [
        b"9223372036854775808:{}",
        b"99999999999999999999:{}",
        b"9007199254740992:{}",
        b"T9223372036854775808",
        b"T9007199254740992",
        b"T-9223372036854775808",
    ],
)
def test_out_of_range_stored_version_is_garbage(
    cache: CRMCacheManager, raw: redis.Redis, stored: bytes
) -> None:
    """A stored version above 2**53 - 1 is no version: a write may replace it, and an
    invalidation never turns it into a tombstone the scripts cannot read (version 2**63
    became "T-9223372036854775808", which dropped the stale-write guard)."""
    key = "crm:prefs:client-123"
    raw.set(key, stored)
    assert cache.set_client_preferences(prefs(3)) is True
    raw.set(key, stored)
    assert cache.invalidate_client_preferences("client-123") is True
    assert raw.get(key) == b"T"  # nothing known: refuse every write while it lives
    assert cache.set_client_preferences(prefs(3)) is False
    raw.set(key, stored)
    assert cache.invalidate_client_preferences("client-123", version=5) is True
    assert raw.get(key) == b"T5"
    assert cache.set_client_preferences(prefs(4)) is False
    assert cache.set_client_preferences(prefs(5)) is True


def test_unversioned_invalidation_of_the_last_version_stays_in_range(
    cache: CRMCacheManager, raw: redis.Redis
) -> None:
    """One past the largest version would be a tombstone no script reads as one: it stays
    at 2**53 - 1, which still refuses every older write."""
    last = 2**53 - 1
    assert cache.set_client_preferences(prefs(last)) is True
    assert cache.invalidate_client_preferences("client-123") is True
    assert raw.get("crm:prefs:client-123") == b"T%d" % last
    assert cache.set_client_preferences(prefs(last - 1)) is False


class _Numbers(IntEnum):
    VERSION = 7
    TTL = 120


def test_int_enum_version_and_ttl_are_plain_ints(cache: CRMCacheManager, raw: redis.Redis) -> None:
    """An IntEnum version reaches Redis as the int it is. redis-py refused it: the
    invalidation failed and was queued for a replay that could never succeed."""
    assert cache.invalidate_client_preferences("client-123", version=_Numbers.VERSION) is True
    assert raw.get("crm:prefs:client-123") == b"T7"
    stats = cache.get_cache_stats()
    assert stats["pending_invalidations"] == 0
    assert stats["counters"]["invalidations_failed"] == 0
    assert cache.set_client_preferences(prefs(7), ttl=_Numbers.TTL) is True
    assert 110_000 < raw.pttl("crm:prefs:client-123") <= 120_000


# -- models that skipped validation (issue 11, finding 10) -------------------------------

UNVALIDATED = [
    pytest.param({"client_id": "c1", "version": -5}, "version", id="negative-version"),
    pytest.param({"client_id": "c1", "version": 2**60}, "version", id="version-past-2**53"),
    pytest.param({"client_id": "c1", "timezone": "Nowhere/Atlantis"}, "timezone", id="zone"),
    pytest.param({"client_id": "c1", "language": ""}, "language", id="empty-language"),
    pytest.param({"client_id": "c1", "quiet_hours_start": 24}, "quiet_hours_start", id="hour"),
    pytest.param(
        {"client_id": "c1", "preferred_channels": ["fax"]},
        "preferred_channels",
        id="unknown-channel",
    ),
    pytest.param(
        {"client_id": "c1", "preferred_channels": None}, "preferred_channels", id="channels-none"
    ),
    pytest.param({"client_id": "c1", "opt_out": "maybe"}, "opt_out", id="opt-out-text"),
    pytest.param({"client_id": "c1", "version": "v2"}, "version", id="version-text"),
]


@pytest.mark.parametrize(("fields", "name"), UNVALIDATED)
def test_unvalidated_model_is_refused_before_writing(
    cache: CRMCacheManager, raw: redis.Redis, fields: dict[str, object], name: str
) -> None:
    """A ClientPreferences built with model_construct() holding a value validation refuses
    raises ValueError naming it, and nothing is written (before: True was returned, and the
    value read back as None, deleted as corrupt)."""
    bad = ClientPreferences.model_construct(**fields)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"preferences.*{name}"):
        cache.set_client_preferences(bad)
    assert raw.exists("crm:prefs:c1") == 0
    assert cache.get_client_preferences("c1") is None
    assert cache.get_cache_stats()["counters"]["corrupt_values"] == 0


def test_models_changed_behind_validation_are_refused(cache: CRMCacheManager) -> None:
    """A model changed through __dict__ or model_copy(update=...) is checked too."""
    changed = prefs(1)
    changed.__dict__["version"] = -1
    with pytest.raises(ValueError, match="version"):
        cache.set_client_preferences(changed)
    copied = prefs(1).model_copy(update={"timezone": "Mars/Olympus"})
    with pytest.raises(ValueError, match="timezone"):
        cache.set_client_preferences(copied)


def test_unvalidated_but_valid_model_is_stored_as_validation_makes_it(
    cache: CRMCacheManager,
) -> None:
    """model_construct() with valid values works; values validation would convert are
    stored converted, so what is written always reads back."""
    plain = ClientPreferences.model_construct(client_id="c1", timezone="Europe/Paris", version=2)
    assert cache.set_client_preferences(plain) is True
    assert cache.get_client_preferences("c1") == ClientPreferences(
        client_id="c1", timezone="Europe/Paris", version=2
    )
    loose = ClientPreferences.model_construct(
        client_id="c1", version="3", preferred_channels=("sms", "sms")
    )
    assert cache.set_client_preferences(loose) is True
    back = cache.get_client_preferences("c1")
    assert back is not None
    assert (back.version, back.preferred_channels) == (3, [MessageChannel.SMS])
    assert cache.get_cache_stats()["counters"]["corrupt_values"] == 0
