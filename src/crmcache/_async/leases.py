"""Database-load leases: one process loads a missed row, the others wait for the fill
(``<prefix>:lease:prefs:<client_id>``, a few seconds' TTL)."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable

from .._config import DEFAULT_LEASE_TTL
from .._guard import FAILED
from .._keys import check_id
from .._validate import seconds_to_ms
from ..models import LeaseState
from .core import AsyncCacheCore

__all__ = ["AsyncLeasesMixin", "AsyncLoadLease"]


class AsyncLoadLease:
    """A database-load lease; ``release()`` is a no-op unless it was acquired."""

    __slots__ = ("_release", "state")

    def __init__(
        self, state: LeaseState, release: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        self.state = state
        self._release = release

    async def release(self) -> None:
        """Give the lease up (idempotent)."""
        release, self._release = self._release, None
        if release is not None:
            await release()

    def __repr__(self) -> str:
        return f"LoadLease({self.state.value})"


class AsyncLeasesMixin(AsyncCacheCore):
    """``acquire_load_lease``."""

    async def acquire_load_lease(
        self, client_id: str, ttl: float = DEFAULT_LEASE_TTL
    ) -> AsyncLoadLease:
        """Try to become the one process that loads ``client_id``'s row from the database.

        A short Redis lease (``SET <prefix>:lease:prefs:<client_id> <token> NX PX``) keeps a
        stampede of processes that all missed the same key off the database: the holder
        loads and fills the cache, the others wait briefly for the cache to fill.

        Args:
            client_id: whose row is about to be loaded.
            ttl: seconds after which the lease lapses if its holder dies (> 0).

        Returns:
            A :class:`LoadLease`: ``ACQUIRED`` (load, then ``release()``), ``BUSY`` (someone
            else is loading) or ``UNAVAILABLE`` (no cache: just load).
        """
        key = self._keys.lease_key(check_id("client_id", client_id, self._max_id))
        lease_ms = seconds_to_ms("ttl", ttl)
        transport = self._active()
        if transport is None:
            return AsyncLoadLease(LeaseState.UNAVAILABLE)
        token = secrets.token_hex(16).encode()
        reply = await self._call(
            "acquire_load_lease", transport.execute, "SET", key, token, "NX", "PX", lease_ms
        )
        if reply is FAILED:
            return AsyncLoadLease(LeaseState.UNAVAILABLE)
        if not reply:
            return AsyncLoadLease(LeaseState.BUSY)
        return AsyncLoadLease(LeaseState.ACQUIRED, release=lambda: self._release_lease(key, token))

    async def _release_lease(self, key: str, token: bytes) -> None:
        transport = self._active()
        if transport is not None:
            # Only the holder's token deletes it: a lease that lapsed and was taken by
            # another process is left alone.
            await self._call(
                "release_load_lease",
                transport.evalsha,
                transport.scripts.delete_if_equals,
                [key],
                ["value", token],
            )
