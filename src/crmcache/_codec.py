"""Encoding of cached values: pydantic/orjson JSON and UTF-8, nothing else (never pickle).

Stored formats::

    preferences   b"<version>:<json>"   the version prefix lets Lua compare versions
                                         without parsing JSON
    tombstone     b"T<version>" | b"T"   left by an invalidation (see prefs_invalidate.lua)
    template      UTF-8 text

A version is at most 16 decimal digits and at most ``MAX_VERSION`` (2**53 - 1, exact in
Lua); the Lua scripts take anything else for garbage that a write may replace.

A value that fails to decode raises :class:`CorruptValue`; the manager treats it as a
miss, deletes it and counts it.
"""

from __future__ import annotations

from typing import Any, Final

from annotated_types import Ge, Le, MaxLen, MinLen
from pydantic import ValidationError

from .models import MAX_VERSION, ClientPreferences, MessageChannel

__all__ = [
    "WRONG_TYPE",
    "CorruptValue",
    "check_preferences",
    "check_template_content",
    "check_tombstone",
    "clone_preferences",
    "decode_preferences",
    "decode_template",
    "encode_preferences",
    "encode_template",
    "is_tombstone",
]


#: A GET that found a value of another type (reported by the transport, not raised).
WRONG_TYPE: Final = object()

_NEW = object.__new__
_SET = object.__setattr__


class CorruptValue(Exception):  # noqa: N818 - internal signal, never reaches callers
    """A cached value could not be decoded."""


def _limits(name: str) -> tuple[int, int]:
    """A field's length or value bounds, as the model declares them."""
    low, high = -(2**63), 2**63
    for item in ClientPreferences.model_fields[name].metadata:
        if isinstance(item, MinLen):
            low = item.min_length
        elif isinstance(item, MaxLen):
            high = item.max_length
        elif isinstance(item, Ge):
            low = int(item.ge)  # type: ignore[call-overload]
        elif isinstance(item, Le):
            high = int(item.le)  # type: ignore[call-overload]
    return low, high


#: The fields :func:`_plainly_valid` knows. Should the model gain or lose one, the fast
#: check turns itself off and every write is validated in full (safe, slower).
_KNOWN_FIELDS: Final = frozenset(
    {
        "client_id",
        "preferred_channels",
        "timezone",
        "language",
        "opt_out",
        "quiet_hours_start",
        "quiet_hours_end",
        "version",
    }
)
FAST_CHECK: Final = set(ClientPreferences.model_fields) == _KNOWN_FIELDS
_ID_MIN, _ID_MAX = _limits("client_id")
_TZ_MIN, _TZ_MAX = _limits("timezone")
_LANG_MIN, _LANG_MAX = _limits("language")
_QS_MIN, _QS_MAX = _limits("quiet_hours_start")
_QE_MIN, _QE_MAX = _limits("quiet_hours_end")
_VERSION_MIN, _VERSION_MAX = _limits("version")
#: Time zone names a full validation accepted (the model checks them against tzdata).
_ZONES_SEEN: set[str] = set()
_MAX_ZONES_SEEN = 1024


def _plainly_valid(fields: dict[str, Any]) -> bool:
    """True only if every value is of exactly the type validation gives it and within the
    model's bounds: then the model is valid. False means "not sure", never "invalid"."""
    try:
        client_id = fields["client_id"]
        channels = fields["preferred_channels"]
        zone = fields["timezone"]
        language = fields["language"]
        start = fields["quiet_hours_start"]
        end = fields["quiet_hours_end"]
        version = fields["version"]
        opt_out = fields["opt_out"]
    except KeyError:
        return False
    if not (
        len(fields) == 8
        and type(client_id) is str
        and _ID_MIN <= len(client_id) <= _ID_MAX
        and type(zone) is str
        and zone in _ZONES_SEEN
        and _TZ_MIN <= len(zone) <= _TZ_MAX
        and type(language) is str
        and _LANG_MIN <= len(language) <= _LANG_MAX
        and type(opt_out) is bool
        and type(version) is int
        and _VERSION_MIN <= version <= _VERSION_MAX
        and (start is None or (type(start) is int and _QS_MIN <= start <= _QS_MAX))
        and (end is None or (type(end) is int and _QE_MIN <= end <= _QE_MAX))
        and type(channels) is list
    ):
        return False
    for channel in channels:
        if type(channel) is not MessageChannel:
            return False
    # Validation drops repeated channels: a list with repeats is not what a reader gets.
    return len(channels) < 2 or len(set(channels)) == len(channels)


def check_preferences(prefs: ClientPreferences) -> ClientPreferences:
    """``prefs`` if it is valid, else the validated copy validation makes of it.

    A ClientPreferences built with ``model_construct()`` (or changed through its
    ``__dict__``, or copied with ``model_copy(update=...)``) skipped validation: written
    as it is, it would be refused by every reader (and deleted as corrupt). The common
    case, a validated model, costs a few type checks; anything else is validated in full.

    Raises:
        ValueError: ``prefs`` holds a value validation refuses (the message names the
            field).
    """
    if FAST_CHECK and _plainly_valid(prefs.__dict__):
        return prefs
    try:
        checked = ClientPreferences.model_validate(dict(prefs.__dict__))
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in error["loc"]) or "(model)"
        raise ValueError(
            f"preferences is not a valid ClientPreferences (built without validation?): "
            f"{where}: {error['msg']}"
        ) from None
    if len(_ZONES_SEEN) >= _MAX_ZONES_SEEN:
        _ZONES_SEEN.clear()
    _ZONES_SEEN.add(checked.timezone)
    return checked


def encode_preferences(prefs: ClientPreferences) -> bytes:
    """Serialize preferences with their version prefix."""
    return b"%d:%s" % (prefs.version, prefs.model_dump_json().encode())


#: Most digits a stored version has (MAX_VERSION has 16).
_VERSION_DIGITS = len(str(MAX_VERSION))


def is_tombstone(raw: bytes) -> bool:
    """True if ``raw`` is an invalidation tombstone rather than a value (it may still be
    a malformed one: see :func:`check_tombstone`)."""
    return raw[:1] == b"T"


def _is_version(digits: bytes) -> bool:
    """True if ``digits`` is a version the Lua scripts read as one."""
    return 0 < len(digits) <= _VERSION_DIGITS and digits.isdigit() and int(digits) <= MAX_VERSION


def check_tombstone(raw: bytes) -> None:
    """Check a tombstone (``raw`` starts with ``T``) is one the scripts recognise.

    Raises:
        CorruptValue: ``raw`` is neither ``T`` nor ``T<version>`` (such a thing refuses no
            write, so it only hides the client's preferences until it expires).
    """
    if raw != b"T" and not _is_version(raw[1:]):
        raise CorruptValue("malformed tombstone")


#: Values decoded at most, and the longest decoded value kept (see decode_preferences).
DECODE_MEMO_SIZE: Final = 1024
DECODE_MEMO_MAX_BYTES: Final = 4096
#: Stored value -> its decoded preferences, never handed out (callers get clones).
_DECODED: dict[bytes, ClientPreferences] = {}


def decode_preferences(raw: bytes, client_id: str) -> ClientPreferences:
    """Decode a stored preferences value (not a tombstone) found at ``client_id``'s key.

    Decoding is a pure function of the bytes, and validation is most of a hit's client
    cost, so the values read last are decoded once: a memo maps up to
    :data:`DECODE_MEMO_SIZE` values (of at most :data:`DECODE_MEMO_MAX_BYTES`) to their
    decoded preferences, and a repeat gets a clone of them. A changed value is other bytes,
    so it can never be answered from the memo (this is no cache of keys: nothing in it
    can be stale). It is emptied when full; under threads each of its operations is one
    atomic dict operation.

    Returns:
        Preferences of the caller's own (a change to them touches nothing else).

    Raises:
        CorruptValue: the bytes are not ``<version>:<json>`` of a valid
            :class:`ClientPreferences` of ``client_id`` whose version matches the prefix
            (a version of at most 16 digits, at most ``MAX_VERSION``).
    """
    known = _DECODED.get(raw) if type(raw) is bytes else None
    if known is not None:
        if known.client_id != client_id:
            raise CorruptValue("the value belongs to another client")
        return clone_preferences(known)
    prefs = _decode_preferences(raw, client_id)
    if type(raw) is bytes and len(raw) <= DECODE_MEMO_MAX_BYTES:
        if len(_DECODED) >= DECODE_MEMO_SIZE:
            _DECODED.clear()
        _DECODED[raw] = clone_preferences(prefs)
    return prefs


def _decode_preferences(raw: bytes, client_id: str) -> ClientPreferences:
    head, sep, body = raw.partition(b":")
    if not sep or not head.isdigit():
        raise CorruptValue("missing version prefix")
    if len(head) > _VERSION_DIGITS:
        # Also keeps int() from refusing (and raising) a prefix of thousands of digits.
        raise CorruptValue("version prefix out of range")
    try:
        prefs = ClientPreferences.model_validate_json(body)
    except ValidationError as exc:
        raise CorruptValue(f"invalid preferences JSON ({exc.error_count()} errors)") from None
    if prefs.version != int(head):
        # The JSON's version is within [0, MAX_VERSION] (validated): so is the prefix.
        raise CorruptValue("version prefix does not match the JSON")
    if prefs.client_id != client_id:
        raise CorruptValue("the value belongs to another client")
    return prefs


def clone_preferences(prefs: ClientPreferences) -> ClientPreferences:
    """A copy the caller may change without touching ``prefs`` (its list is copied too).

    The near cache hands out copies: the spec's callers edit what they read
    (``preferences.timezone = ...``) before saving it.
    """
    # What BaseModel.__copy__ does, without its three copy.copy() calls (half the cost
    # of a near-cache hit): a new instance over a copy of the field values.
    copy = _NEW(ClientPreferences)
    fields = prefs.__dict__.copy()
    fields["preferred_channels"] = list(fields["preferred_channels"])
    _SET(copy, "__dict__", fields)
    _SET(copy, "__pydantic_fields_set__", set(prefs.__pydantic_fields_set__))
    _SET(copy, "__pydantic_extra__", None)
    _SET(copy, "__pydantic_private__", None)
    return copy


def encode_template(content: str) -> bytes:
    """Encode template text as UTF-8.

    Raises:
        ValueError: ``content`` holds lone surrogates that UTF-8 cannot carry.
    """
    try:
        return content.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"content is not encodable as UTF-8: {exc.reason}") from None


def check_template_content(content: object, max_bytes: int) -> bytes:
    """Validate a template's text and return it encoded.

    Raises:
        TypeError: ``content`` is not a str.
        ValueError: it holds lone surrogates, or is larger than ``max_bytes`` UTF-8 bytes.
    """
    if not isinstance(content, str):
        raise TypeError(f"content must be a str, not {type(content).__name__}")
    data = encode_template(content)
    if len(data) > max_bytes:
        raise ValueError(
            f"content is {len(data)} bytes; the limit is {max_bytes} (max_template_bytes)"
        )
    return data


def decode_template(raw: bytes) -> str:
    """Decode a stored template.

    Raises:
        CorruptValue: the bytes are not valid UTF-8.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptValue("template is not valid UTF-8") from None
