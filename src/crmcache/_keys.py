"""Every Redis key crmcache uses is built here, from validated parts.

Key formats (fixed by the spec), all under one prefix, ``crm`` by default (the
``key_prefix`` setting, ``$CACHE_KEY_PREFIX``)::

    <prefix>:prefs:<client_id>            client preferences, TTL = cache_ttl
    <prefix>:template:<channel>:<name>    message templates, no TTL
    <prefix>:ratelimit:<api>:<window>     rate-limit counters, TTL = window
    <prefix>:lease:prefs:<client_id>      database-load leases, TTL = a few seconds
    <prefix>:send:<idempotency_key>       send claims (claim_send), TTL = the claim's ttl

A manager builds one :class:`KeySpace` from its prefix and takes every key and pattern
from it. The module-level constants and functions are the default key space's
(``crm:...``, the spec's formats).

User-supplied parts are validated before they reach a key: they must be ``str``,
non-blank, at most ``max_length`` characters, and free of control characters. Glob
characters and ``{}`` braces are allowed: crmcache never matches user input against a
pattern (no ``KEYS``, and ``SCAN`` only ever uses the fixed patterns below). The prefix
itself goes into those patterns and into a cluster's hash slots, so it may hold neither
(see :func:`check_key_prefix`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from .models import MessageChannel

__all__ = [
    "DEFAULT_KEYS",
    "DEFAULT_KEY_PREFIX",
    "KEY_PREFIX",
    "MAX_BATCH",
    "MAX_KEY_PREFIX_LENGTH",
    "PREFS_PREFIX",
    "PREFS_SCAN_PATTERN",
    "SCAN_PATTERN",
    "TEMPLATE_PREFIX",
    "TEMPLATE_ROOT",
    "TRACKED_PREFIXES",
    "KeySpace",
    "TemplateRef",
    "check_channel",
    "check_id",
    "check_key_prefix",
    "lease_key",
    "prefs_key",
    "rate_limit_key",
    "send_key",
    "template_key",
    "template_key_for",
    "template_keys",
]

#: Most templates one batched call may ask for.
MAX_BATCH = 10_000

#: A template is named by (name, channel); the channel may be given as its string value.
TemplateRef = tuple[str, MessageChannel | str]

_CHANNELS: dict[str, MessageChannel] = {c.value: c for c in MessageChannel}

#: The prefix of every key unless ``key_prefix`` / ``$CACHE_KEY_PREFIX`` says otherwise.
DEFAULT_KEY_PREFIX = "crm"
#: Longest ``key_prefix`` accepted, in characters.
MAX_KEY_PREFIX_LENGTH = 64
#: Refused in a prefix: glob characters and their escape (it opens every SCAN MATCH
#: pattern) and braces (a cluster hashes only the part between them).
_PREFIX_FORBIDDEN = frozenset("*?[]\\{}")


def check_key_prefix(value: object, *, error: type[ValueError] = ValueError) -> str:
    """Validate a key prefix (``crm`` in ``crm:prefs:<id>``) and return it.

    A prefix is 1 to :data:`MAX_KEY_PREFIX_LENGTH` printable characters without
    whitespace, glob characters (``*?[]\\``) or braces (``{}``).

    Raises:
        TypeError: ``value`` is not a ``str``.
        ValueError (``error``): the prefix is empty, too long, or holds a refused
            character. The message names ``key_prefix``.
    """
    if not isinstance(value, str):
        raise TypeError(f"key_prefix must be a str, not {type(value).__name__}")
    value = str.__str__(value)
    if not value:
        raise error("key_prefix must not be empty")
    if len(value) > MAX_KEY_PREFIX_LENGTH:
        raise error(f"key_prefix is longer than {MAX_KEY_PREFIX_LENGTH} characters ({len(value)})")
    if not value.isprintable() or any(char.isspace() for char in value):
        raise error(f"key_prefix must not contain whitespace or control characters: {value!r}")
    refused = sorted(set(value) & _PREFIX_FORBIDDEN)
    if refused:
        raise error(
            f"key_prefix must not contain glob characters or braces ({''.join(refused)}): "
            f"{value!r}"
        )
    return value


def _template_table(root: str) -> Mapping[object, str]:
    """Key prefix per channel, under the enum member and its string value alike. A plain
    dict, typed read-only: it is looked up on every template call (a mapping proxy's
    ``get`` costs more)."""
    return {
        **{c: f"{root}{c.value}:" for c in MessageChannel},
        **{c.value: f"{root}{c.value}:" for c in MessageChannel},
    }


@dataclass(frozen=True, slots=True)
class KeySpace:
    """Every key and pattern under one prefix, computed once (a manager holds one).

    ``KeySpace("crm")`` gives the spec's formats; ``KeySpace("staging")`` the same under
    ``staging:``. The prefix is validated (:func:`check_key_prefix`).
    """

    #: The prefix as configured, without the colon: ``crm``.
    prefix: str
    #: ``<prefix>:``: every key starts with it.
    root: str = field(init=False, repr=False)
    #: ``<prefix>:prefs:``: a client id appended makes its preferences' key.
    prefs_prefix: str = field(init=False, repr=False)
    #: ``<prefix>:template:``.
    template_root: str = field(init=False, repr=False)
    #: ``<prefix>:ratelimit:``.
    rate_limit_prefix: str = field(init=False, repr=False)
    #: ``<prefix>:lease:prefs:``.
    lease_prefix: str = field(init=False, repr=False)
    #: ``<prefix>:send:``: an idempotency key appended makes its send claim's key.
    send_prefix: str = field(init=False, repr=False)
    #: Everything this key space owns (counted by get_cache_stats with SCAN, never KEYS).
    scan_pattern: str = field(init=False, repr=False)
    #: Every cached preference (the replay shortens their TTL after an overflow).
    prefs_scan_pattern: str = field(init=False, repr=False)
    #: What the near cache tracks (``CLIENT TRACKING ... BCAST PREFIX``).
    tracked_prefixes: tuple[str, ...] = field(init=False, repr=False)
    #: Key prefix per channel (``<prefix>:template:<channel>:``), under the enum member
    #: and its string value alike.
    template_prefix: Mapping[object, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        prefix = check_key_prefix(self.prefix)
        root = f"{prefix}:"
        values = {
            "prefix": prefix,
            "root": root,
            "prefs_prefix": f"{root}prefs:",
            "template_root": f"{root}template:",
            "rate_limit_prefix": f"{root}ratelimit:",
            "lease_prefix": f"{root}lease:prefs:",
            "send_prefix": f"{root}send:",
            "scan_pattern": f"{root}*",
            "prefs_scan_pattern": f"{root}prefs:*",
            "tracked_prefixes": (f"{root}prefs:", f"{root}template:"),
            "template_prefix": _template_table(f"{root}template:"),
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def prefs_key(self, client_id: str) -> str:
        """Key of a client's cached preferences: ``<prefix>:prefs:<client_id>``."""
        return self.prefs_prefix + client_id

    def template_key(self, channel: MessageChannel, name: str) -> str:
        """Key of a cached template: ``<prefix>:template:<channel>:<name>``."""
        return self.template_prefix[channel] + name

    def lease_key(self, client_id: str) -> str:
        """Key of the lease on loading a client's preferences:
        ``<prefix>:lease:prefs:<client_id>``."""
        return self.lease_prefix + client_id

    def rate_limit_key(self, api: str, window: int) -> str:
        """Key of a rate-limit counter: ``<prefix>:ratelimit:<api>:<window>``."""
        return f"{self.rate_limit_prefix}{api}:{window}"

    def send_key(self, idempotency_key: str) -> str:
        """Key of a send claim: ``<prefix>:send:<idempotency_key>``."""
        return self.send_prefix + idempotency_key

    def template_key_for(self, name: object, channel: object, max_length: int) -> str:
        """Validate a template's ``name`` and ``channel`` and return its key (see
        :func:`template_key_for`)."""
        return template_key_for(name, channel, max_length, self.template_prefix)

    def template_keys(
        self, templates: Iterable[TemplateRef], max_length: int
    ) -> tuple[list[TemplateRef], list[str]]:
        """Validate ``(name, channel)`` pairs; return the distinct pairs and their keys
        (see :func:`template_keys`)."""
        return template_keys(templates, max_length, self.template_prefix)


#: The default key space: the spec's ``crm:...`` formats.
DEFAULT_KEYS = KeySpace(DEFAULT_KEY_PREFIX)
#: The default prefix of every key, with its colon: ``crm:``.
KEY_PREFIX = DEFAULT_KEYS.root
PREFS_PREFIX = DEFAULT_KEYS.prefs_prefix
TEMPLATE_ROOT = DEFAULT_KEYS.template_root
_RATE_LIMIT_PREFIX = DEFAULT_KEYS.rate_limit_prefix
_LEASE_PREFIX = DEFAULT_KEYS.lease_prefix
_SEND_PREFIX = DEFAULT_KEYS.send_prefix
#: Everything the default key space owns.
SCAN_PATTERN = DEFAULT_KEYS.scan_pattern
#: Every cached preference under the default prefix.
PREFS_SCAN_PATTERN = DEFAULT_KEYS.prefs_scan_pattern
#: What the near cache tracks under the default prefix.
TRACKED_PREFIXES = DEFAULT_KEYS.tracked_prefixes


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


def send_key(idempotency_key: str) -> str:
    """Key of a send claim: ``crm:send:<idempotency_key>``."""
    return _SEND_PREFIX + idempotency_key


#: Key prefix per channel under the default prefix, under the enum member and its string
#: value alike.
TEMPLATE_PREFIX: Mapping[object, str] = DEFAULT_KEYS.template_prefix


def template_key_for(
    name: object, channel: object, max_length: int, table: Mapping[object, str] = TEMPLATE_PREFIX
) -> str:
    """Validate a template's ``name`` and ``channel`` and return its key.

    Args:
        table: the key prefix per channel (a :class:`KeySpace`'s ``template_prefix``);
            default the default key space's.

    Raises:
        TypeError, ValueError: a bad ``name`` or an unknown ``channel``.
    """
    prefix = table.get(channel) if isinstance(channel, str) else None
    if prefix is None:
        prefix = table[check_channel(channel)]
    return prefix + check_id("name", name, max_length)


#: Pairs whose keys a manager remembers (:func:`template_keys`'s ``memo``), at most.
TEMPLATE_KEY_MEMO_SIZE: Final = 4096


def template_keys(
    templates: Iterable[TemplateRef],
    max_length: int,
    table: Mapping[object, str] = TEMPLATE_PREFIX,
    memo: dict[TemplateRef, str] | None = None,
) -> tuple[list[TemplateRef], list[str]]:
    """Validate ``(name, channel)`` pairs; return the distinct pairs and their keys.

    Args:
        memo: pairs already validated, and their keys (the manager's, for ``table`` and
            ``max_length``): a pair of two plain ``str`` found there is not checked
            again (a batch is mostly the same hot templates). At most
            :data:`TEMPLATE_KEY_MEMO_SIZE`, emptied when full.

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
        # Only plain str pairs are memoized (no __eq__ or __hash__ of a caller's own).
        plain = memo is not None and type(item[0]) is str and type(item[1]) in _PLAIN_CHANNEL
        known = memo.get(item) if plain and memo is not None else None
        if known is None:
            # The right side runs first: a bad (or unhashable) name is reported before
            # the pair is hashed.
            known = template_key_for(item[0], item[1], max_length, table)
            if plain and memo is not None:
                if len(memo) >= TEMPLATE_KEY_MEMO_SIZE:
                    memo.clear()
                memo[item] = known
        keys[item] = known
        if len(keys) > MAX_BATCH:
            raise ValueError(f"templates may name at most {MAX_BATCH} templates")
    return list(keys), list(keys.values())


#: Channel types a memoized pair may hold (a StrEnum member hashes as its value).
_PLAIN_CHANNEL: Final = frozenset({str, MessageChannel})
