"""Argument checks shared by settings and calls: clear errors that name the argument.

Every int comes back a plain ``int``: a subclass (an ``IntEnum`` member) is accepted, but
redis-py refuses to send one, so it is converted here, at the boundary.
"""

from __future__ import annotations

import math

from .models import MAX_VERSION

__all__ = ["MAX_TTL", "brief", "check_version", "positive_int", "seconds_to_ms", "ttl_ms"]

#: Longest TTL or rate-limit window accepted, in seconds (ten years).
MAX_TTL = 10 * 365 * 86400
#: Ints longer than this many bits (about 39 digits) are described, not printed: Python
#: refuses to print one of more than 4,300 digits, and a message should stay short.
_PRINTABLE_BITS = 128


def brief(value: object) -> str:
    """``value`` for an error message: as it is, or an int too long to print described by
    its size."""
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value.bit_length() > _PRINTABLE_BITS
    ):
        digits = math.floor(value.bit_length() * math.log10(2)) + 1
        return f"{'-' if value < 0 else ''}an int of about {digits} digits"
    return str(value)


def positive_int(name: str, value: object, *, error: type[ValueError] = ValueError) -> int:
    """Return ``value`` as a plain int if it is an int > 0.

    Args:
        name: the argument's name, used in the message.
        value: what the caller passed.
        error: the ValueError subclass to raise for a value out of range.

    Raises:
        TypeError: ``value`` is not an int (``bool`` is refused too).
        ValueError: ``value`` is <= 0 (as ``error``).
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value <= 0:
        raise error(f"{name} must be > 0, got {brief(value)}")
    return value if type(value) is int else int(value)


def ttl_ms(name: str, seconds: object) -> int:
    """A TTL argument in whole seconds, validated, as milliseconds.

    Raises:
        TypeError: not an int. ValueError: <= 0 or longer than :data:`MAX_TTL`.
    """
    value = positive_int(name, seconds)
    if value > MAX_TTL:
        raise ValueError(f"{name} must be at most {MAX_TTL} seconds, got {brief(value)}")
    return value * 1000


def seconds_to_ms(name: str, seconds: object) -> int:
    """A duration argument in (fractional) seconds, validated, as milliseconds (>= 1).

    Raises:
        TypeError: not a number. ValueError: not within (0, 86400).
    """
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise TypeError(f"{name} must be a number of seconds, not {type(seconds).__name__}")
    if not 0 < seconds < 86400:
        raise ValueError(f"{name} must be between 0 and 86400 seconds, got {brief(seconds)}")
    return max(int(seconds * 1000), 1)


def check_version(name: str, version: object, *, optional: bool = True) -> int | None:
    """A row version: an int in ``[0, MAX_VERSION]`` (as a plain int), or None if
    ``optional``.

    Raises:
        TypeError: not an int (``bool`` is refused), nor None when that is allowed.
        ValueError: out of range.
    """
    if version is None and optional:
        return None
    if isinstance(version, bool) or not isinstance(version, int):
        expected = "an int or None" if optional else "an int"
        raise TypeError(f"{name} must be {expected}, not {type(version).__name__}")
    if not 0 <= version <= MAX_VERSION:
        raise ValueError(f"{name} must be between 0 and {MAX_VERSION}, got {brief(version)}")
    return version if type(version) is int else int(version)
