"""Every Redis key crmcache uses is built here, from validated parts.

Key formats (fixed by the spec)::

    crm:prefs:<client_id>                 client preferences, TTL = cache_ttl
    crm:template:<channel>:<name>         message templates, no TTL
    crm:ratelimit:<api>:<window>          rate-limit counters, TTL = window
    crm:lease:prefs:<client_id>           database-load leases, TTL = a few seconds

User-supplied parts are validated before they reach a key: they must be ``str``,
non-blank, at most ``max_length`` characters, and free of control characters. Glob
characters and ``{}`` braces are allowed: crmcache never matches user input against a
pattern (no ``KEYS``, and ``SCAN`` only ever uses the fixed ``crm:*`` pattern).
"""

from __future__ import annotations

from .models import MessageChannel

__all__ = [
    "KEY_PREFIX",
    "SCAN_PATTERN",
    "check_channel",
    "check_id",
    "lease_key",
    "prefs_key",
    "rate_limit_key",
    "template_key",
]

KEY_PREFIX = "crm:"
SCAN_PATTERN = "crm:*"
_CHANNELS: dict[str, MessageChannel] = {c.value: c for c in MessageChannel}


def check_id(name: str, value: object, max_length: int) -> str:
    """Validate one user-supplied key part and return it.

    Args:
        name: the argument's name, used in error messages.
        value: what the caller passed.
        max_length: the longest value accepted, in characters.

    Raises:
        TypeError: ``value`` is not a ``str``.
        ValueError: ``value`` is empty, only whitespace, too long, or holds control
            characters.
    """
    if type(value) is not str:  # exact type: the fast path for the common case
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, not {type(value).__name__}")
        # str.__str__, not str(): a (str, Enum) member must give its value, not "Api.X".
        value = str.__str__(value)
    if len(value) > max_length:
        raise ValueError(f"{name} is longer than {max_length} characters ({len(value)})")
    if not value.isprintable():
        raise ValueError(f"{name} must not contain control characters: {value!r}")
    if not value.strip():
        raise ValueError(f"{name} must not be empty or whitespace: {value!r}")
    return value


def check_channel(value: object) -> MessageChannel:
    """Accept a :class:`MessageChannel` or its string value (``"email"`` ...).

    Raises:
        TypeError: ``value`` is neither a ``MessageChannel`` nor a ``str``.
        ValueError: the string is not a known channel.
    """
    if isinstance(value, MessageChannel):
        return value
    if not isinstance(value, str):
        raise TypeError(f"channel must be a MessageChannel or str, not {type(value).__name__}")
    channel = _CHANNELS.get(value)
    if channel is None:
        known = ", ".join(sorted(_CHANNELS))
        raise ValueError(f"channel must be one of {known}; got {value!r}")
    return channel


def prefs_key(client_id: str) -> str:
    """Key of a client's cached preferences: ``crm:prefs:<client_id>``."""
    return f"crm:prefs:{client_id}"


def template_key(channel: MessageChannel, name: str) -> str:
    """Key of a cached template: ``crm:template:<channel>:<name>``."""
    return f"crm:template:{channel.value}:{name}"


def lease_key(client_id: str) -> str:
    """Key of the lease on loading a client's preferences: ``crm:lease:prefs:<client_id>``."""
    return f"crm:lease:prefs:{client_id}"


def rate_limit_key(api: str, window: int) -> str:
    """Key of a rate-limit counter: ``crm:ratelimit:<api>:<window>``."""
    return f"crm:ratelimit:{api}:{window}"
