"""Client preferences: versioned reads, writes and invalidations (``<prefix>:prefs:<id>``)."""

from __future__ import annotations

import logging

from .._codec import (
    WRONG_TYPE,
    CorruptValue,
    check_preferences,
    check_tombstone,
    clone_preferences,
    decode_preferences,
    encode_preferences,
    is_tombstone,
)
from .._guard import FAILED
from .._keys import check_id
from .._near import MISSING
from .._pending import PendingKind
from .._stats import Counter, Kind
from .._validate import check_version, ttl_ms
from ..models import ClientPreferences
from .core import AsyncCacheCore
from .transport import AsyncTransport

__all__ = ["AsyncPreferencesMixin"]

logger = logging.getLogger("crmcache")


class AsyncPreferencesMixin(AsyncCacheCore):
    """``get``/``set``/``invalidate_client_preferences``."""

    async def get_client_preferences(self, client_id: str) -> ClientPreferences | None:
        """Return a client's cached preferences, or ``None`` on a miss.

        A miss is also what a disabled cache, an unreachable Redis, an invalidation
        tombstone, or an undecodable value (which is then deleted) returns.

        Raises:
            TypeError, ValueError: ``client_id`` is not a valid id.
        """
        return await self._get_preferences(client_id, record=True)

    async def _get_preferences(self, client_id: str, *, record: bool) -> ClientPreferences | None:
        """The read behind get_client_preferences; ``record=False`` leaves hits and misses
        uncounted (for polls that are not lookups of their own)."""
        client_id = check_id("client_id", client_id, self._max_id)
        key = self._prefs_prefix + client_id
        transport = self._active()
        near = self._near
        prefs: ClientPreferences | None = None
        if transport is not None and near is not None:
            if not near.live:
                self._start_listener()
            held = near.get(key)
            if held is not MISSING:
                if record:
                    self._stats.near_hit(Kind.PREFERENCES)
                return clone_preferences(held)
            token = near.token()
            prefs = await self._read_preferences(transport, key, client_id)
            if prefs is not None and near.put(key, prefs, token):
                prefs = clone_preferences(prefs)  # the caller may change its copy
        elif transport is not None:
            prefs = await self._read_preferences(transport, key, client_id)
        if record:
            if prefs is None:
                self._stats.miss(Kind.PREFERENCES)
                logger.debug("cache miss: %s", key)
            else:
                self._stats.hit(Kind.PREFERENCES)
                logger.debug("cache hit: %s", key)
        return prefs

    async def _read_preferences(
        self, transport: AsyncTransport, key: str, client_id: str
    ) -> ClientPreferences | None:
        """GET and decode ``client_id``'s preferences value at ``key``; None for a miss of
        any kind (absent, tombstone, Redis away, or evicted: undecodable, another client's,
        a version out of range, a malformed tombstone, the wrong type)."""
        raw = await self._call("get_client_preferences", transport.get, key)
        if raw is FAILED:
            self._stats.count(Counter.READS_FAILED)
            return None
        if raw is WRONG_TYPE:
            await self._evict(key, None, "wrong type")
            return None
        if raw is None:
            return None
        try:
            if is_tombstone(raw):
                check_tombstone(raw)
                return None
            return decode_preferences(raw, client_id)
        except CorruptValue as exc:
            await self._evict(key, raw, str(exc))
            return None

    async def set_client_preferences(
        self, preferences: ClientPreferences, *, ttl: int | None = None
    ) -> bool:
        """Cache ``preferences`` unless a newer version is cached or was invalidated.

        Runs ``prefs_set.lua``: the write is refused when the key holds a higher version
        or a tombstone of a higher version (left by an invalidation), so a slow reader can
        never put an old row back.

        Args:
            preferences: what to cache; ``preferences.version`` orders writes.
            ttl: seconds to keep it; default the manager's ``cache_ttl``.

        Returns:
            True if stored; False if refused as stale, or if Redis was unavailable
            (logged and counted) or the cache is disabled.

        Raises:
            TypeError: ``preferences`` is not a ClientPreferences / ``ttl`` not an int.
            ValueError: ``ttl`` <= 0 or longer than ten years, or ``preferences`` holds a
                value validation refuses (a model built with ``model_construct()``; what
                it stored could never be read back, or a version the scripts cannot
                compare exactly).
        """
        if not isinstance(preferences, ClientPreferences):
            raise TypeError(
                f"preferences must be ClientPreferences, not {type(preferences).__name__}"
            )
        expiry_ms = self._ttl_ms if ttl is None else ttl_ms("ttl", ttl)
        key = self._prefs_prefix + check_id(
            "preferences.client_id", preferences.client_id, self._max_id
        )
        # Validated by the model, unless it was built with model_construct(): the scripts
        # must never see a version they cannot compare exactly, and a reader must be able
        # to decode what is stored.
        if preferences.version is None or isinstance(preferences.version, int):
            # A missing or out-of-range version is named as the scripts see it.
            check_version("preferences.version", preferences.version, optional=False)
        preferences = check_preferences(preferences)
        version = preferences.version
        transport = self._active()
        if transport is None:
            return False
        payload = encode_preferences(preferences)
        self._near_forget(key)
        reply = await self._call(
            "set_client_preferences",
            transport.evalsha,
            transport.scripts.prefs_set,
            [key],
            [version, payload, expiry_ms],
        )
        self._near_forget(key)
        if reply is FAILED:
            self._stats.count(Counter.WRITES_FAILED)
            return False
        stored, current = (int(x) for x in reply)
        if not stored:
            self._stats.count(Counter.STALE_WRITES_REFUSED)
            logger.debug(
                "refused stale write of %s: version %d, cached %s",
                key,
                preferences.version,
                "tombstone" if current == -2 else current,
            )
            return False
        self._stats.count(Counter.WRITES)
        logger.debug("cached %s version %d", key, preferences.version)
        return True

    async def invalidate_client_preferences(
        self, client_id: str, *, version: int | None = None
    ) -> bool:
        """Drop a client's cached preferences, leaving a short tombstone.

        Call it after saving the row. Pass the saved row's ``version`` when known: the
        tombstone then refuses only older writes, so the next reader can refill at once.
        Without it, the tombstone assumes the row moved one version past what was cached
        (or, with nothing cached, refuses every write for ``tombstone_ttl`` seconds).

        Returns:
            True if Redis recorded the invalidation; False if Redis was unavailable
            (logged at WARNING and counted) or the cache is disabled.

        Raises:
            TypeError, ValueError: bad ``client_id`` or ``version``.
        """
        key = self._prefs_prefix + check_id("client_id", client_id, self._max_id)
        version = check_version("version", version)
        transport = self._active()
        if transport is None:
            return False
        return await self._invalidate(
            "invalidate_client_preferences",
            PendingKind.PREFERENCES,
            key,
            version,
            transport.evalsha,
            transport.scripts.prefs_invalidate,
            [key],
            ["" if version is None else version, self._tombstone_ms],
        )
