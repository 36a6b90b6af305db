"""Read-through repository: the cache in front of a real database.

Written once, in ``crmcache/_async/repository.py`` (the source); ``scripts/unasync.py``
generates ``crmcache/_sync/repository.py`` from it. The spec's import path::

    from crmcache.repository import CommunicationRepository

    repository = CommunicationRepository(db_manager=db_manager, cache_manager=cache_manager)
    preferences = repository.get_client_preferences("client-123")  # cache first
    repository.save_client_preferences(preferences)                # database, then cache
    repository.update_client_preferences("client-123", lambda p: p.model_copy(
        update={"opt_out": True}))                                   # read, change, save, retry
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .._config import DEFAULT_LEASE_TTL, DEFAULT_MAX_ID_LENGTH
from .._errors import StaleVersionError
from .._keys import check_id
from .._pending import PendingKind
from .._stats import RepositoryStats
from ..models import ClientPreferences, LeaseState
from ..store import AsyncPreferenceStore
from .manager import AsyncCRMCacheManager
from .primitives import Event, sleep

__all__ = ["AsyncCommunicationRepository"]

logger = logging.getLogger("crmcache")

#: Retries of update_client_preferences after a StaleVersionError, by default.
DEFAULT_UPDATE_RETRIES = 3
#: Most retries accepted (each one reads and writes the database).
MAX_UPDATE_RETRIES = 100
#: How long a process that lost the load lease waits for the holder to fill the cache.
DEFAULT_LEASE_WAIT = 0.25
_LEASE_POLL = 0.005


class _Flight:
    """One in-process database load that concurrent misses for the same client share."""

    __slots__ = ("abandoned", "done", "error", "result")

    def __init__(self) -> None:
        self.done = Event()
        self.result: ClientPreferences | None = None
        self.error: Exception | None = None
        # The leader was cancelled (or interrupted): its followers take over, they do not
        # share its cancellation.
        self.abandoned = False


class AsyncCommunicationRepository:
    """Client preferences from the database, with the cache in front.

    Reads check the cache, load the database on a miss and fill the cache with the row's
    version. Concurrent misses for one client in one process share one database load
    (single-flight); across processes a short Redis lease lets one load while the others
    wait up to ``lease_wait`` seconds for the cache to fill. With the cache disabled or
    Redis down, everything works from the database.

    Saves write the database with optimistic concurrency (a save based on a stale version
    raises :class:`~crmcache.StaleVersionError`) and then put the new version in the cache:
    the versioned write refuses any older row a slow reader tries to put back.

    Args:
        db_manager: the database, any :class:`~crmcache.store.PreferenceStore`.
        cache_manager: the cache; None means no cache.
        lease_ttl: seconds a cross-process load lease lives if its holder dies.
        lease_wait: seconds a process that lost the lease waits for the cache to fill
            before it loads the database itself.
    """

    def __init__(
        self,
        db_manager: AsyncPreferenceStore,
        cache_manager: AsyncCRMCacheManager | None = None,
        *,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        lease_wait: float = DEFAULT_LEASE_WAIT,
    ) -> None:
        if not isinstance(db_manager, AsyncPreferenceStore):
            raise TypeError(
                "db_manager must offer load_preferences() and save_preferences() "
                f"(crmcache.store.PreferenceStore), not {type(db_manager).__name__}"
            )
        if cache_manager is not None and not isinstance(cache_manager, AsyncCRMCacheManager):
            raise TypeError(
                f"cache_manager must be a CRMCacheManager or None, "
                f"not {type(cache_manager).__name__}"
            )
        for name, value in (("lease_ttl", lease_ttl), ("lease_wait", lease_wait)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
        if not 0 < lease_ttl <= 60:
            raise ValueError(f"lease_ttl must be > 0 and at most 60 seconds, got {lease_ttl}")
        if not 0 <= lease_wait <= 10:
            raise ValueError(f"lease_wait must be between 0 and 10 seconds, got {lease_wait}")
        self.db = db_manager
        self.cache = cache_manager
        self._lease_ttl = lease_ttl
        self._lease_wait = lease_wait
        self._lock = threading.Lock()
        self._flights: dict[str, _Flight] = {}
        self._counts = dict.fromkeys(
            (
                "cache_hits",
                "db_loads",
                "single_flight_joins",
                "lease_waits",
                "lease_wait_hits",
                "saves",
                "update_retries",
            ),
            0,
        )

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    @property
    def stats(self) -> RepositoryStats:
        """Counters of what the repository did."""
        with self._lock:
            return RepositoryStats(**self._counts)

    async def get_client_preferences(self, client_id: str) -> ClientPreferences | None:
        """The client's preferences: cache first, else the database (filling the cache).

        Returns:
            The preferences, or None if the client has no row.

        Raises:
            TypeError, ValueError: bad ``client_id``. Database errors propagate.
        """
        max_length = self.cache.settings.max_id_length if self.cache else DEFAULT_MAX_ID_LENGTH
        client_id = check_id("client_id", client_id, max_length)
        if self.cache is not None:
            cached = await self.cache.get_client_preferences(client_id)
            if cached is not None:
                self._count("cache_hits")
                return cached
        return await self._load_once(client_id)

    async def _load_once(self, client_id: str) -> ClientPreferences | None:
        while True:
            with self._lock:
                flight = self._flights.get(client_id)
                leader = flight is None
                if flight is None:
                    flight = self._flights[client_id] = _Flight()
                else:
                    self._counts["single_flight_joins"] += 1
            if leader:
                return await self._lead(client_id, flight)
            # A follower holds nothing: cancelling it here leaves the flight as it was.
            await flight.done.wait()
            if flight.abandoned:
                continue  # the leader was cancelled: the first follower back leads anew
            if flight.error is not None:
                raise flight.error
            return flight.result

    async def _lead(self, client_id: str, flight: _Flight) -> ClientPreferences | None:
        try:
            flight.result = await self._load_and_fill(client_id)
        except Exception as exc:
            flight.error = exc
            raise
        except BaseException:
            flight.abandoned = True
            raise
        else:
            return flight.result
        finally:
            with self._lock:
                # A save may already have retired this flight (and a newer one started).
                if self._flights.get(client_id) is flight:
                    del self._flights[client_id]
            flight.done.set()

    async def _load_and_fill(self, client_id: str) -> ClientPreferences | None:
        cache = self.cache
        if cache is None:
            return await self._load(client_id)
        lease = await cache.acquire_load_lease(client_id, self._lease_ttl)
        if lease.state is LeaseState.BUSY:
            found = await self._wait_for_fill(cache, client_id)
            if found is not None:
                return found
        try:
            row = await self._load(client_id)
            if row is not None:
                await cache.set_client_preferences(row)
            return row
        finally:
            await lease.release()

    async def _wait_for_fill(
        self, cache: AsyncCRMCacheManager, client_id: str
    ) -> ClientPreferences | None:
        # Another process holds the lease and is loading: poll the cache briefly. Anything
        # found there is at least as new as the last completed save (saves write the cache
        # with their version, and older fills are refused).
        self._count("lease_waits")
        deadline = time.monotonic() + self._lease_wait
        while time.monotonic() < deadline:
            await sleep(_LEASE_POLL)
            # Polls are not lookups: they must not drag the cache's hit rate down.
            found = await cache._get_preferences(client_id, record=False)
            if found is not None:
                self._count("lease_wait_hits")
                return found
        return None

    async def _load(self, client_id: str) -> ClientPreferences | None:
        self._count("db_loads")
        return await self.db.load_preferences(client_id)

    async def save_client_preferences(self, preferences: ClientPreferences) -> ClientPreferences:
        """Save to the database, then put the saved version in the cache.

        ``preferences.version`` must be the version the change is based on (as loaded);
        ``0`` creates the client's row.

        Returns:
            The saved preferences, with the new version.

        Raises:
            StaleVersionError: the row was saved by someone else since it was read.
        """
        saved = await self.db.save_preferences(preferences)
        self._count("saves")
        with self._lock:
            # Readers that start from now on must not share a load begun before the save.
            self._flights.pop(saved.client_id, None)
        cache = self.cache
        if cache is None:
            return saved
        try:
            if not await cache.set_client_preferences(saved):
                # Refused means a newer version is already cached; failed means Redis is
                # away: then at least try to leave a tombstone so the old row is not served.
                await cache.invalidate_client_preferences(saved.client_id, version=saved.version)
        except BaseException:
            # Cancelled after the database committed: the cache may still hold the old
            # row. The replay leaves a tombstone of the saved version (which that version
            # passes), so the old row is not served for the rest of its TTL.
            cache._defer_invalidation(
                PendingKind.PREFERENCES, cache._keys.prefs_key(saved.client_id), saved.version
            )
            raise
        return saved

    async def update_client_preferences(
        self,
        client_id: str,
        change: Callable[[ClientPreferences], ClientPreferences],
        retries: int = DEFAULT_UPDATE_RETRIES,
    ) -> ClientPreferences:
        """Read the client's row from the database, apply ``change`` and save the result;
        if someone else saved the row in between (:class:`~crmcache.StaleVersionError`),
        read it again and re-apply ``change``, up to ``retries`` more times.

        A client without a row starts from ``ClientPreferences(client_id=client_id)`` at
        version 0, so the first update creates the row (two concurrent creators: one
        retries on top of the other's row).

        Args:
            client_id: whose preferences to change.
            change: a plain function (no I/O; it may run several times) that takes the
                current preferences and returns the new ones, e.g.
                ``lambda p: p.model_copy(update={"opt_out": True})``. Its result must
                keep ``client_id``; its ``version`` is ignored (the save is always based
                on the version read).
            retries: how many times to retry after a ``StaleVersionError`` (0 to 100).

        Returns:
            The saved preferences, with the new version (also in the cache).

        Raises:
            StaleVersionError: the row was still changed under every attempt.
            TypeError: ``change`` is not callable or returns no ``ClientPreferences``;
                ``retries`` is not an int.
            ValueError: bad ``client_id``; ``retries`` out of range; ``change``
                returned another client's preferences. Database errors propagate.
        """
        max_length = self.cache.settings.max_id_length if self.cache else DEFAULT_MAX_ID_LENGTH
        client_id = check_id("client_id", client_id, max_length)
        if not callable(change):
            raise TypeError(f"change must be callable, not {type(change).__name__}")
        if isinstance(retries, bool) or not isinstance(retries, int):
            raise TypeError(f"retries must be an int, not {type(retries).__name__}")
        if not 0 <= retries <= MAX_UPDATE_RETRIES:
            raise ValueError(f"retries must be between 0 and {MAX_UPDATE_RETRIES}, got {retries}")
        attempt = 0
        while True:
            # From the database: a retry must see the row that beat us, which the cache
            # may not hold yet (the winner writes the database first).
            current = await self._load(client_id)
            if current is None:
                current = ClientPreferences(client_id=client_id)
            changed = change(current.model_copy(deep=True))
            if not isinstance(changed, ClientPreferences):
                raise TypeError(
                    f"change must return ClientPreferences, not {type(changed).__name__}"
                )
            if changed.client_id != client_id:
                raise ValueError(
                    f"change returned the preferences of {changed.client_id!r}, "
                    f"not of {client_id!r}"
                )
            try:
                return await self.save_client_preferences(
                    changed.model_copy(update={"version": current.version})
                )
            except StaleVersionError:
                if attempt >= retries:
                    raise
                attempt += 1
                self._count("update_retries")
                logger.debug(
                    "update of %s raced another writer; retry %d of %d",
                    client_id,
                    attempt,
                    retries,
                )
