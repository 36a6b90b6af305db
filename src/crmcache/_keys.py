"""Every Redis key crmcache uses is built here, from validated parts.

Key formats (fixed by the spec), all under :data:`KEY_PREFIX`::

    crm:prefs:<client_id>                 client preferences, TTL = cache_ttl
    crm:template:<channel>:<name>         message templates, no TTL
    crm:ratelimit:<api>:<window>          rate-limit counters, TTL = window
    crm:lease:prefs:<client_id>           database-load leases, TTL = a few seconds

User-supplied parts are validated before they reach a key: they must be ``str``,
non-blank, at most ``max_length`` characters, and free of control characters. Glob
characters and ``{}`` braces are allowed: crmcache never matches user input against a
pattern (no ``KEYS``, and ``SCAN`` only ever uses the fixed patterns below).
"""

from __future__ import annotations

from collections.abc import Iterable

from .models import MessageChannel

__all__ = [
    "KEY_PREFIX",
    "MAX_BATCH",
    "PREFS_PREFIX",
    "PREFS_SCAN_PATTERN",
    "SCAN_PATTERN",
    "TEMPLATE_PREFIX",
    "TEMPLATE_ROOT",
    "TRACKED_PREFIXES",
    "TemplateRef",
    "check_channel",
    "check_id",
    "lease_key",
    "prefs_key",
    "rate_limit_key",
    "template_key",
    "template_key_for",
    "template_keys",
]

#: The one prefix of every key crmcache writes.
KEY_PREFIX = "crm:"
PREFS_PREFIX = f"{KEY_PREFIX}prefs:"
TEMPLATE_ROOT = f"{KEY_PREFIX}template:"
_RATE_LIMIT_PREFIX = f"{KEY_PREFIX}ratelimit:"
_LEASE_PREFIX = f"{KEY_PREFIX}lease:prefs:"
#: Everything crmcache owns (counted by get_cache_stats with SCAN, never KEYS).
SCAN_PATTERN = f"{KEY_PREFIX}*"
#: Every cached preference (the replay shortens their TTL after an overflow).
PREFS_SCAN_PATTERN = f"{PREFS_PREFIX}*"
#: What the near cache tracks (``CLIENT TRACKING ... BCAST PREFIX``).
TRACKED_PREFIXES = (PREFS_PREFIX, TEMPLATE_ROOT)
#: Most templates one batched call may ask for.
MAX_BATCH = 10_000

#: A template is named by (name, channel); the channel may be given as its string value.
TemplateRef = tuple[str, MessageChannel | str]

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
    return PREFS_PREFIX + client_id


def template_key(channel: MessageChannel, name: str) -> str:
    """Key of a cached template: ``crm:template:<channel>:<name>``."""
    return f"{TEMPLATE_ROOT}{channel.value}:{name}"


def lease_key(client_id: str) -> str:
    """Key of the lease on loading a client's preferences: ``crm:lease:prefs:<client_id>``."""
    return _LEASE_PREFIX + client_id


def rate_limit_key(api: str, window: int) -> str:
    """Key of a rate-limit counter: ``crm:ratelimit:<api>:<window>``."""
    return f"{_RATE_LIMIT_PREFIX}{api}:{window}"


#: Key prefix per channel, under the enum member and its string value alike.
TEMPLATE_PREFIX: dict[object, str] = {
    **{c: template_key(c, "") for c in MessageChannel},
    **{c.value: template_key(c, "") for c in MessageChannel},
}


def template_key_for(name: object, channel: object, max_length: int) -> str:
    """Validate a template's ``name`` and ``channel`` and return its key.

    Raises:
        TypeError, ValueError: a bad ``name`` or an unknown ``channel``.
    """
    prefix = TEMPLATE_PREFIX.get(channel) if isinstance(channel, str) else None
    if prefix is None:
        prefix = TEMPLATE_PREFIX[check_channel(channel)]
    return prefix + check_id("name", name, max_length)


def template_keys(
    templates: Iterable[TemplateRef], max_length: int
) -> tuple[list[TemplateRef], list[str]]:
    """Validate ``(name, channel)`` pairs; return the distinct pairs and their keys.

    Raises:
        TypeError: not an iterable of pairs. ValueError: a bad pair, or more than
            :data:`MAX_BATCH` of them.
    """
    if isinstance(templates, str | bytes) or not isinstance(templates, Iterable):
        raise TypeError("templates must be an iterable of (name, channel) pairs")
    keys: dict[TemplateRef, str] = {}
    for item in templates:
        if not isinstance(item, tuple) or len(item) != 2:
            raise TypeError(f"templates items must be (name, channel) pairs, got {item!r}")
        # The right side runs first: a bad (or unhashable) name is reported before the
        # pair is hashed.
        keys[item] = template_key_for(item[0], item[1], max_length)
        if len(keys) > MAX_BATCH:
            raise ValueError(f"templates may name at most {MAX_BATCH} templates")
    return list(keys), list(keys.values())
