"""Reply contracts: what each command crmcache sends may get back, checked before use.

A server can be buggy, a proxy can mangle a stream, a connection can fall out of step
(an unrequested extra reply shifts every later read by one). So every reply is checked
against the shape its command can produce, in the pool, before the connection goes back
to the idle list: a reply that breaks its contract raises :class:`ProtocolError`, and
the pool closes that connection instead of reusing it. Error replies (``ResponseError``)
are raised as they are; they are not shape errors.

Only shapes and types are checked here (an int where an int is due, a list of the right
length); what the values mean (a count within its limit, a version in range) is checked
by the code that decodes them (``_ratelimit``, ``_codec``).

Sizes are bounded too, before anything is allocated: a reply may be at most
:func:`reply_budget` bytes, and an aggregate header announcing a million elements or more
is refused unparsed (:func:`huge_array_header`: hiredis would allocate the list at the
header, and freeing a list of 2^31 slots blocks the process for seconds).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Final

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

__all__ = [
    "ERROR_REPLY",
    "Check",
    "ProtocolError",
    "check_reply",
    "huge_array_header",
    "reply_budget",
    "script_contract",
]

#: What hiredis gives for an error reply (redis-py's classes): raised to the caller, never
#: checked. One union built once (``A | B`` in a call builds it on every call).
ERROR_REPLY: Final = ResponseError | RedisConnectionError

#: Bytes allowed per reply beyond its values (headers, small replies, INFO, SCAN).
_SMALL_REPLY: Final = 4 * 1024 * 1024
#: A RESP aggregate header (array, map, set, push, attribute) after a CRLF announcing a
#: million elements or more, or a negative count other than -1. hiredis allocates an
#: aggregate at its header, so these are refused before it sees them; smaller counts are
#: checked on the parsed reply. The literal CRLF prefix lets the regex engine skip ahead
#: (about 1 µs per KB scanned).
_HUGE_AFTER_CRLF: Final = re.compile(rb"\r\n[*%~>|](?:\d{7}|-(?!1\r))")
_HUGE_AT_START: Final = re.compile(rb"[*%~>|](?:\d{7}|-(?!1\r))")
_AGGREGATE_BYTES: Final = frozenset(b"*%~>|")
#: CRs looked behind one by one before the regex scans the rest of a chunk...
_CR_LOOKS: Final = 32
#: ... while they are this many bytes apart on average, or more, judged from this many
#: on (a reply's headers put two or three CRs close together before its value).
_CR_SPACING: Final = 1024
_CR_JUDGED: Final = 8
_LF: Final = ord("\n")


class ProtocolError(RedisError):
    """A reply no command of ours can get (wrong type or length, too large, unrequested):
    the server is buggy or the stream is out of step. The call degrades and its
    connection is closed."""


def huge_array_header(chunk: bytes | memoryview, *, at_start: bool = True) -> bool:
    """True if ``chunk`` holds an aggregate header announcing a million elements or more
    (or a negative count other than -1): at its first byte when a reply starts there
    (``at_start``), or after any CRLF.

    A chunk boundary may split a header; the reader checks the seam with the previous
    chunk's tail. A value that happens to hold such a line after a CRLF is refused as
    well: a template containing ``"\\r\\n*1234567"`` is served as a miss.
    """
    if at_start and chunk and chunk[0] in _AGGREGATE_BYTES and _HUGE_AT_START.match(chunk):
        return True
    if type(chunk) is not bytes:
        return _HUGE_AFTER_CRLF.search(chunk) is not None
    # In large values a CR is rare but for the framing (two per value): memchr finds
    # each, and a header is looked for right behind it, a fraction of the regex's time.
    # Where CRs come closer than _CR_SPACING bytes on average (many small replies, text
    # with CRLF line ends; judged from the _CR_JUDGED-th CR on), or past _CR_LOOKS of
    # them, the regex does the rest: one CR looked at in Python costs what the regex
    # spends on a kilobyte.
    find, end = chunk.find, len(chunk)
    at = find(b"\r")
    for looked in range(_CR_LOOKS):
        if at < 0:
            return False
        if looked >= _CR_JUDGED and at < looked * _CR_SPACING:
            break
        head = at + 2  # where an aggregate header after this CRLF would start
        if (
            head < end
            and chunk[head] in _AGGREGATE_BYTES
            and chunk[at + 1] == _LF
            and _HUGE_AT_START.match(chunk, head)
        ):
            return True
        at = find(b"\r", at + 1)
    return at >= 0 and _HUGE_AFTER_CRLF.search(chunk, at) is not None


def reply_budget(args: Sequence[Any], max_value_bytes: int) -> int:
    """The most bytes a reply to ``args`` may take: values (GET, MGET) up to
    ``max_value_bytes`` each, everything else :data:`_SMALL_REPLY`."""
    command = args[0]
    if command == "MGET":
        return (len(args) - 1) * (max_value_bytes + 32) + 32
    if command == "GET":
        return max_value_bytes + 32
    return _SMALL_REPLY


def _bulk_or_nil(reply: object, args: Sequence[Any]) -> bool:
    return reply is None or type(reply) is bytes


def _values(reply: object, args: Sequence[Any]) -> bool:
    # Values or nils: the set of the item types is within {bytes, None's type}.
    return (
        type(reply) is list
        and len(reply) == len(args) - 1
        and set(map(type, reply)) <= _BYTES_OR_NIL
    )


_BYTES_OR_NIL: Final = frozenset({bytes, type(None)})


def _ok(reply: object, args: Sequence[Any]) -> bool:
    return reply == b"OK"


def _ok_or_nil(reply: object, args: Sequence[Any]) -> bool:
    return reply is None or reply == b"OK"


def _integer(reply: object, args: Sequence[Any]) -> bool:
    return type(reply) is int


def _bulk(reply: object, args: Sequence[Any]) -> bool:
    return type(reply) is bytes


def _pong(reply: object, args: Sequence[Any]) -> bool:
    return reply == b"PONG"


def _scan(reply: object, args: Sequence[Any]) -> bool:
    return (
        type(reply) is list
        and len(reply) == 2
        and type(reply[0]) is bytes
        and reply[0].isdigit()
        and type(reply[1]) is list
        and all(type(key) is bytes for key in reply[1])
    )


def _client(reply: object, args: Sequence[Any]) -> bool:
    return reply == b"OK" or type(reply) is int  # CLIENT SETNAME / CLIENT ID


Check = Callable[[object, Sequence[Any]], bool]

#: The contract of every command the pools send (EVALSHA: see :func:`script_contract`).
_COMMANDS: Final[dict[str, Check]] = {
    "GET": _bulk_or_nil,
    "MGET": _values,
    "SET": _ok_or_nil,
    "MSET": _ok,
    "DEL": _integer,
    "PEXPIRE": _integer,
    "SCAN": _scan,
    "INFO": _bulk,
    "PING": _pong,
    "SCRIPT": _bulk,
    "AUTH": _ok,
    "SELECT": _ok,
    "CLIENT": _client,
}


def _two_ints(reply: object, args: Sequence[Any]) -> bool:
    if type(reply) is not list or len(reply) != 2:
        return False
    first, second = reply
    return type(first) is int and type(second) is int


def _three_ints(reply: object, args: Sequence[Any]) -> bool:
    # Unpacked and tested one by one: twice as fast as a set of the item types.
    if type(reply) is not list or len(reply) != 3:
        return False
    first, second, third = reply
    return type(first) is int and type(second) is int and type(third) is int


_INT: Final = {int}


def _rate_limits(reply: object, args: Sequence[Any]) -> bool:
    # {allowed, granted, then four integers per key}; args: EVALSHA sha numkeys ...
    return (
        type(reply) is list
        and len(reply) == 2 + 4 * int(args[2])
        and set(map(type, reply)) == _INT
    )


#: Each script's reply, as its ``.lua`` header declares it.
_SCRIPTS: Final[dict[str, Check]] = {
    "delete_if_equals": _integer,
    "prefs_invalidate": _integer,
    "prefs_set": _two_ints,
    "rate_limit": _three_ints,
    "rate_limits": _rate_limits,
}


def script_contract(name: str) -> Check:
    """The reply check of script ``name`` (one of ``_scripts.SCRIPT_NAMES``)."""
    return _SCRIPTS[name]


def check_reply(reply: object, args: Sequence[Any], check: Check | None = None) -> None:
    """Raise :class:`ProtocolError` unless ``reply`` keeps the contract of ``args``.

    Args:
        reply: the parsed reply (not an error reply).
        args: the command sent; ``args[0]`` names its contract.
        check: the contract to use instead (a script's, for EVALSHA).
    """
    if check is None:
        check = _COMMANDS.get(args[0])
        if check is None:
            return  # a command without a contract (tests' raw calls)
    if not check(reply, args):
        raise ProtocolError(
            f"unexpected reply to {args[0]}: {type(reply).__name__} {_preview(reply)}"
        )


def _preview(reply: object) -> str:
    """A short, safe description of a reply for a log line (never the whole value)."""
    if type(reply) is list:
        return f"of {len(reply)} element(s)"
    text = repr(reply)
    return text if len(text) <= 40 else text[:37] + "..."
