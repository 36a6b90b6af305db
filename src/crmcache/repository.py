"""Read-through repository: the cache in front of a real database.

Import path kept from the spec::

    from crmcache.repository import CommunicationRepository

    repository = CommunicationRepository(db_manager=db_manager, cache_manager=cache_manager)
    preferences = repository.get_client_preferences("client-123")  # cache first
    repository.save_client_preferences(preferences)                # database, then cache

``CommunicationRepository`` is generated from ``AsyncCommunicationRepository``
(``crmcache/_async/repository.py``); both are exported here.
"""

from __future__ import annotations

from ._async.repository import AsyncCommunicationRepository
from ._stats import RepositoryStats
from ._sync.repository import CommunicationRepository

__all__ = ["AsyncCommunicationRepository", "CommunicationRepository", "RepositoryStats"]
