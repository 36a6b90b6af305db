"""Helpers shared by the test modules: polling with a deadline, and test preferences."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from crmcache import ClientPreferences, MessageChannel


def _timed_out(timeout: float, what: str) -> AssertionError:
    detail = f": {what}" if what else ""
    return AssertionError(f"condition not reached within {timeout} s{detail}")


def poll(
    condition: Callable[[], object],
    *,
    timeout: float = 5.0,
    what: str = "",
    interval: float = 0.001,
) -> float:
    """Wait until ``condition()`` is truthy; return the seconds it took.

    Raises:
        AssertionError: ``timeout`` seconds passed first (the message names ``what``).
    """
    started = time.monotonic()
    deadline = started + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise _timed_out(timeout, what)
        time.sleep(interval)
    return time.monotonic() - started


async def apoll(
    condition: Callable[[], object],
    *,
    timeout: float = 5.0,
    what: str = "",
    interval: float = 0.001,
) -> float:
    """:func:`poll` for a coroutine: sleeps with ``asyncio.sleep``, yielding to the loop."""
    started = time.monotonic()
    deadline = started + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise _timed_out(timeout, what)
        await asyncio.sleep(interval)
    return time.monotonic() - started


def prefs(version: int = 0, client_id: str = "client-123", tz: str = "UTC") -> ClientPreferences:
    """Preferences of ``client_id`` as the database row at ``version`` would hold them
    (0: a new row)."""
    return ClientPreferences(
        client_id=client_id,
        timezone=tz,
        preferred_channels=[MessageChannel.SMS, MessageChannel.EMAIL],
        language="de",
        version=version,
    )
