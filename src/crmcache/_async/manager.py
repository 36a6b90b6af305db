"""The cache manager: the slim Python facade over Redis and the Lua scripts.

Written once, in ``crmcache/_async/manager.py`` (the source); ``scripts/unasync.py``
generates ``crmcache/_sync/manager.py`` from it. Only the calls into the pools do I/O;
logic without I/O lives in the shared private modules (keys, codec, guard, stats,
rate-limit results, settings).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict
from types import TracebackType
from typing import Any, Self, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from .._codec import (
    CorruptValue,
    clone_preferences,
    decode_preferences,
    decode_template,
    encode_preferences,
    encode_template,
    is_tombstone,
)
from .._common import (
    ADMIN_CONNECTIONS,
    DEFAULT_LEASE_TTL,
    HEALTH_CHECK_INTERVAL,
    KEY_MEMO_SIZE,
    LOW_HIT_RATE_THRESHOLD,
    MAX_BATCH,
    MIN_LOOKUPS_FOR_HIT_RATE_WARNING,
    NEAR_RECONNECT_FIRST,
    NEAR_RECONNECT_MAX,
    REPLAY_FIRST_DELAY,
    REPLAY_MAX_DELAY,
    SCAN_BUDGET,
    SCAN_COUNT,
    TEMPLATE_PREFIX,
    WRONG_TYPE,
    LeaseState,
    TemplateRef,
    seconds_to_ms,
    ttl_ms,
)
from .._config import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_ID_LENGTH,
    DEFAULT_MAX_TEMPLATE_BYTES,
    DEFAULT_NEAR_CACHE_SIZE,
    DEFAULT_NEAR_CACHE_TTL,
    DEFAULT_POOL_TIMEOUT,
    DEFAULT_RATE_LIMIT_WINDOW,
    DEFAULT_SOCKET_CONNECT_TIMEOUT,
    DEFAULT_SOCKET_TIMEOUT,
    DEFAULT_TOMBSTONE_TTL,
    MAX_TTL,
    CacheSettings,
    RateLimitPolicy,
    check_policy,
    resolve_settings,
    url_password,
)
from .._errors import ConfigurationError
from .._guard import FAILED, CircuitBreaker, Guard, LogThrottle, PoolClosedError
from .._keys import (
    SCAN_PATTERN,
    check_channel,
    check_id,
    lease_key,
    prefs_key,
    rate_limit_key,
)
from .._near import MISSING, NOT_AN_INVALIDATION, NearCache, invalidated_keys
from .._pending import PendingInvalidations, PendingKind
from .._ratelimit import LocalRateLimiter, RateLimitResult, check_limit_args, result_from_reply
from .._scripts import Scripts, register_scripts
from .._stats import (
    CacheStats,
    Counter,
    Kind,
    PoolStats,
    RedisServerStats,
    StatsRecorder,
    hit_rate,
)
from ..models import MAX_VERSION, ClientPreferences, MessageChannel
from .pool import AsyncLeanPool
from .primitives import Background, Event, finish, spawn

__all__ = [
    "AsyncCRMCacheManager",
    "AsyncLoadLease",
    "close_async_cache_managers",
    "get_async_cache_manager",
]

logger = logging.getLogger("crmcache")


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


async def _pass_push(message: Any) -> Any:  # noqa: ANN401
    """RESP3 invalidation pushes are handed back to the listener as they are."""
    return message


async def _get_raw(lean: AsyncLeanPool, key: str) -> object:
    """GET, with a value of the wrong type reported as WRONG_TYPE rather than raised."""
    try:
        return await lean.execute("GET", key)
    except ResponseError as exc:
        if str(exc).startswith("WRONGTYPE"):
            return WRONG_TYPE
        raise


class AsyncCRMCacheManager:
    """Redis cache for client preferences, message templates and API rate limits.

    Every call is safe on a hot path: a Redis failure makes reads return ``None``,
    writes return ``False``, and rate-limit checks follow the failure policy; nothing
    from redis-py is raised to the caller. Bad arguments raise ``ValueError`` or
    ``TypeError`` naming the argument.

    Args:
        redis_url: Redis URL; default ``$REDIS_URL`` or ``redis://localhost:6379/0``.
        enabled: cache on/off; default ``$ENABLE_CACHING`` or True. When False no
            connection is ever opened and every call is a miss / no-op.
        max_connections: pool size; callers beyond it wait up to ``pool_timeout``.
        socket_timeout: seconds to wait for a reply.
        socket_connect_timeout: seconds to wait for a connection (also bounds
            :meth:`health_check`).
        cache_ttl: preference TTL in seconds; default ``$CACHE_TTL`` or 3600.
        pool_timeout: seconds to wait for a free pooled connection.
        tombstone_ttl: seconds an invalidation keeps stale preference writes out.
        rate_limit_policy: what check_rate_limit answers when Redis cannot be asked:
            ``"open"`` (allow, the default), ``"closed"`` (refuse) or ``"local"`` (an
            in-process limiter enforcing ``rate_limit_local_share`` of the limit).
        rate_limit_policies: per-API policies (``{"whatsapp": "closed"}``), overriding
            ``rate_limit_policy`` for those APIs.
        rate_limit_local_share: the share of each limit one process enforces under the
            ``"local"`` policy, in (0, 1]; ``1 / processes`` keeps a fleet near the limit.
        max_id_length: longest client id / template name / API name, in characters.
        max_template_bytes: largest template accepted, in UTF-8 bytes.
        near_cache: keep decoded preferences and templates in the process too, kept
            coherent by Redis ``CLIENT TRACKING`` (see ``crmcache._near``).
        near_cache_size: most values the near cache holds.
        near_cache_ttl: seconds a near-cached value is served at most.
        near_cache_protocol: 2 or 3: how the invalidation listener talks to Redis (RESP2
            pub/sub redirect, or RESP3 push messages).

    Raises:
        ConfigurationError: a setting is out of range or malformed (never shows a
            password).
        TypeError: a setting has the wrong type.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        enabled: bool | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
        socket_connect_timeout: float = DEFAULT_SOCKET_CONNECT_TIMEOUT,
        cache_ttl: int | None = None,
        pool_timeout: float = DEFAULT_POOL_TIMEOUT,
        tombstone_ttl: int = DEFAULT_TOMBSTONE_TTL,
        rate_limit_policy: RateLimitPolicy = "open",
        rate_limit_policies: Mapping[str, RateLimitPolicy] | None = None,
        rate_limit_local_share: float = 1.0,
        max_id_length: int = DEFAULT_MAX_ID_LENGTH,
        max_template_bytes: int = DEFAULT_MAX_TEMPLATE_BYTES,
        near_cache: bool = False,
        near_cache_size: int = DEFAULT_NEAR_CACHE_SIZE,
        near_cache_ttl: float = DEFAULT_NEAR_CACHE_TTL,
        near_cache_protocol: int = 2,
    ) -> None:
        self.settings: CacheSettings = resolve_settings(
            redis_url=redis_url,
            enabled=enabled,
            cache_ttl=cache_ttl,
            max_connections=max_connections,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            pool_timeout=pool_timeout,
            tombstone_ttl=tombstone_ttl,
            rate_limit_policy=rate_limit_policy,
            rate_limit_policies=rate_limit_policies,
            rate_limit_local_share=rate_limit_local_share,
            max_id_length=max_id_length,
            max_template_bytes=max_template_bytes,
            near_cache=near_cache,
            near_cache_size=near_cache_size,
            near_cache_ttl=near_cache_ttl,
            near_cache_protocol=near_cache_protocol,
        )
        s = self.settings
        self._ttl_ms = s.cache_ttl * 1000
        self._tombstone_ms = s.tombstone_ttl * 1000
        self._max_id = s.max_id_length
        self._stats = StatsRecorder()
        self._closed = False
        self._close_lock = threading.Lock()
        self._breaker = CircuitBreaker()
        self._guard = Guard(
            breaker=self._breaker,
            on_error=self._count_error,
            secret=url_password(s.redis_url),
            on_recovered=self._start_replay,
        )
        self._local_limiter = LocalRateLimiter(s.rate_limit_local_share)
        self._pending = PendingInvalidations()
        self._replay_lock = threading.Lock()
        self._replayer: Background | None = None
        self._stopping = Event()
        self._invalidation_warnings = LogThrottle(30.0)
        self._rate_limit_keys: dict[tuple[str, int], str] = {}
        self._pool: BlockingConnectionPool | None = None
        self._client: Redis | None = None
        self._lean: AsyncLeanPool | None = None
        self._admin: AsyncLeanPool | None = None
        self._health: AsyncLeanPool | None = None
        self._scripts: Scripts | None = None
        self._near = NearCache(s.near_cache_size, s.near_cache_ttl) if s.near_cache else None
        self._listener: Background | None = None
        self._listener_conn: Any = None
        if s.enabled:
            self._build_clients()
        logger.info(
            "crmcache initialised: url=%s enabled=%s max_connections=%d cache_ttl=%ds",
            s.masked_url,
            s.enabled,
            s.max_connections,
            s.cache_ttl,
        )

    def _build_clients(self) -> None:
        s = self.settings
        # One retry on a dropped connection reconnects after a Redis restart; a timeout
        # is not retried (it would double the stall).
        retry = Retry(
            ExponentialWithJitterBackoff(cap=0.1, base=0.01),
            retries=1,
            supported_errors=(RedisConnectionError,),
        )
        try:
            # redis-py parses the URL and holds the connection settings (class, TLS, auth,
            # db, timeouts); every call runs on a lean pool of its connections (see
            # pool.py), whose slots and connections survive cancellation.
            self._pool = BlockingConnectionPool.from_url(
                s.redis_url,
                max_connections=ADMIN_CONNECTIONS,
                timeout=s.pool_timeout,
                socket_timeout=s.socket_timeout,
                socket_connect_timeout=s.socket_connect_timeout,
                retry=retry,
                protocol=2,
                health_check_interval=HEALTH_CHECK_INTERVAL,
                client_name="crmcache",
            )
        except ValueError as exc:
            message = self._guard.scrub(str(exc))
            raise ConfigurationError(
                f"redis_url {s.masked_url!r} is not usable: {message}"
            ) from None
        self._client = Redis(connection_pool=self._pool)
        settings = self._pool
        connection_class, kwargs = settings.connection_class, settings.connection_kwargs
        self._lean = AsyncLeanPool(
            lambda: connection_class(**kwargs),
            max_connections=s.max_connections,
            timeout=s.pool_timeout,
        )
        # The rare administrative calls (SCAN and INFO for the stats) do not take the
        # data path's connections.
        self._admin = AsyncLeanPool(
            lambda: connection_class(**kwargs),
            max_connections=ADMIN_CONNECTIONS,
            timeout=s.pool_timeout,
        )
        # Health checks get their own single connection whose read timeout is the
        # connect timeout, so a probe is bounded by it even when the pool is busy; a
        # dropped connection is not retried (that would double the bound).
        health_kwargs = {
            **kwargs,
            "socket_timeout": s.socket_connect_timeout,
            "retry": Retry(ExponentialWithJitterBackoff(cap=0.1, base=0.01), retries=0),
            "client_name": "crmcache-health",
        }
        self._health = AsyncLeanPool(
            lambda: connection_class(**health_kwargs),
            max_connections=1,
            timeout=s.socket_connect_timeout,
            retry_dropped=False,
        )
        self._scripts = register_scripts(self._client)

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """True if the cache is on (and the manager not closed)."""
        return self.settings.enabled and not self._closed

    async def aclose(self) -> None:
        """Close the manager. Idempotent; later calls behave as disabled.

        Background work stops, a last replay sends the invalidations still pending, and
        calls in flight keep their connection for up to ``socket_timeout`` to read their
        reply. Safe to cancel: the connections are closed all the same (only the last
        replay may then be skipped, which is logged with the number lost).
        """
        with self._close_lock:
            if self._stopping.is_set():
                return  # closed, or being closed by another task or thread
            self._stopping.set()
        try:
            await self._stop_background()
            if self._pending and self._lean is not None:
                # A last attempt: these are the invalidations that would otherwise be lost.
                await self._replay_once()
        finally:
            with self._close_lock:
                self._closed = True
            if self._pending:
                logger.error(
                    "closing with %d invalidation(s) Redis never received: the affected "
                    "preferences may stay stale for up to %ds",
                    len(self._pending),
                    self.settings.cache_ttl,
                )
            await finish(self._close_connections)
        logger.info("crmcache closed: url=%s", self.settings.masked_url)

    async def _stop_background(self) -> None:
        replayer = self._replayer
        if replayer is not None:
            await replayer.join(timeout=self.settings.socket_timeout + 1)
        listener = self._listener
        if listener is not None:
            # Unblock its read: closing the socket (thread) or cancelling the task.
            listener.cancel()
            if self._listener_conn is not None:
                await self._listener_conn.disconnect(nowait=True)
            await listener.join(timeout=self.settings.socket_timeout + 1)

    async def _close_connections(self) -> None:
        for pool in (self._lean, self._admin, self._health):
            if pool is not None:
                await pool.close(grace=self.settings.socket_timeout)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("enabled" if self.settings.enabled else "disabled")
        return f"<CRMCacheManager url={self.settings.masked_url!r} {state}>"

    def _active(self) -> AsyncLeanPool | None:
        """The data-path pool, or None when the cache is disabled or closed."""
        if self._closed:
            return None
        return self._lean

    async def _call(self, op: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:  # noqa: ANN401
        """Run one Redis call under the circuit breaker.

        Returns:
            ``fn``'s result, or ``FAILED`` when the breaker is open or ``fn`` raised a
            redis-py error (counted and logged by the guard, never re-raised).
        """
        guard = self._guard
        token = guard.begin()
        if token is None:
            return FAILED
        try:
            result = await fn(*args)
        except PoolClosedError:
            guard.abandoned()  # the manager is closing: not an outage
            return FAILED
        except (RedisError, OSError) as exc:
            guard.failed(op, exc)
            return FAILED
        except Exception as exc:  # noqa: BLE001 - degraded, counted and logged by the guard
            guard.unexpected(op, exc)
            return FAILED
        except BaseException:
            # Cancelled or interrupted: never swallowed, but a half-open probe must not
            # stay taken by a call that will never report back.
            guard.abandoned()
            self._stats.count(Counter.CANCELLED)
            raise
        guard.succeeded(token)
        return result

    def _count_error(self, op: str, exc: BaseException) -> None:
        unexpected = not isinstance(exc, RedisError | OSError)
        self._stats.count(Counter.UNEXPECTED_ERRORS if unexpected else Counter.REDIS_ERRORS)

    # -- client preferences ------------------------------------------------------------

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
        key = prefs_key(check_id("client_id", client_id, self._max_id))
        lean = self._active()
        near = self._near
        prefs: ClientPreferences | None = None
        if lean is not None and near is not None:
            if not near.live:
                self._ensure_listener()
            held = near.get(key)
            if held is not MISSING:
                if record:
                    self._stats.hit(Kind.PREFERENCES)
                return clone_preferences(held)
            token = near.token()
            prefs = await self._read_preferences(lean, key)
            if prefs is not None and near.put(key, prefs, token):
                prefs = clone_preferences(prefs)  # the caller may change its copy
        elif lean is not None:
            prefs = await self._read_preferences(lean, key)
        if record:
            if prefs is None:
                self._stats.miss(Kind.PREFERENCES)
                logger.debug("cache miss: %s", key)
            else:
                self._stats.hit(Kind.PREFERENCES)
                logger.debug("cache hit: %s", key)
        return prefs

    async def _read_preferences(self, lean: AsyncLeanPool, key: str) -> ClientPreferences | None:
        """GET and decode one preferences value; None for a miss of any kind (absent,
        tombstone, Redis away, undecodable or wrong-type value: the last two evicted)."""
        raw = await self._call("get_client_preferences", _get_raw, lean, key)
        if raw is FAILED:
            self._stats.count(Counter.READS_FAILED)
            return None
        if raw is WRONG_TYPE:
            await self._evict(key, None, "wrong type")
            return None
        if raw is None or is_tombstone(raw):
            return None
        try:
            return decode_preferences(raw)
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
            ValueError: ``ttl`` <= 0.
        """
        if not isinstance(preferences, ClientPreferences):
            raise TypeError(
                f"preferences must be ClientPreferences, not {type(preferences).__name__}"
            )
        expiry_ms = self._ttl_ms if ttl is None else ttl_ms("ttl", ttl)
        check_id("preferences.client_id", preferences.client_id, self._max_id)
        key = prefs_key(preferences.client_id)
        scripts = self._scripts
        lean = self._active()
        if lean is None or scripts is None:
            return False
        payload = encode_preferences(preferences)
        self._near_forget(key)
        reply = await self._call(
            "set_client_preferences",
            lean.evalsha,
            scripts.prefs_set,
            [key],
            [preferences.version, payload, expiry_ms],
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
        key = prefs_key(check_id("client_id", client_id, self._max_id))
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
            raise TypeError(f"version must be an int or None, not {type(version).__name__}")
        if version is not None and not 0 <= version <= MAX_VERSION:
            raise ValueError(f"version must be between 0 and {MAX_VERSION}, got {version}")
        scripts = self._scripts
        lean = self._active()
        if lean is None or scripts is None:
            return False
        self._near_forget(key)
        try:
            reply = await self._call(
                "invalidate_client_preferences",
                lean.evalsha,
                scripts.prefs_invalidate,
                [key],
                ["" if version is None else version, self._tombstone_ms],
            )
        except BaseException:
            self._defer_invalidation(PendingKind.PREFERENCES, key, version)
            raise
        self._near_forget(key)
        if reply is FAILED:
            self._invalidation_failed(PendingKind.PREFERENCES, key, version)
            return False
        self._pending.discard(key)
        self._stats.count(Counter.INVALIDATIONS)
        logger.debug("invalidated %s (tombstone version %s)", key, reply)
        return True

    # -- templates ----------------------------------------------------------------------

    def _template_key(self, name: str, channel: MessageChannel | str) -> str:
        prefix = TEMPLATE_PREFIX.get(channel) if isinstance(channel, str) else None
        if prefix is None:
            prefix = TEMPLATE_PREFIX[check_channel(channel)]
        return prefix + check_id("name", name, self._max_id)

    async def get_template(self, name: str, channel: MessageChannel | str) -> str | None:
        """Return a cached template's text, or ``None`` on a miss.

        Raises:
            TypeError, ValueError: bad ``name`` or unknown ``channel``.
        """
        key = self._template_key(name, channel)
        lean = self._active()
        if lean is None:
            self._stats.miss(Kind.TEMPLATES)
            return None
        near = self._near
        token = 0
        if near is not None:
            if not near.live:
                self._ensure_listener()
            held = near.get(key)
            if held is not MISSING:
                self._stats.hit(Kind.TEMPLATES)
                return cast("str", held)
            token = near.token()
        raw = await self._call("get_template", _get_raw, lean, key)
        if raw is FAILED:
            self._stats.count(Counter.READS_FAILED)
        content = await self._decode_template(key, raw)
        if near is not None and content is not None:
            near.put(key, content, token)
        return content

    async def get_templates(
        self, templates: Iterable[TemplateRef]
    ) -> dict[TemplateRef, str | None]:
        """Fetch many templates in one round trip (``MGET``).

        Args:
            templates: ``(name, channel)`` pairs; the channel as MessageChannel or str.

        Returns:
            A dict from each requested ``(name, channel)`` pair, as given, to its text or
            ``None`` for a miss. (``MessageChannel`` is a ``str`` enum, so
            ``result["welcome", "email"]`` and ``result["welcome", MessageChannel.EMAIL]``
            find the same entry.)

        Raises:
            TypeError, ValueError: a bad pair, or more than 10,000 of them.
        """
        refs, keys = self._check_refs(templates)
        lean = self._active()
        if lean is None or not keys:
            self._stats.miss(Kind.TEMPLATES, len(keys))
            return dict.fromkeys(refs)
        near = self._near
        token = 0
        found: dict[TemplateRef, str | None] = {}
        if near is not None:
            if not near.live:
                self._ensure_listener()
            token = near.token()
            remote_refs, remote_keys = [], []
            for ref, key in zip(refs, keys, strict=True):
                held = near.get(key)
                if held is MISSING:
                    remote_refs.append(ref)
                    remote_keys.append(key)
                else:
                    found[ref] = held
            self._stats.hit(Kind.TEMPLATES, len(found))
            if not remote_keys:
                return found
            refs, keys = remote_refs, remote_keys
        raws = await self._call("get_templates", lean.execute, "MGET", *keys)
        if raws is FAILED:
            self._stats.count(Counter.READS_FAILED)
            self._stats.miss(Kind.TEMPLATES, len(keys))
            return {**found, **dict.fromkeys(refs)}
        # Decoded inline and counted once per batch: per-item calls cost more than the
        # MGET itself on a 50-template batch.
        hits = 0
        for ref, key, raw in zip(refs, keys, cast("list[bytes | None]", raws), strict=True):
            if raw is None:
                found[ref] = None
                continue
            try:
                found[ref] = text = raw.decode("utf-8")
                hits += 1
                if near is not None:
                    near.put(key, text, token)
            except UnicodeDecodeError:
                await self._evict(key, raw, "template is not valid UTF-8")
                found[ref] = None
        self._stats.hit(Kind.TEMPLATES, hits)
        self._stats.miss(Kind.TEMPLATES, len(keys) - hits)
        logger.debug("batched template fetch: %d hits, %d misses", hits, len(keys) - hits)
        return found

    def _check_refs(self, templates: Iterable[TemplateRef]) -> tuple[list[TemplateRef], list[str]]:
        """Validate (name, channel) pairs; return the distinct pairs and their keys."""
        if isinstance(templates, str | bytes) or not isinstance(templates, Iterable):
            raise TypeError("templates must be an iterable of (name, channel) pairs")
        keys: dict[TemplateRef, str] = {}
        for item in templates:
            if not isinstance(item, tuple) or len(item) != 2:
                raise TypeError(f"templates items must be (name, channel) pairs, got {item!r}")
            name, channel = item
            prefix = TEMPLATE_PREFIX.get(channel) if isinstance(channel, str) else None
            if prefix is None:
                prefix = TEMPLATE_PREFIX[check_channel(channel)]
            # The right side runs first: a bad (or unhashable) name is reported by check_id
            # before the pair is hashed.
            keys[item] = prefix + check_id("name", name, self._max_id)
            if len(keys) > MAX_BATCH:
                raise ValueError(f"templates may name at most {MAX_BATCH} templates")
        return list(keys), list(keys.values())

    async def _decode_template(self, key: str, raw: object) -> str | None:
        if raw is None or raw is FAILED:
            self._stats.miss(Kind.TEMPLATES)
            logger.debug("cache miss: %s", key)
            return None
        if raw is WRONG_TYPE:
            await self._evict(key, None, "wrong type")
            self._stats.miss(Kind.TEMPLATES)
            return None
        try:
            content = decode_template(raw)  # type: ignore[arg-type]
        except CorruptValue as exc:
            await self._evict(key, raw, str(exc))  # type: ignore[arg-type]
            self._stats.miss(Kind.TEMPLATES)
            return None
        self._stats.hit(Kind.TEMPLATES)
        logger.debug("cache hit: %s", key)
        return content

    def _check_content(self, content: object) -> bytes:
        if not isinstance(content, str):
            raise TypeError(f"content must be a str, not {type(content).__name__}")
        data = encode_template(content)
        if len(data) > self.settings.max_template_bytes:
            raise ValueError(
                f"content is {len(data)} bytes; the limit is "
                f"{self.settings.max_template_bytes} (max_template_bytes)"
            )
        return data

    async def set_template(self, name: str, channel: MessageChannel | str, content: str) -> bool:
        """Cache a template's text, with no expiry (templates are invalidated by hand).

        Returns:
            True if stored; False if Redis was unavailable (logged, counted) or disabled.

        Raises:
            TypeError: ``content`` is not a str; bad ``name``/``channel``.
            ValueError: ``content`` is larger than ``max_template_bytes``; bad
                ``name``/``channel``.
        """
        key = self._template_key(name, channel)
        data = self._check_content(content)
        lean = self._active()
        if lean is None:
            return False
        self._near_forget(key)
        stored = await self._call("set_template", lean.execute, "SET", key, data)
        self._near_forget(key)
        if stored is FAILED:
            self._stats.count(Counter.WRITES_FAILED)
            return False
        self._stats.count(Counter.WRITES)
        logger.debug("cached %s (%d bytes)", key, len(data))
        return True

    async def set_templates(self, templates: Mapping[TemplateRef, str]) -> bool:
        """Cache many templates in one round trip (``MSET``), with no expiry.

        Returns:
            True if all were stored; False if Redis was unavailable or disabled.

        Raises:
            TypeError, ValueError: as for :meth:`set_template`, for any entry.
        """
        if not isinstance(templates, Mapping):
            raise TypeError(
                f"templates must be a mapping of (name, channel) to content, "
                f"not {type(templates).__name__}"
            )
        refs, keys = self._check_refs(templates.keys())
        data = {
            key: self._check_content(templates[ref]) for ref, key in zip(refs, keys, strict=True)
        }
        if not data:
            return True
        lean = self._active()
        if lean is None:
            return False
        flat = [part for pair in data.items() for part in pair]
        self._near_forget(*data)
        stored = await self._call("set_templates", lean.execute, "MSET", *flat)
        self._near_forget(*data)
        if stored is FAILED:
            self._stats.count(Counter.WRITES_FAILED)
            return False
        self._stats.count(Counter.WRITES, len(data))
        return True

    async def invalidate_template(self, name: str, channel: MessageChannel | str) -> bool:
        """Remove a cached template.

        Returns:
            True if Redis processed the delete (whether or not the key existed); False if
            Redis was unavailable (logged at WARNING, counted) or the cache is disabled.
        """
        key = self._template_key(name, channel)
        lean = self._active()
        if lean is None:
            return False
        self._near_forget(key)
        try:
            deleted = await self._call("invalidate_template", lean.execute, "DEL", key)
        except BaseException:
            self._defer_invalidation(PendingKind.TEMPLATE, key, None)
            raise
        self._near_forget(key)
        if deleted is FAILED:
            self._invalidation_failed(PendingKind.TEMPLATE, key, None)
            return False
        self._pending.discard(key)
        self._stats.count(Counter.INVALIDATIONS)
        logger.debug("invalidated %s", key)
        return True

    # -- rate limits --------------------------------------------------------------------

    async def check_rate_limit(
        self,
        api: str,
        limit: int,
        window: int = DEFAULT_RATE_LIMIT_WINDOW,
        *,
        cost: int = 1,
        policy: RateLimitPolicy | None = None,
    ) -> RateLimitResult:
        """Count one call to ``api`` against ``limit`` calls per ``window`` seconds.

        One Lua script checks and increments atomically and sets the window's expiry; a
        refused call is not counted. The result unpacks as ``allowed, current_count``.

        Args:
            api: the API's name (``"whatsapp"``); key ``crm:ratelimit:<api>:<window>``.
            limit: calls allowed per window (> 0).
            window: window length in seconds (> 0), default 60.
            cost: how many calls this one counts for (> 0).
            policy: what to answer when Redis cannot be asked: ``"open"`` allows the call,
                ``"closed"`` refuses it; default the manager's ``rate_limit_policy``.

        Raises:
            TypeError, ValueError: bad ``api``, ``limit``, ``window``, ``cost`` or
                ``policy``.
        """
        key = self._rate_limit_keys.get((api, window)) if type(api) is str else None
        if key is None:
            api = check_id("api", api, self._max_id)
        if not (
            type(limit) is int
            and type(window) is int
            and type(cost) is int
            and limit > 0
            and 0 < window <= MAX_TTL
            and cost > 0
        ):
            limit, window, cost = check_limit_args(limit, window, cost)
        if key is None:
            key = rate_limit_key(api, window)
            # Hot APIs are few; the bound keeps a caller with endless names from growing it.
            if len(self._rate_limit_keys) < KEY_MEMO_SIZE:
                self._rate_limit_keys[api, window] = key
        chosen = self._policy_for(api, policy)
        scripts = self._scripts
        lean = self._active()
        if lean is not None and scripts is not None:
            reply = await self._call(
                "check_rate_limit",
                lean.evalsha,
                scripts.rate_limit,
                [key],
                [limit, window * 1000, cost],
            )
            if reply is not FAILED:
                result = result_from_reply(reply, limit)
                self._stats.count(
                    Counter.RATE_LIMIT_ALLOWED if result.allowed else Counter.RATE_LIMIT_REJECTED
                )
                return result
        self._stats.count(Counter.RATE_LIMIT_DEGRADED)
        if chosen == "local":
            return self._local_limiter.check(api, limit, window, cost)
        allowed = chosen == "open"
        return RateLimitResult(
            allowed=allowed,
            current_count=0,
            limit=limit,
            remaining=limit if allowed else 0,
            retry_after=0.0 if allowed else 1.0,
            degraded=True,
        )

    def _policy_for(self, api: str, policy: object) -> RateLimitPolicy:
        if policy is not None:
            return check_policy(policy, "policy")
        return self.settings.rate_limit_policies.get(api, self.settings.rate_limit_policy)

    # -- load leases --------------------------------------------------------------------

    async def acquire_load_lease(
        self, client_id: str, ttl: float = DEFAULT_LEASE_TTL
    ) -> AsyncLoadLease:
        """Try to become the one process that loads ``client_id``'s row from the database.

        A short Redis lease (``SET crm:lease:prefs:<client_id> <token> NX PX``) keeps a
        stampede of processes that all missed the same key off the database: the holder
        loads and fills the cache, the others wait briefly for the cache to fill.

        Args:
            client_id: whose row is about to be loaded.
            ttl: seconds after which the lease lapses if its holder dies (> 0).

        Returns:
            A :class:`LoadLease`: ``ACQUIRED`` (load, then ``release()``), ``BUSY`` (someone
            else is loading) or ``UNAVAILABLE`` (no cache: just load).
        """
        key = lease_key(check_id("client_id", client_id, self._max_id))
        lease_ms = seconds_to_ms("ttl", ttl)
        lean = self._active()
        if lean is None:
            return AsyncLoadLease(LeaseState.UNAVAILABLE)
        token = secrets.token_hex(16).encode()
        reply = await self._call(
            "acquire_load_lease", lean.execute, "SET", key, token, "NX", "PX", lease_ms
        )
        if reply is FAILED:
            return AsyncLoadLease(LeaseState.UNAVAILABLE)
        if not reply:
            return AsyncLoadLease(LeaseState.BUSY)
        return AsyncLoadLease(LeaseState.ACQUIRED, release=lambda: self._release_lease(key, token))

    async def _release_lease(self, key: str, token: bytes) -> None:
        scripts = self._scripts
        lean = self._active()
        if scripts is not None and lean is not None:
            # Only the holder's token deletes it: a lease that lapsed and was taken by
            # another process is left alone.
            await self._call(
                "release_load_lease",
                lean.evalsha,
                scripts.delete_if_equals,
                [key],
                ["value", token],
            )

    # -- statistics and health ----------------------------------------------------------

    async def health_check(self) -> bool:
        """PING Redis; True if it answered. Never raises; bounded by the connect timeout.

        A disabled or closed manager is reported unhealthy (it serves nothing); check
        :attr:`enabled` to tell the cases apart.
        """
        health = self._health
        if self._closed or health is None:
            return False
        try:
            return bool(await health.execute("PING") == b"PONG")
        except PoolClosedError:
            return False
        except Exception as exc:  # noqa: BLE001 - a health probe reports, it never raises
            reason = self._guard.scrub(f"{type(exc).__name__}: {exc}")
            logger.warning("health check failed: %s", reason)
            return False

    async def get_stats(self) -> CacheStats:
        """A typed snapshot of the statistics (see :class:`CacheStats`).

        Logs the summary at INFO, and a WARNING when the hit rate is below 50% over at
        least 100 lookups.
        """
        by_kind = self._stats.by_kind()
        total_keys: int | None = None
        exact = False
        info: RedisServerStats | None = None
        admin = self._admin if self._active() is not None else None
        if admin is not None:
            counted = await self._call("get_cache_stats", self._count_keys, admin)
            if counted is not FAILED:
                total_keys, exact = counted
            raw_info = await self._call("get_cache_stats", admin.execute, "INFO")
            if raw_info is not FAILED:
                info = RedisServerStats.from_reply(raw_info)
        stats = CacheStats(
            enabled=self.enabled,
            total_keys=total_keys,
            total_keys_exact=exact,
            by_kind=by_kind,
            counters=self._stats.counters(),
            connection_pool=self._pool_stats(),
            redis=info,
            pending_invalidations=len(self._pending),
            near_cache=(
                asdict(self._near.stats()) if self._near is not None else {"enabled": False}
            ),
            circuit_breaker={
                "state": self._breaker.state.value,
                "trips": self._breaker.trips,
                "recoveries": self._breaker.recoveries,
                "short_circuited": self._breaker.short_circuited,
            },
        )
        hits, misses = stats.hits, stats.misses
        logger.info(
            "cache stats: hit rate %.2f%% (%d hits, %d misses), %s keys",
            hit_rate(hits, misses),
            hits,
            misses,
            total_keys,
        )
        if hits + misses >= MIN_LOOKUPS_FOR_HIT_RATE_WARNING and (
            stats.local_hit_rate < LOW_HIT_RATE_THRESHOLD
        ):
            logger.warning("Low cache hit rate: %.2f%%", stats.local_hit_rate)
        return stats

    async def get_cache_stats(self) -> dict[str, Any]:
        """The spec's statistics dict: ``enabled``, ``total_keys``, ``local_hit_rate``
        (percent), ``connection_pool`` (``max_connections``, ``in_use``, ``idle``), ``redis``
        (selected INFO fields), hits and misses per kind, counters, breaker state."""
        return (await self.get_stats()).as_dict()

    def reset_stats(self) -> None:
        """Zero the local hit/miss and event counters."""
        self._stats.reset()

    async def _count_keys(self, admin: AsyncLeanPool) -> tuple[int, bool]:
        # SCAN in batches (never KEYS): Redis serves other clients between batches. Stop at
        # a time budget on a huge keyspace and say the count is a lower bound.
        deadline = time.monotonic() + SCAN_BUDGET
        cursor, total = b"0", 0
        while True:
            reply = await admin.execute("SCAN", cursor, "MATCH", SCAN_PATTERN, "COUNT", SCAN_COUNT)
            cursor, batch = cast("tuple[bytes, list[bytes]]", reply)
            total += len(batch)
            if cursor == b"0":
                return total, True
            if time.monotonic() > deadline:
                return total, False

    def _pool_stats(self) -> PoolStats:
        lean = self._lean
        if lean is None:
            return PoolStats(self.settings.max_connections, 0, 0, 0)
        # In use = slots held: a slot that leaked would show here, not as a phantom idle.
        books = lean.accounting()
        return PoolStats(
            max_connections=self.settings.max_connections,
            in_use=books.slots_held,
            idle=books.idle,
            created=books.created,
        )

    # -- helpers ------------------------------------------------------------------------

    def _near_forget(self, *keys: str) -> None:
        """Drop keys this process is about to write (and has written) from the near cache:
        it reads its own writes at once, and a read in flight cannot put the old value
        back."""
        if self._near is not None:
            self._near.invalidate(keys)

    def _ensure_listener(self) -> None:
        """Start the invalidation listener on first use (it needs a running loop/thread)."""
        listener = self._listener
        if (listener is not None and listener.is_alive()) or self._stopping.is_set():
            return
        if self._pool is None:
            return
        with self._replay_lock:
            listener = self._listener
            if listener is None or not listener.is_alive():
                # Also restarts a listener that ended without the manager closing (its
                # task cancelled from outside): the near cache must not stay off unseen.
                self._listener = spawn(self._near_listen, "crmcache-near-cache-listener")

    async def _near_listen(self) -> None:
        """Keep a tracking connection subscribed; turn its messages into invalidations.

        Serves the near cache only while subscribed; every disconnect flushes it, and the
        loop reconnects with backoff until the manager closes.
        """
        near, pool = self._near, self._pool
        if near is None or pool is None:
            return
        delay = NEAR_RECONNECT_FIRST
        while not self._stopping.is_set():
            kwargs = {
                **pool.connection_kwargs,
                "protocol": self.settings.near_cache_protocol,
                # Blocks until a message comes; a dead server is seen as a closed socket.
                "socket_timeout": None,
                "socket_keepalive": True,
                "client_name": "crmcache-near-cache",
            }
            conn = pool.connection_class(**kwargs)
            self._listener_conn = conn
            try:
                await self._near_subscribe(conn)
                near.set_live(True)
                delay = NEAR_RECONNECT_FIRST
                logger.info("near cache live: tracking crm:prefs: and crm:template: keys")
                while not self._stopping.is_set():
                    keys = invalidated_keys(await conn.read_response(push_request=True))
                    if keys is not NOT_AN_INVALIDATION:
                        near.invalidate(keys)
            except (RedisError, OSError) as exc:
                if not self._stopping.is_set():
                    logger.warning(
                        "near cache off until Redis tracking is back: %s",
                        self._guard.scrub(f"{type(exc).__name__}: {exc}"),
                    )
            except Exception as exc:  # noqa: BLE001 - the listener must outlive any message
                logger.error(  # noqa: TRY400 - one scrubbed line; a traceback could show a secret
                    "near cache off after an unexpected error in its listener; reconnecting: %s",
                    self._guard.scrub(f"{type(exc).__name__}: {exc}"),
                )
            finally:
                # Cancelled included: nothing is served once no invalidation can arrive.
                near.set_live(False)
                await conn.disconnect(nowait=True)
            await self._stopping.wait(delay)
            delay = min(delay * 2, NEAR_RECONNECT_MAX)

    async def _near_subscribe(self, conn: Any) -> None:  # noqa: ANN401 - a redis-py connection
        await conn.connect()
        prefixes = ("PREFIX", "crm:prefs:", "PREFIX", "crm:template:")
        if self.settings.near_cache_protocol == 3:
            conn._parser.set_invalidation_push_handler(_pass_push)
            await conn.send_command("CLIENT", "TRACKING", "ON", "BCAST", *prefixes)
            await conn.read_response()
            return
        await conn.send_command("CLIENT", "ID")
        client_id = await conn.read_response()
        await conn.send_command(
            "CLIENT", "TRACKING", "ON", "REDIRECT", client_id, "BCAST", *prefixes
        )
        await conn.read_response()
        await conn.send_command("SUBSCRIBE", "__redis__:invalidate")
        await conn.read_response()

    def _invalidation_failed(self, kind: PendingKind, key: str, version: int | None) -> None:
        """Count, log (throttled) and remember a failed invalidation for replay."""
        self._stats.count(Counter.INVALIDATIONS_FAILED)
        if not self._pending.add(kind, key, version) and kind is PendingKind.TEMPLATE:
            logger.error("invalidation of %s lost: too many pending while Redis is away", key)
        # A lost invalidation can leave a stale value for up to its TTL: say so, but do not
        # write one line per call during an outage.
        suppressed = self._invalidation_warnings.ready()
        if suppressed is not None:
            logger.warning(
                "could not invalidate %s: Redis unavailable; will retry when it is back "
                "(%d more not logged)",
                key,
                suppressed,
            )
        self._start_replay()

    def _defer_invalidation(self, kind: PendingKind, key: str, version: int | None) -> None:
        """Queue an invalidation whose caller was cancelled (or interrupted) before Redis
        confirmed it: Redis may or may not have it, so the replay sends it (again).
        Sending it twice is harmless (a tombstone keeps the higher version); losing it
        could serve a stale value for up to its TTL."""
        self._near_forget(key)
        if self._stopping.is_set():
            return
        self._pending.add(kind, key, version)
        logger.debug("invalidation of %s interrupted; queued for replay", key)
        self._start_replay()

    def _start_replay(self) -> None:
        """Run the replay thread if invalidations are pending and none is running."""
        if not self._pending or self._stopping.is_set():
            return
        with self._replay_lock:
            if self._replayer is not None and self._replayer.is_alive():
                return
            self._replayer = spawn(self._replay_loop, "crmcache-invalidation-replay")

    async def _replay_loop(self) -> None:
        delay = REPLAY_FIRST_DELAY
        while not await self._stopping.wait(delay):
            if await self._replay_once():
                return
            delay = min(delay * 2, REPLAY_MAX_DELAY)

    async def _replay_once(self) -> bool:
        """Send every pending invalidation; True when none is left."""
        lean, scripts = self._lean, self._scripts
        if lean is None or scripts is None:
            return True
        for entry in self._pending.snapshot():
            if entry.kind is PendingKind.PREFERENCES:
                args = ["" if entry.version is None else entry.version, self._tombstone_ms]
                reply = await self._call(
                    "replay_invalidation",
                    lean.evalsha,
                    scripts.prefs_invalidate,
                    [entry.key],
                    args,
                )
            else:
                reply = await self._call("replay_invalidation", lean.execute, "DEL", entry.key)
            if reply is FAILED:
                return False
            self._pending.done(entry)
            self._stats.count(Counter.INVALIDATIONS_REPLAYED)
            logger.info("replayed invalidation of %s", entry.key)
        if self._pending.prefs_overflowed:
            shortened = await self._call("replay_invalidation", self._shorten_all_preferences)
            if shortened is FAILED:
                return False
            self._pending.clear_overflow()
            logger.warning(
                "too many invalidations were pending: shortened the TTL of %d cached "
                "preferences to %ds",
                shortened,
                self.settings.tombstone_ttl,
            )
        return not self._pending

    async def _shorten_all_preferences(self) -> int:
        admin = self._admin
        if admin is None:
            return 0
        count, cursor = 0, b"0"
        while True:
            reply = await admin.execute(
                "SCAN", cursor, "MATCH", "crm:prefs:*", "COUNT", SCAN_COUNT
            )
            cursor, batch = cast("tuple[bytes, list[bytes]]", reply)
            for key in batch:
                # PEXPIRE ... LT would be exact but needs Redis 7; a longer TTL is only
                # shortened to the tombstone TTL, a shorter one lengthened to it at most.
                await admin.execute("PEXPIRE", key, self._tombstone_ms)
                count += 1
            if cursor == b"0":
                return count

    async def _evict(self, key: str, raw: bytes | None, reason: str) -> None:
        """Delete a value that failed to decode (only if unchanged) and count it."""
        self._near_forget(key)
        self._stats.count(Counter.CORRUPT_VALUES)
        logger.warning("undecodable value at %s (%s): deleted, treated as a miss", key, reason)
        scripts, lean = self._scripts, self._active()
        if scripts is not None and lean is not None:
            args = ["wrongtype", b""] if raw is None else ["value", raw]
            await self._call("evict", lean.evalsha, scripts.delete_if_equals, [key], args)


_managers: dict[str, AsyncCRMCacheManager] = {}
_managers_lock = threading.Lock()


def get_async_cache_manager(
    redis_url: str | None = None,
    **kwargs: Any,  # noqa: ANN401 - the manager's keyword arguments
) -> AsyncCRMCacheManager:
    """Return the process-wide manager for ``redis_url``, creating it on first use.

    Thread-safe: concurrent first calls create one manager. ``kwargs`` (the manager's
    keyword arguments) apply only when the manager is created. A closed manager is
    replaced by a new one.

    Args:
        redis_url: default ``$REDIS_URL`` or ``redis://localhost:6379/0``.
    """
    url = resolve_settings(redis_url=redis_url, enabled=True).redis_url
    manager = _managers.get(url)
    if manager is not None and not manager._closed:
        return manager
    with _managers_lock:
        manager = _managers.get(url)
        if manager is None or manager._closed:
            manager = AsyncCRMCacheManager(url, **kwargs)
            _managers[url] = manager
        return manager


async def close_async_cache_managers() -> None:
    """Close and forget every manager made by :func:`get_async_cache_manager`."""
    with _managers_lock:
        managers = list(_managers.values())
        _managers.clear()
    for manager in managers:
        await manager.aclose()
