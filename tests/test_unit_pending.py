"""crmcache._pending without Redis: the bounded record of invalidations to replay."""

from __future__ import annotations

from crmcache._pending import (
    DEFAULT_MAX_PENDING,
    PendingEntry,
    PendingInvalidations,
    PendingKind,
)

PREFS = PendingKind.PREFERENCES
TEMPLATE = PendingKind.TEMPLATE


def versions(pending: PendingInvalidations) -> dict[str, int | None]:
    """Key -> version of every entry in the record."""
    return {e.key: e.version for e in pending.snapshot()}


def test_empty_record_is_falsy() -> None:
    """A new record holds nothing and has nothing to replay."""
    pending = PendingInvalidations()
    assert (len(pending), bool(pending), pending.snapshot()) == (0, False, [])
    assert (pending.prefs_overflowed, pending.templates_lost) == (False, 0)


def test_add_records_one_entry_per_key_oldest_first() -> None:
    """add() keeps each key's kind and version, and snapshot() lists them oldest first."""
    pending = PendingInvalidations()
    assert pending.add(PREFS, "crm:prefs:b", 3) is True
    assert pending.add(TEMPLATE, "crm:template:email:t") is True
    assert pending.add(PREFS, "crm:prefs:a", None) is True
    assert pending.snapshot() == [
        PendingEntry(PREFS, "crm:prefs:b", 3),
        PendingEntry(TEMPLATE, "crm:template:email:t", None),
        PendingEntry(PREFS, "crm:prefs:a", None),
    ]
    assert (len(pending), bool(pending)) == (3, True)


def test_snapshot_leaves_the_entries_in_place() -> None:
    """Entries stay after snapshot() until done(); the list returned is the caller's own."""
    pending = PendingInvalidations()
    pending.add(PREFS, "k", 1)
    first = pending.snapshot()
    first.clear()
    assert versions(pending) == {"k": 1}
    assert pending.snapshot() == [PendingEntry(PREFS, "k", 1)]


def test_pending_record_merges_versions() -> None:
    """One entry per key: the newer version wins, an unknown version beats a known one."""
    pending = PendingInvalidations(max_entries=10)
    pending.add(PendingKind.PREFERENCES, "k", 3)
    pending.add(PendingKind.PREFERENCES, "k", 5)
    assert [e.version for e in pending.snapshot()] == [5]
    pending.add(PendingKind.PREFERENCES, "k", 4)
    assert [e.version for e in pending.snapshot()] == [5]
    pending.add(PendingKind.PREFERENCES, "k", None)
    assert [e.version for e in pending.snapshot()] == [None]


def test_unknown_version_is_kept_over_a_later_known_one() -> None:
    """Once a key's version is unknown, a later known version does not replace it."""
    pending = PendingInvalidations()
    pending.add(PREFS, "k", None)
    assert pending.add(PREFS, "k", 9) is True
    assert versions(pending) == {"k": None}
    assert len(pending) == 1


def test_done_forgets_a_replayed_entry() -> None:
    """done() with the entry from the snapshot removes it; other keys stay."""
    pending = PendingInvalidations()
    pending.add(PREFS, "a", 1)
    pending.add(PREFS, "b", 2)
    entry_a, _ = pending.snapshot()
    pending.done(entry_a)
    assert versions(pending) == {"b": 2}


def test_replay_entry_survives_a_newer_failure() -> None:
    """done() keeps an entry that a newer failure replaced while it was being replayed."""
    pending = PendingInvalidations()
    pending.add(PendingKind.PREFERENCES, "k", 1)
    (entry,) = pending.snapshot()
    pending.add(PendingKind.PREFERENCES, "k", 2)
    pending.done(entry)
    assert [e.version for e in pending.snapshot()] == [2]


def test_done_of_an_entry_no_longer_recorded_is_a_no_op() -> None:
    """done() for a key already discarded neither raises nor touches other entries."""
    pending = PendingInvalidations()
    pending.add(PREFS, "k", 1)
    pending.add(PREFS, "other", 1)
    (entry, _) = pending.snapshot()
    pending.discard("k")
    pending.done(entry)
    assert versions(pending) == {"other": 1}


def test_discard_forgets_a_key() -> None:
    """discard() drops the key whatever its version; an unknown key is ignored."""
    pending = PendingInvalidations()
    pending.add(PREFS, "k", None)
    pending.add(TEMPLATE, "t")
    pending.discard("k")
    pending.discard("never-added")
    assert versions(pending) == {"t": None}
    pending.discard("t")
    assert (len(pending), bool(pending)) == (0, False)


def test_pending_record_is_bounded() -> None:
    """Past the bound, preference keys set the overflow flag; templates count as lost."""
    pending = PendingInvalidations(max_entries=1)
    assert pending.add(PendingKind.PREFERENCES, "a", 1)
    assert not pending.add(PendingKind.PREFERENCES, "b", 1)
    assert not pending.add(PendingKind.TEMPLATE, "t", None)
    assert (len(pending), pending.prefs_overflowed, pending.templates_lost) == (1, True, 1)


def test_full_record_still_merges_keys_it_holds() -> None:
    """At the bound, a key already recorded is updated, with no overflow and no loss."""
    pending = PendingInvalidations(max_entries=2)
    pending.add(PREFS, "a", 1)
    pending.add(TEMPLATE, "t")
    assert pending.add(PREFS, "a", 7) is True
    assert pending.add(TEMPLATE, "t") is True
    assert versions(pending) == {"a": 7, "t": None}
    assert (pending.prefs_overflowed, pending.templates_lost) == (False, 0)


def test_every_lost_template_is_counted() -> None:
    """Each template refused by a full record adds one to templates_lost."""
    pending = PendingInvalidations(max_entries=1)
    pending.add(PREFS, "a", 1)
    for i in range(3):
        assert pending.add(TEMPLATE, f"t{i}") is False
    assert pending.templates_lost == 3
    assert pending.prefs_overflowed is False
    assert versions(pending) == {"a": 1}


def test_room_freed_by_discard_is_used_again() -> None:
    """Once an entry is discarded, a new key fits again."""
    pending = PendingInvalidations(max_entries=1)
    pending.add(PREFS, "a", 1)
    pending.discard("a")
    assert pending.add(PREFS, "b", 2) is True
    assert versions(pending) == {"b": 2}
    assert pending.prefs_overflowed is False


def test_overflow_alone_makes_the_record_truthy_until_cleared() -> None:
    """With no entries left, the overflow flag still asks for a replay; clear_overflow ends it."""
    pending = PendingInvalidations(max_entries=1)
    pending.add(PREFS, "a", 1)
    pending.add(PREFS, "b", 1)
    pending.discard("a")
    assert (len(pending), bool(pending)) == (0, True)
    pending.clear_overflow()
    assert (pending.prefs_overflowed, bool(pending)) == (False, False)


def test_default_bound() -> None:
    """A record made without a bound holds DEFAULT_MAX_PENDING (10 000) keys, not one more."""
    pending = PendingInvalidations()
    assert DEFAULT_MAX_PENDING == 10_000
    for i in range(DEFAULT_MAX_PENDING):
        assert pending.add(PREFS, f"k{i}", i)
    assert pending.add(PREFS, "one-more", 1) is False
    assert (len(pending), pending.prefs_overflowed) == (DEFAULT_MAX_PENDING, True)
