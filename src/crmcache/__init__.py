"""crmcache: a Redis caching layer for a CRM communication engine.

Client preferences, message templates, API rate limits, statistics and health, on
server-side Lua scripts with a slim Python facade::

    from crmcache import CRMCacheManager, ClientPreferences

    with CRMCacheManager(redis_url="redis://localhost:6379/0") as cache:
        preferences = cache.get_client_preferences("client-123")
"""

from __future__ import annotations

from ._config import (
    DEFAULT_CACHE_TTL,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_RATE_LIMIT_WINDOW,
    DEFAULT_REDIS_URL,
    DEFAULT_TOMBSTONE_TTL,
    CacheSettings,
    RateLimitPolicy,
    mask_url,
)
from ._errors import ConfigurationError, CRMCacheError, StaleVersionError
from ._guard import BreakerState
from ._ratelimit import RateLimitResult
from ._ratelimit_algos import RateLimit, RateLimitsResult
from ._stats import CacheStats, KindStats, PoolStats, RedisServerStats
from .cache_manager import (
    AsyncCRMCacheManager,
    CRMCacheManager,
    TemplateRef,
    close_async_cache_managers,
    close_cache_managers,
    get_async_cache_manager,
    get_cache_manager,
)
from .models import ClientPreferences, MessageChannel

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_CACHE_TTL",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_RATE_LIMIT_WINDOW",
    "DEFAULT_REDIS_URL",
    "DEFAULT_TOMBSTONE_TTL",
    "AsyncCRMCacheManager",
    "BreakerState",
    "CRMCacheError",
    "CRMCacheManager",
    "CacheSettings",
    "CacheStats",
    "ClientPreferences",
    "ConfigurationError",
    "KindStats",
    "MessageChannel",
    "PoolStats",
    "RateLimit",
    "RateLimitPolicy",
    "RateLimitResult",
    "RateLimitsResult",
    "RedisServerStats",
    "StaleVersionError",
    "TemplateRef",
    "__version__",
    "close_async_cache_managers",
    "close_cache_managers",
    "get_async_cache_manager",
    "get_cache_manager",
    "mask_url",
]
