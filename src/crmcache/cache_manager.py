"""The cache manager (import path kept from the spec).

``from crmcache.cache_manager import CRMCacheManager, get_cache_manager``. The classes are
generated from the async source (``crmcache/_async/``) into
``crmcache/_sync/``; this module only gives them their public home.
"""

from __future__ import annotations

from ._async.manager import (
    AsyncCRMCacheManager,
    AsyncLoadLease,
    close_async_cache_managers,
    get_async_cache_manager,
)
from ._config import DEFAULT_LEASE_TTL
from ._keys import TemplateRef
from ._sync.manager import (
    CRMCacheManager,
    LoadLease,
    close_cache_managers,
    get_cache_manager,
)
from .models import LeaseState, SendClaim

__all__ = [
    "DEFAULT_LEASE_TTL",
    "AsyncCRMCacheManager",
    "AsyncLoadLease",
    "CRMCacheManager",
    "LeaseState",
    "LoadLease",
    "SendClaim",
    "TemplateRef",
    "close_async_cache_managers",
    "close_cache_managers",
    "get_async_cache_manager",
    "get_cache_manager",
]
