"""One look at the server for ``crmcache stats`` (and ``--watch``): every primary's ``INFO``
and the cache's keys per kind, counted with ``SCAN`` within a time budget (never ``KEYS``).

The figures are made from the samples by :mod:`crmcache._serverstats` (pure logic).
Nothing here goes through the circuit breaker: a monitor asks every time, so it sees
the server come back the moment it does, and a failure is reported (per node), never
counted against the service's breaker (the manager it uses is the command's own).
"""

from __future__ import annotations

import time
from typing import cast

from redis.exceptions import RedisError

from .._codec import is_tombstone
from .._serverstats import KeyKind, NodeSample, ServerSample, info_fields, key_kind
from .._stats import SCAN_COUNT
from .core import AsyncCacheCore
from .transport import AsyncAdminNode, AsyncTransport

__all__ = ["sample_server"]

#: SCAN budget per sample, in seconds, unless told.
DEFAULT_SCAN_BUDGET = 0.5


async def sample_server(
    manager: AsyncCacheCore, *, scan_budget: float = DEFAULT_SCAN_BUDGET
) -> ServerSample:
    """Every primary's INFO fields and the manager's keys per kind (``SCAN MATCH
    <prefix>:*``, at most ``scan_budget`` seconds per node). Never raises a Redis error:
    a node that cannot be asked is a sample with its ``error``."""
    transport = manager._active()
    if transport is None:
        reason = "the cache manager is closed or disabled"
        return ServerSample(
            time.monotonic(), time.time(), None, (NodeSample("-", 0.0, None, error=reason),)
        )
    await transport.refresh()
    primaries = list(transport.primaries())
    nodes: list[NodeSample] = []
    if not primaries:
        nodes.append(NodeSample("-", time.monotonic(), None, error=await _why(manager, transport)))
    for node in primaries:
        nodes.append(await _sample_node(manager, transport, node, scan_budget))
    return ServerSample(time.monotonic(), time.time(), transport.topology.value, tuple(nodes))


async def _why(manager: AsyncCacheCore, transport: AsyncTransport) -> str:
    try:
        await transport.ping()
    except (RedisError, OSError) as exc:
        return manager._guard.describe(exc)
    return "no primary known yet"


async def _sample_node(
    manager: AsyncCacheCore, transport: AsyncTransport, node: AsyncAdminNode, budget: float
) -> NodeSample:
    """One primary's INFO, then its keys per kind (a sample if SCAN ran out of time)."""
    try:
        reply = await node.execute("INFO")
    except (RedisError, OSError) as exc:
        return NodeSample(node.address, time.monotonic(), None, error=manager._guard.describe(exc))
    at = time.monotonic()
    info = info_fields(reply) if isinstance(reply, bytes | str) else None
    if info is None:
        return NodeSample(node.address, at, None, error="the reply to INFO is not an INFO reply")
    counts = dict.fromkeys(KeyKind, 0)
    own = [0, 0]  # this sampler's hits and misses (the MGETs below)
    keys = manager._keys
    deadline = time.monotonic() + budget
    cursor: bytes = b"0"
    try:
        while True:
            scanned = await node.execute(
                "SCAN", cursor, "MATCH", keys.scan_pattern, "COUNT", SCAN_COUNT
            )
            cursor, batch = cast("tuple[bytes, list[bytes]]", scanned)
            prefs: list[str] = []
            for key in batch:
                kind = key_kind(key, keys)
                if kind is KeyKind.PREFERENCES:
                    prefs.append(key.decode("utf-8", "replace"))
                else:
                    counts[kind] += 1
            if prefs:
                # A tombstone is a preferences key whose value starts with T: read them
                # in one MGET per slot (expired since SCAN: None, not counted).
                for value in await transport.mget(prefs):
                    own[value is None] += 1
                    if value is None:
                        continue
                    tombstone = is_tombstone(value)
                    counts[KeyKind.TOMBSTONES if tombstone else KeyKind.PREFERENCES] += 1
            exact = cursor in (b"0", 0, "0")
            if exact or time.monotonic() > deadline:
                return NodeSample(node.address, at, info, counts, exact, None, *own)
    except (RedisError, OSError) as exc:
        error = f"counting keys: {manager._guard.describe(exc)}"
        return NodeSample(node.address, at, info, counts, False, error, *own)
