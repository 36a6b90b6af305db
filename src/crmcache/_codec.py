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

from typing import Final

from pydantic import ValidationError

from .models import MAX_VERSION, ClientPreferences

__all__ = [
    "WRONG_TYPE",
    "CorruptValue",
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


def decode_preferences(raw: bytes, client_id: str) -> ClientPreferences:
    """Decode a stored preferences value (not a tombstone) found at ``client_id``'s key.

    Raises:
        CorruptValue: the bytes are not ``<version>:<json>`` of a valid
            :class:`ClientPreferences` of ``client_id`` whose version matches the prefix
            (a version of at most 16 digits, at most ``MAX_VERSION``).
    """
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
