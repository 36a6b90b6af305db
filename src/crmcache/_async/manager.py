"""The public cache manager: the spec's constructor over the composed concerns.

Written once, in ``crmcache/_async/`` (the source); ``scripts/unasync.py`` generates
``crmcache/_sync/`` from it. Each concern is a mixin in a file of its own
(``preferences.py``, ``templates.py``, ``ratelimits.py``, ``ratelimit_sets.py``,
``leases.py``, ``sendguards.py``, ``health.py``) over one core (``core.py``: state, the
transport, the guarded call, lifecycle); every byte goes through a transport
(``transport.py``; one node: ``node.py``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from .._config import (
    DEFAULT_BREAKER_FAILURES,
    DEFAULT_BREAKER_MAX_BACKOFF,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_ID_LENGTH,
    DEFAULT_MAX_TEMPLATE_BYTES,
    DEFAULT_NEAR_CACHE_SIZE,
    DEFAULT_NEAR_CACHE_TTL,
    DEFAULT_PIPELINE_CONNECTIONS,
    DEFAULT_POOL_TIMEOUT,
    DEFAULT_SOCKET_CONNECT_TIMEOUT,
    DEFAULT_SOCKET_TIMEOUT,
    DEFAULT_TOMBSTONE_TTL,
    RateLimitPolicy,
    SendGuardPolicy,
    resolve_settings,
)
from .core import AsyncCacheCore
from .health import AsyncStatsMixin
from .leases import AsyncLeasesMixin, AsyncLoadLease
from .preferences import AsyncPreferencesMixin
from .ratelimit_sets import AsyncRateLimitSetsMixin
from .ratelimits import AsyncRateLimitsMixin
from .sendguards import AsyncSendGuardsMixin
from .templates import AsyncTemplatesMixin

__all__ = [
    "AsyncCRMCacheManager",
    "AsyncLoadLease",
    "close_async_cache_managers",
    "get_async_cache_manager",
]

logger = logging.getLogger("crmcache")


class AsyncCRMCacheManager(
    AsyncPreferencesMixin,
    AsyncTemplatesMixin,
    AsyncRateLimitsMixin,
    AsyncRateLimitSetsMixin,
    AsyncLeasesMixin,
    AsyncSendGuardsMixin,
    AsyncStatsMixin,
    AsyncCacheCore,
):
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
        key_prefix: the prefix of every key (``<prefix>:prefs:<client_id>`` ...), so
            environments and tenants can share a Redis (or a cluster, which has no
            database numbers) without sharing keys; default ``$CACHE_KEY_PREFIX`` or
            ``crm``. 1 to 64 printable characters, no whitespace, ``*?[]\\`` or ``{}``.
        pipelining: auto-pipeline the data path: concurrent calls share
            ``pipeline_connections`` connections per node and their commands are written
            together (``crmcache._mux``: once per event-loop turn; ``crmcache._mux_sync``:
            whatever threads queued while one was writing). Default on for the async
            facade, off for the sync facade (faster with many threads, about 1.8x at 16,
            no faster at 4, slower below: docs/guides/pipelining.md). ``False`` keeps the
            lean pool.
        pipeline_connections: shared connections per node when pipelining (1 to 64;
            default 1, the fastest measured). The async facade opens one more per node
            for template reads, so a large template never delays the other calls.
        send_guard_policy: what ``claim_send`` answers when Redis cannot be asked:
            ``"open"`` (True: send, a duplicate is possible; the default) or
            ``"closed"`` (False: do not send, the message is dropped like a duplicate).
        metrics_latency: time every Redis call into per-operation latency histograms,
            exported by ``crmcache.metrics`` (about 0.2 µs a call; default off, and then
            free). A collector built with ``latency=True`` turns it on too.
        breaker_failures: consecutive connection failures (refused, timed out) that open
            the circuit breaker (default 5); while it is open, calls degrade at once
            instead of waiting for Redis. On a cluster each primary has its own breaker
            with the same settings.
        breaker_max_backoff: longest wait, in seconds, between two probes of an open
            breaker (default 30): the first probe goes after 1 s (or this, if shorter),
            and the wait doubles after each failed probe up to this.

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
        key_prefix: str | None = None,
        pipelining: bool | None = None,
        pipeline_connections: int = DEFAULT_PIPELINE_CONNECTIONS,
        send_guard_policy: SendGuardPolicy = "open",
        metrics_latency: bool = False,
        breaker_failures: int = DEFAULT_BREAKER_FAILURES,
        breaker_max_backoff: float = DEFAULT_BREAKER_MAX_BACKOFF,
    ) -> None:
        settings = resolve_settings(
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
            key_prefix=key_prefix,
            pipelining=pipelining,
            pipeline_connections=pipeline_connections,
            send_guard_policy=send_guard_policy,
            metrics_latency=metrics_latency,
            breaker_failures=breaker_failures,
            breaker_max_backoff=breaker_max_backoff,
        )
        super().__init__(settings)
        logger.info(
            "crmcache initialised: url=%s key_prefix=%s enabled=%s max_connections=%d "
            "cache_ttl=%ds",
            settings.masked_url,
            settings.key_prefix,
            settings.enabled,
            settings.max_connections,
            settings.cache_ttl,
        )


#: Keyed by (URL, key prefix): two prefixes on one Redis are two managers.
_managers: dict[tuple[str, str], AsyncCRMCacheManager] = {}
_managers_lock = threading.Lock()


def get_async_cache_manager(
    redis_url: str | None = None,
    **kwargs: Any,  # noqa: ANN401 - the manager's keyword arguments
) -> AsyncCRMCacheManager:
    """Return the process-wide manager for ``redis_url`` and its key prefix, creating it
    on first use.

    Thread-safe: concurrent first calls create one manager. Managers are told apart by
    URL and ``key_prefix`` (the argument, else ``$CACHE_KEY_PREFIX``, else ``crm``); the
    other ``kwargs`` (the manager's keyword arguments) apply only when the manager is
    created. A closed manager is replaced by a new one.

    Args:
        redis_url: default ``$REDIS_URL`` or ``redis://localhost:6379/0``.
    """
    resolved = resolve_settings(
        redis_url=redis_url, enabled=True, key_prefix=kwargs.get("key_prefix")
    )
    name = (resolved.redis_url, resolved.key_prefix)
    manager = _managers.get(name)
    if manager is not None and not manager._closed:
        return manager
    with _managers_lock:
        manager = _managers.get(name)
        if manager is None or manager._closed:
            kwargs["key_prefix"] = resolved.key_prefix
            manager = AsyncCRMCacheManager(resolved.redis_url, **kwargs)
            _managers[name] = manager
        return manager


async def close_async_cache_managers() -> None:
    """Close and forget every manager made by :func:`get_async_cache_manager`."""
    with _managers_lock:
        managers = list(_managers.values())
        _managers.clear()
    for manager in managers:
        await manager.aclose()
