"""The public surface: ``__all__`` of ``crmcache`` and ``crmcache.testing``; import paths."""

from __future__ import annotations

import importlib

import pytest

import crmcache

EXPECTED_ALL = [
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

EXPECTED_TESTING_ALL = [
    "RedisCluster",
    "RedisServer",
    "RedisServerError",
    "SentinelGroup",
    "find_redis_server_binary",
    "free_loopback_port",
]

# Every public module whose __all__ is pinned, with its agreed names.
PINNED = {"crmcache": EXPECTED_ALL, "crmcache.testing": EXPECTED_TESTING_ALL}
PINNED_NAMES = [(module, name) for module, names in PINNED.items() for name in names]


@pytest.mark.parametrize(("module", "expected"), PINNED.items())
def test_all_is_pinned(module: str, expected: list[str]) -> None:
    """Each pinned module's __all__ is exactly the agreed public surface, in order."""
    assert list(importlib.import_module(module).__all__) == expected


@pytest.mark.parametrize("module", PINNED)
def test_all_is_sorted_and_unique(module: str) -> None:
    """__all__ is sorted (ruff's isort-style order) and names nothing twice."""
    names = list(importlib.import_module(module).__all__)
    assert len(names) == len(set(names))

    # RUF022 order: SCREAMING_CASE, then CamelCase, then the rest, each alphabetical.
    def group(name: str) -> int:
        if name.isupper():
            return 0
        if name[0].isupper():
            return 1
        return 2

    assert names == sorted(names, key=lambda n: (group(n), n))


@pytest.mark.parametrize(("module", "name"), PINNED_NAMES)
def test_every_exported_name_is_importable(module: str, name: str) -> None:
    """Each name in __all__ exists on its module and survives `from <module> import`."""
    target = importlib.import_module(module)
    assert hasattr(target, name)
    namespace: dict[str, object] = {}
    exec(f"from {module} import {name}", namespace)  # noqa: S102 - the import is the test
    assert namespace[name] is getattr(target, name)


@pytest.mark.parametrize(("module", "expected"), PINNED.items())
def test_star_import_gives_exactly_all(module: str, expected: list[str]) -> None:
    """`from <module> import *` binds exactly the names of its __all__."""
    namespace: dict[str, object] = {}
    exec(f"from {module} import *", namespace)  # noqa: S102 - the import is the test
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(expected)


def test_version_is_a_string() -> None:
    """__version__ is a non-empty dotted version string."""
    assert isinstance(crmcache.__version__, str)
    assert crmcache.__version__.count(".") >= 1


def test_spec_import_path_cache_manager() -> None:
    """The spec's `from crmcache.cache_manager import ...` path works and is the same object."""
    from crmcache.cache_manager import CRMCacheManager, get_cache_manager  # noqa: PLC0415

    assert CRMCacheManager is crmcache.CRMCacheManager
    assert get_cache_manager is crmcache.get_cache_manager


def test_spec_import_path_models() -> None:
    """The spec's `from crmcache.models import ...` path works and is the same object."""
    from crmcache.models import ClientPreferences, MessageChannel  # noqa: PLC0415

    assert ClientPreferences is crmcache.ClientPreferences
    assert MessageChannel is crmcache.MessageChannel


def test_client_preferences_defaults() -> None:
    """ClientPreferences needs only client_id and has the spec's fields with sane defaults."""
    prefs = crmcache.ClientPreferences(client_id="x")
    assert prefs.client_id == "x"
    assert prefs.timezone == "UTC"
    assert prefs.language == "en"
    assert prefs.version == 0
    assert prefs.preferred_channels == [crmcache.MessageChannel.EMAIL]
    assert prefs.preferred_channel is crmcache.MessageChannel.EMAIL


def test_client_preferences_fields_are_settable() -> None:
    """The spec's `preferences.timezone = ...` assignment works and is validated."""
    prefs = crmcache.ClientPreferences(
        client_id="x", preferred_channels=["sms", "email"], language="de", version=3
    )
    prefs.timezone = "America/Los_Angeles"
    assert prefs.timezone == "America/Los_Angeles"
    assert prefs.preferred_channel is crmcache.MessageChannel.SMS
    assert prefs.language == "de"
    assert prefs.version == 3
    with pytest.raises(ValueError, match="timezone"):
        prefs.timezone = "Not/AZone"


def test_message_channel_members() -> None:
    """MessageChannel has email, sms and whatsapp, whose values are the key strings."""
    channel = crmcache.MessageChannel
    assert {c.value for c in channel} == {"email", "sms", "whatsapp"}
    assert channel.EMAIL == "email"
    assert channel.SMS == "sms"
    assert channel.WHATSAPP == "whatsapp"
    assert channel("whatsapp") is channel.WHATSAPP


def test_configuration_error_is_a_value_error() -> None:
    """ConfigurationError is both a CRMCacheError and a ValueError (spec'd hierarchy)."""
    assert issubclass(crmcache.ConfigurationError, ValueError)
    assert issubclass(crmcache.ConfigurationError, crmcache.CRMCacheError)
    assert issubclass(crmcache.StaleVersionError, crmcache.CRMCacheError)
