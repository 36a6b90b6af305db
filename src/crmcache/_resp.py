"""Commands in RESP, packed without redis-py's per-argument overhead (no I/O).

redis-py's ``pack_command`` costs more than a loopback round trip's share of a call; the
data paths (the lean pool and the shared connections) pack the common argument types
here, byte for byte as redis-py would, and hand anything else to redis-py.

The arguments that repeat from call to call (command names, script SHAs, the keys of hot
clients and APIs, limits and windows) are packed once: :data:`_PACKED` maps a ``str`` or
``int`` argument to its RESP bulk string. It holds at most :data:`MEMO_SIZE` of them, none
longer than :data:`MEMO_MAX_BYTES`, and is emptied when full, so a stream of distinct keys
costs one dict insert each and never grows it past that bound.

Whole script calls repeat too (a hot API's rate-limit check is the same ``EVALSHA`` every
time): :data:`_COMMANDS` maps an ``EVALSHA`` whose arguments are all ``str`` or ``int`` to
its RESP bytes, bounded the same way (:data:`COMMAND_MEMO_SIZE` commands of at most
:data:`COMMAND_MEMO_MAX_BYTES`). A tuple equal to a memoized one may still hold other
types (``True == 1``, ``1.0 == 1``, an ``IntEnum`` member), which pack otherwise, so a hit
counts only after a check that every argument's type is exactly ``str`` or ``int``.

Under threads a lookup, an insert and the emptying are each one atomic dict operation: a
race can only pack an argument or a command twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

__all__ = [
    "COMMAND_MEMO_MAX_BYTES",
    "COMMAND_MEMO_SIZE",
    "MEMO_MAX_BYTES",
    "MEMO_SIZE",
    "pack",
    "pack_all",
]

#: Arguments packed once and kept, at most.
MEMO_SIZE: Final = 2048
#: Longer arguments are packed on every call (values, big keys).
MEMO_MAX_BYTES: Final = 200

#: ``str`` or ``int`` argument -> its bulk string (``$<len>\r\n<bytes>\r\n``).
_PACKED: dict[str | int, bytes] = {}

#: Whole commands packed once and kept, at most.
COMMAND_MEMO_SIZE: Final = 1024
#: Longer commands are not kept whole (their arguments may still be).
COMMAND_MEMO_MAX_BYTES: Final = 400

#: A batch of commands up to this size is written as one chunk (:func:`pack_all`).
_JOIN_BYTES: Final = 64 * 1024

#: A command of ``str`` and ``int`` arguments only -> its RESP bytes.
_COMMANDS: dict[Sequence[Any], bytes] = {}
#: The argument types a whole command may be memoized with.
_STR_INT: Final = frozenset((str, int))


def pack(args: Sequence[Any]) -> bytes:  # noqa: PLR0912 - one function: the hot path
    """``args`` as one RESP command, as redis-py's encoder writes it (str as UTF-8, int
    and float by ``repr``, bytes as they are), without its per-argument overhead.

    Raises:
        TypeError: an argument of another type (bool included, which redis-py refuses),
            or a command name with a space (redis-py splits it): the caller falls back to
            redis-py's packer.
    """
    # Scripts only (their calls repeat whole), and types first: a value's bytes would
    # take long to hash.
    whole = args[0] == "EVALSHA" and type(args) is tuple and _STR_INT.issuperset(map(type, args))
    if whole:
        packed = _COMMANDS.get(args)
        if packed is not None:
            return packed
    if " " in args[0]:
        raise TypeError("a command name of several words")
    parts = [b"*%d\r\n" % len(args)]
    append = parts.append
    memo = _PACKED
    for arg in args:
        kind = type(arg)
        # Only str and int are looked up: 1.0 and True hash like 1 but pack otherwise.
        if kind is str or kind is int:
            bulk = memo.get(arg)
            if bulk is None:
                data = arg.encode() if kind is str else b"%d" % arg
                bulk = b"$%d\r\n%b\r\n" % (len(data), data)
                if len(data) <= MEMO_MAX_BYTES:
                    if len(memo) >= MEMO_SIZE:
                        memo.clear()
                    memo[arg] = bulk
            append(bulk)
            continue
        if kind is bytes:
            data = arg
        elif kind is float:
            data = repr(arg).encode()
        else:
            raise TypeError(kind.__name__)
        append(b"$%d\r\n%b\r\n" % (len(data), data))
    packed = b"".join(parts)
    if whole and len(packed) <= COMMAND_MEMO_MAX_BYTES:
        if len(_COMMANDS) >= COMMAND_MEMO_SIZE:
            _COMMANDS.clear()
        _COMMANDS[args] = packed
    return packed


def pack_all(conn: Any, commands: Sequence[Sequence[Any]]) -> list[bytes]:  # noqa: ANN401 - a redis-py connection
    """``commands`` in RESP, to write in one go: packed by :func:`pack`, a
    command with an argument only redis-py knows how to send by redis-py. Up to
    :data:`_JOIN_BYTES` in all they come as one chunk (the sync side writes each chunk
    with a system call of its own); larger batches keep their pieces, not copied again."""
    packed: list[bytes] = []
    for args in commands:
        try:
            packed.append(pack(args))
        except TypeError:
            packed.extend(conn.pack_command(*args))
    if len(packed) > 1 and sum(map(len, packed)) <= _JOIN_BYTES:
        return [b"".join(packed)]
    return packed
