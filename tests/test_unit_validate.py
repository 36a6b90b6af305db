"""Argument checks without Redis (``crmcache._validate``)."""

from __future__ import annotations

from enum import IntEnum

import pytest

from crmcache._validate import MAX_TTL, check_version, positive_int, seconds_to_ms, ttl_ms
from crmcache.models import MAX_VERSION


def test_ttl_in_whole_seconds_becomes_milliseconds() -> None:
    """A TTL is whole seconds up to MAX_TTL, returned in milliseconds."""
    assert ttl_ms("ttl", 30) == 30_000
    assert ttl_ms("ttl", MAX_TTL) == MAX_TTL * 1000
    with pytest.raises(ValueError, match="ttl must be at most"):
        ttl_ms("ttl", MAX_TTL + 1)
    with pytest.raises(TypeError, match="ttl must be an int"):
        ttl_ms("ttl", 1.5)
    with pytest.raises(ValueError, match="ttl must be > 0"):
        ttl_ms("ttl", 0)


def test_durations_round_down_to_at_least_one_millisecond() -> None:
    """A duration in fractional seconds is milliseconds, never 0, and below a day."""
    assert seconds_to_ms("ttl", 2) == 2000
    assert seconds_to_ms("ttl", 0.0001) == 1
    for bad in (0, -1, 86400):
        with pytest.raises(ValueError, match="ttl must be between"):
            seconds_to_ms("ttl", bad)
    with pytest.raises(TypeError, match="ttl must be a number"):
        seconds_to_ms("ttl", True)


def test_versions_are_optional_exact_integers() -> None:
    """A version is None or an int in [0, MAX_VERSION]; bools and floats are refused."""
    assert check_version("version", None) is None
    assert check_version("version", 0) == 0
    assert check_version("version", MAX_VERSION) == MAX_VERSION
    with pytest.raises(ValueError, match="version must be between"):
        check_version("version", MAX_VERSION + 1)
    with pytest.raises(ValueError, match="version must be between"):
        check_version("version", -1)
    for bad in (True, 1.0, "1"):
        with pytest.raises(TypeError, match="version must be an int or None"):
            check_version("version", bad)


def test_positive_int_raises_the_error_class_asked_for() -> None:
    """positive_int refuses bools and non-positive values, with the given ValueError class."""

    class CustomError(ValueError):
        pass

    assert positive_int("n", 3) == 3
    with pytest.raises(CustomError, match="n must be > 0"):
        positive_int("n", 0, error=CustomError)
    with pytest.raises(TypeError, match="n must be an int, not bool"):
        positive_int("n", False)


class _Numbers(IntEnum):
    SEVEN = 7


def test_int_subclasses_come_back_plain_ints() -> None:
    """An IntEnum member passes as the int it is, returned as a plain int: redis-py refuses
    to send an int subclass."""
    for value in (
        positive_int("n", _Numbers.SEVEN),
        check_version("version", _Numbers.SEVEN),
        ttl_ms("ttl", _Numbers.SEVEN),
    ):
        assert value in (7, 7000)
        assert type(value) is int
