"""Exceptions raised by crmcache.

Every exception crmcache defines derives from one root::

    CRMCacheError
    ├── ConfigurationError (also a ValueError)  bad settings: URL, TTL, pool size, env vars
    └── StaleVersionError                       a save based on an outdated row version

Bad arguments to a call raise the builtin ``ValueError`` / ``TypeError`` with the
argument's name in the message. Errors from redis-py never reach the caller of a cache
read or write: they are translated into a miss, a no-op or the rate-limit failure policy
(see ``crmcache._guard``).
"""

from __future__ import annotations

__all__ = ["CRMCacheError", "ConfigurationError", "StaleVersionError"]


class CRMCacheError(Exception):
    """Root of every exception crmcache raises on its own account."""


class ConfigurationError(CRMCacheError, ValueError):
    """A setting (argument or environment variable) is invalid.

    The message never contains a password: URLs are masked first.
    """


class StaleVersionError(CRMCacheError):
    """A write was based on a version of a row that is no longer current."""

    def __init__(self, message: str, *, expected: int, actual: int | None) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual
