"""Argument checks shared by settings and calls: clear errors that name the argument."""

from __future__ import annotations

__all__ = ["positive_int"]


def positive_int(name: str, value: object, *, error: type[ValueError] = ValueError) -> int:
    """Return ``value`` if it is an int > 0.

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
        raise error(f"{name} must be > 0, got {value}")
    return value
