"""crmcache._codec without Redis: stored formats of preferences, tombstones and templates."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from crmcache import ClientPreferences, MessageChannel
from crmcache import _codec as codec
from crmcache._codec import (
    FAST_CHECK,
    CorruptValue,
    _plainly_valid,
    check_preferences,
    check_template_content,
    check_tombstone,
    clone_preferences,
    decode_preferences,
    decode_template,
    encode_preferences,
    encode_template,
    is_tombstone,
)
from crmcache.models import MAX_VERSION

FULL = ClientPreferences(
    client_id="client-ü-42",
    preferred_channels=[MessageChannel.WHATSAPP, MessageChannel.SMS],
    timezone="America/Los_Angeles",
    language="de-CH-1996",
    opt_out=True,
    quiet_hours_start=22,
    quiet_hours_end=6,
    version=2**53 - 1,
)


def test_encoded_preferences_are_version_colon_json() -> None:
    """The stored form is b'<version>:' followed by the model's JSON, nothing else."""
    raw = encode_preferences(ClientPreferences(client_id="c1", version=7))
    head, sep, body = raw.partition(b":")
    assert (head, sep) == (b"7", b":")
    assert json.loads(body) == ClientPreferences(client_id="c1", version=7).model_dump(mode="json")


@pytest.mark.parametrize(
    "prefs",
    [
        ClientPreferences(client_id="c"),
        FULL,
        ClientPreferences(client_id="e", preferred_channels=[]),
    ],
    ids=["defaults", "every-field", "no-channels"],
)
def test_preferences_round_trip(prefs: ClientPreferences) -> None:
    """decode(encode(p)) gives back p, field for field."""
    decoded = decode_preferences(encode_preferences(prefs), prefs.client_id)
    assert decoded == prefs
    assert decoded.model_dump() == prefs.model_dump()


@pytest.mark.parametrize("raw", [b"T", b"T0", b"T12"])
def test_tombstones_are_detected(raw: bytes) -> None:
    """Tombstones, with or without a version, start with T."""
    assert is_tombstone(raw) is True


@pytest.mark.parametrize(
    "raw", [b"", b"3:{}", encode_preferences(FULL), b"t5"], ids=["empty", "value", "full", "lower"]
)
def test_values_are_not_tombstones(raw: bytes) -> None:
    """Stored values (and an empty or lower-case 't' string) are not tombstones."""
    assert is_tombstone(raw) is False


def test_encoded_preferences_never_look_like_a_tombstone() -> None:
    """An encoded value starts with its version digits, so it is never taken for a tombstone."""
    assert is_tombstone(encode_preferences(ClientPreferences(client_id="T", version=0))) is False


def _json(version: int) -> bytes:
    """The JSON of client c1's preferences at ``version``."""
    return ClientPreferences(client_id="c1", version=version).model_dump_json().encode()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"no prefix at all", "missing version prefix"),
        (b"T5", "missing version prefix"),
        (b":" + _json(0), "missing version prefix"),
        (b"v3:" + _json(3), "missing version prefix"),
        (b"-3:" + _json(3), "missing version prefix"),
        (b"3:not json", "invalid preferences JSON"),
        (b"3:{}", "invalid preferences JSON"),
        (
            b'3:{"client_id": "c1", "timezone": "Mars/Olympus", "version": 3}',
            "invalid preferences JSON",
        ),
        (b"3:" + _json(3)[:-1], "invalid preferences JSON"),
        (b"4:" + _json(3), "version prefix does not match"),
        (b"3:" + _json(3).replace(b'"c1"', b'"c2"'), "another client"),
        (b"00000000000000003:" + _json(3), "version prefix out of range"),
        (b"9" * 5000 + b":" + _json(3), "version prefix out of range"),
    ],
    ids=[
        "no-colon",
        "tombstone",
        "empty-prefix",
        "letter-prefix",
        "negative-prefix",
        "not-json",
        "missing-client-id",
        "invalid-field",
        "truncated",
        "version-mismatch",
        "another-client",
        "17-digit-prefix",
        "5000-digit-prefix",
    ],
)
def test_corrupt_preferences_raise_corrupt_value(raw: bytes, reason: str) -> None:
    """Anything but '<version>:<valid JSON of that version, of client c1>' at c1's key raises
    CorruptValue saying why."""
    with pytest.raises(CorruptValue, match=reason):
        decode_preferences(raw, "c1")


def test_a_version_prefix_may_have_leading_zeros() -> None:
    """The scripts read "007:" as version 7; so does decoding (16 digits at most)."""
    assert decode_preferences(b"007:" + _json(7), "c1").version == 7
    assert decode_preferences(b"%016d:" % 7 + _json(7), "c1").version == 7


@pytest.mark.parametrize("raw", [b"T", b"T0", b"T12", b"T%d" % MAX_VERSION, b"T007"])
def test_tombstones_the_scripts_read_pass_the_check(raw: bytes) -> None:
    """A bare tombstone, or one whose version is within [0, MAX_VERSION], is well-formed."""
    check_tombstone(raw)


@pytest.mark.parametrize(
    "raw",
    [b"T%d" % (MAX_VERSION + 1), b"T9223372036854775808", b"T-9223372036854775808", b"T5x", b"T "],
)
def test_tombstones_the_scripts_cannot_read_are_corrupt(raw: bytes) -> None:
    """prefs_invalidate.lua once wrote "T-9223372036854775808": neither script reads a
    version from it, so it guards nothing."""
    with pytest.raises(CorruptValue, match="malformed tombstone"):
        check_tombstone(raw)


def test_clone_is_equal_and_independent() -> None:
    """A clone equals the original; changing it (its channel list too) leaves the original."""
    clone = clone_preferences(FULL)
    assert clone == FULL
    assert clone is not FULL
    clone.timezone = "UTC"
    clone.preferred_channels.append(MessageChannel.EMAIL)
    assert FULL.timezone == "America/Los_Angeles"
    assert FULL.preferred_channels == [MessageChannel.WHATSAPP, MessageChannel.SMS]


def test_clone_still_validates_assignments() -> None:
    """Assigning an invalid value to a clone raises, as on any ClientPreferences."""
    clone = clone_preferences(FULL)
    with pytest.raises(ValidationError):
        clone.timezone = "Mars/Olympus"


@pytest.mark.parametrize(
    "text", ["", "<p>Hello {name}</p>", "Grüße, 你好 👋"], ids=["empty", "ascii", "unicode"]
)
def test_template_round_trip_is_utf8(text: str) -> None:
    """Templates are stored as their UTF-8 bytes and decode back to the same text."""
    assert encode_template(text) == text.encode("utf-8")
    assert decode_template(encode_template(text)) == text


def test_lone_surrogate_cannot_be_encoded() -> None:
    """Text UTF-8 cannot carry (a lone surrogate) raises ValueError, not UnicodeEncodeError."""
    with pytest.raises(ValueError, match="not encodable as UTF-8") as info:
        encode_template("bad \ud800 text")
    assert not isinstance(info.value, UnicodeError)


@pytest.mark.parametrize(
    "raw",
    [b"\xff\xfe", b"caf\xe9", b"\xed\xa0\x80", b"\xe2\x82"],
    ids=["invalid-start", "latin-1", "encoded-surrogate", "truncated"],
)
def test_invalid_utf8_template_raises_corrupt_value(raw: bytes) -> None:
    """Stored bytes that are not valid UTF-8 raise CorruptValue."""
    with pytest.raises(CorruptValue, match="not valid UTF-8"):
        decode_template(raw)


def test_template_content_is_checked_and_encoded_within_the_byte_limit() -> None:
    """Content is a str whose UTF-8 form fits max_bytes (counted in bytes, not characters)."""
    assert check_template_content("héllo", 6) == "héllo".encode()
    with pytest.raises(ValueError, match="content is 7 bytes; the limit is 6"):
        check_template_content("hé llo", 6)
    with pytest.raises(TypeError, match="content must be a str, not bytes"):
        check_template_content(b"hello", 100)
    with pytest.raises(ValueError, match="not encodable as UTF-8"):
        check_template_content("\ud800", 100)


# -- check_preferences: models that skipped validation ----------------------------------

#: Values of every kind for every field: valid ones, their edges, and wrong types.
_ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.sampled_from([0, 1, 23, 24, -1, 2**53 - 1, 2**53, 35, 36, 64, 65, 256, 257]),
    st.floats(allow_nan=True),
    st.text(max_size=300),
    st.sampled_from(["UTC", "Europe/Berlin", "Nowhere/X", "", " ", "en", "x" * 257]),
    st.lists(st.sampled_from([*MessageChannel, "sms", "fax", 1, None]), max_size=4),
    st.tuples(st.sampled_from(list(MessageChannel))),
)


_VALID = ClientPreferences(client_id="c", timezone="Europe/Berlin", quiet_hours_start=3)
_FAST_PATH_SEEN: list[bool] = []


#: Per field: values of the right type, in and just out of the model's bounds.
_NEAR = {
    "client_id": st.text(max_size=260),
    "preferred_channels": st.lists(st.sampled_from(list(MessageChannel)), max_size=4),
    "timezone": st.sampled_from(["UTC", "Europe/Berlin", "Nowhere/X", "", "x" * 65]),
    "language": st.text(max_size=40),
    "opt_out": st.booleans(),
    "quiet_hours_start": st.one_of(st.none(), st.integers(-2, 26)),
    "quiet_hours_end": st.one_of(st.none(), st.integers(-2, 26)),
    "version": st.one_of(st.integers(-2, 10), st.sampled_from([2**53 - 1, 2**53, 2**63])),
}


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(
    changes=st.one_of(
        st.fixed_dictionaries({}, optional=_NEAR),
        st.dictionaries(st.sampled_from(list(ClientPreferences.model_fields)), _ANY, max_size=2),
    )
)
def test_fast_check_accepts_only_what_validation_accepts(changes: dict[str, object]) -> None:
    """The fast path of check_preferences (exact types, the model's bounds) never passes
    a model that validation would refuse; check_preferences always returns a valid model
    or raises ValueError naming the field."""
    check_preferences(_VALID)  # the fast check learns the time zones validation accepted
    check_preferences(ClientPreferences(client_id="c"))
    model = ClientPreferences.model_construct(**{**_VALID.__dict__, **changes})  # type: ignore[arg-type]
    if _plainly_valid(model.__dict__):
        _FAST_PATH_SEEN.append(True)
        ClientPreferences.model_validate(dict(model.__dict__))  # raises if the check lied
    try:
        checked = check_preferences(model)
    except ValueError as exc:
        refused = str(exc)
    else:
        assert ClientPreferences.model_validate_json(checked.model_dump_json()) == checked
        return
    assert refused.startswith("preferences is not a valid ClientPreferences")


def test_fast_check_was_exercised() -> None:
    """The property above reached the fast path often (else it proved nothing)."""
    if not _FAST_PATH_SEEN:
        test_fast_check_accepts_only_what_validation_accepts()
    assert len(_FAST_PATH_SEEN) >= 50


def test_fast_check_knows_every_field() -> None:
    """The fast check covers the model's fields (a new field turns it off: this fails so
    that _plainly_valid is taught the field)."""
    assert FAST_CHECK is True


def test_validated_models_take_the_fast_path() -> None:
    """A validated model is returned as is (no copy, no second validation)."""
    check_preferences(FULL)  # teaches the fast check FULL's time zone
    assert check_preferences(FULL) is FULL
    assert _plainly_valid(FULL.__dict__)


def test_decoded_values_are_memoized_but_never_shared() -> None:
    """A repeat of the same bytes is answered from the memo: equal preferences, a new
    object each time, so a caller's change never reaches the next reader."""
    prefs = ClientPreferences(client_id="memo-1", version=7, preferred_channels=["sms"])
    raw = encode_preferences(prefs)
    first = decode_preferences(raw, "memo-1")
    first.preferred_channels.append(MessageChannel.EMAIL)
    first.timezone = "Europe/Paris"
    second = decode_preferences(raw, "memo-1")
    assert second == prefs
    assert second is not first
    assert second.preferred_channels is not first.preferred_channels
    # The same bytes under another client's key are still refused.
    with pytest.raises(CorruptValue, match="another client"):
        decode_preferences(raw, "memo-2")
    # Distinct values never grow the memo past its bound.
    for i in range(codec.DECODE_MEMO_SIZE + 10):
        other = ClientPreferences(client_id=f"memo-{i}", version=1)
        assert decode_preferences(encode_preferences(other), f"memo-{i}") == other
        assert len(codec._DECODED) <= codec.DECODE_MEMO_SIZE
