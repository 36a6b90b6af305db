"""Helpers shared by the test modules: polling with a deadline, test preferences, and
worker processes started together."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
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


def run_processes(
    worker: str,
    *args: str,
    go: Callable[[], object],
    count: int = 4,
    timeout: float = 120,
) -> list[str]:
    """Start ``count`` Python processes running the code ``worker`` (``sys.argv[1:]`` is
    ``args``; warnings are errors in them), call ``go`` once all are started (the workers
    wait for the signal it gives, so that they run at the same time), and return their
    standard outputs; fail if any exits non-zero, with the errors."""
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", worker, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(count)
    ]
    go()
    outputs = [p.communicate(timeout=timeout) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    return [out for out, _ in outputs]
