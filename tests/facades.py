"""Run the sync test suite against the async facade.

``pytest --facade=async`` makes ``CRMCacheManager``, ``get_cache_manager``,
``close_cache_managers`` and ``CommunicationRepository`` (as the tests import them from
``crmcache``, ``crmcache.cache_manager`` and ``crmcache.repository``) stand-ins that
drive the async classes on one background event loop. Every test then exercises
``AsyncCRMCacheManager`` and ``AsyncCommunicationRepository`` through the same
assertions as the sync facade; tests about sync-only machinery are marked ``sync_only``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from collections.abc import Coroutine
from typing import Any

import crmcache
import crmcache.cache_manager
import crmcache.repository
import crmcache.templates
from crmcache import AsyncCRMCacheManager
from crmcache._async import manager as async_manager
from crmcache.repository import AsyncCommunicationRepository
from crmcache.store import PreferenceStore, ThreadedAsyncStore
from crmcache.templates import AsyncFileTemplateSource

_loop: asyncio.AbstractEventLoop | None = None
_stand_ins: dict[int, Any] = {}
_loop_lock = threading.Lock()


def loop() -> asyncio.AbstractEventLoop:
    """The background event loop every async object of the test session runs on."""
    global _loop  # noqa: PLW0603 - one loop per test session, made on first use
    with _loop_lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="facade-loop", daemon=True).start()
        return _loop


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on the background loop and wait for its result."""
    return asyncio.run_coroutine_threadsafe(coro, loop()).result()


def _wrap(value: Any) -> Any:
    if type(value).__module__.startswith(("crmcache._async", "crmcache._mux")):
        return Proxy(value)
    return value


class Proxy:
    """Forwards attribute access; coroutine methods run on the loop, results re-wrapped."""

    def __init__(self, target: Any) -> None:
        object.__setattr__(self, "_target", target)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if inspect.iscoroutinefunction(value):

            @functools.wraps(value)
            def call(*args: Any, **kwargs: Any) -> Any:
                return _wrap(run(value(*args, **kwargs)))

            return call
        return _wrap(value)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._target, name, value)

    def __repr__(self) -> str:
        return repr(self._target)


class ManagerOverAsync(Proxy):
    """``CRMCacheManager(...)`` that is really an ``AsyncCRMCacheManager`` on the loop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(AsyncCRMCacheManager(*args, **kwargs))

    @classmethod
    def wrapping(cls, target: AsyncCRMCacheManager) -> ManagerOverAsync:
        """The one stand-in of ``target`` (so ``is`` compares like the sync registry's)."""
        with _loop_lock:
            proxy = _stand_ins.get(id(target))
            if proxy is None or proxy._target is not target:
                proxy = cls.__new__(cls)
                object.__setattr__(proxy, "_target", target)
                _stand_ins[id(target)] = proxy
            return proxy

    def close(self) -> None:
        run(self._target.aclose())

    def __enter__(self) -> ManagerOverAsync:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Proxy) and other._target is self._target

    def __hash__(self) -> int:
        return id(self._target)


def get_cache_manager(redis_url: str | None = None, **kwargs: Any) -> ManagerOverAsync:
    """``get_cache_manager`` over the async registry."""
    return ManagerOverAsync.wrapping(async_manager.get_async_cache_manager(redis_url, **kwargs))


def close_cache_managers() -> None:
    """``close_cache_managers`` over the async registry."""
    run(async_manager.close_async_cache_managers())


class RepositoryOverAsync(Proxy):
    """``CommunicationRepository(...)`` that is really the async repository on the loop."""

    def __init__(
        self,
        db_manager: PreferenceStore,
        cache_manager: Any = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(db_manager, PreferenceStore):
            raise TypeError(
                "db_manager must offer load_preferences() and save_preferences() "
                f"(crmcache.store.PreferenceStore), not {type(db_manager).__name__}"
            )
        target_cache = cache_manager._target if isinstance(cache_manager, Proxy) else cache_manager
        super().__init__(
            AsyncCommunicationRepository(ThreadedAsyncStore(db_manager), target_cache, **kwargs)
        )
        object.__setattr__(self, "db", db_manager)


class FileTemplateSourceOverAsync(Proxy):
    """``FileTemplateSource(...)`` that is really an ``AsyncFileTemplateSource`` on the loop."""

    def __init__(self, root: Any, cache: Any = None, **kwargs: Any) -> None:
        target_cache = cache._target if isinstance(cache, Proxy) else cache
        super().__init__(AsyncFileTemplateSource(root, target_cache, **kwargs))


def install() -> None:
    """Point the names the tests import at the async stand-ins."""
    for module in (crmcache, crmcache.cache_manager):
        module.CRMCacheManager = ManagerOverAsync  # type: ignore[misc,assignment]
        module.get_cache_manager = get_cache_manager  # type: ignore[assignment]
        module.close_cache_managers = close_cache_managers  # type: ignore[assignment]
    crmcache.repository.CommunicationRepository = RepositoryOverAsync  # type: ignore[misc,assignment]
    crmcache.templates.FileTemplateSource = FileTemplateSourceOverAsync  # type: ignore[misc,assignment]
