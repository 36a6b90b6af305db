"""Commands in RESP, packed without redis-py's per-argument overhead (no I/O).

redis-py's ``pack_command`` costs more than a loopback round trip's share of a call; the
data paths (the lean pool and the shared connections) pack the common argument types
here, byte for byte as redis-py would, and hand anything else to redis-py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["pack"]


def pack(args: Sequence[Any]) -> bytes:
    """``args`` as one RESP command, as redis-py's encoder writes it (str as UTF-8, int
    and float by ``repr``, bytes as they are), without its per-argument overhead.

    Raises:
        TypeError: an argument of another type (bool included, which redis-py refuses),
            or a command name with a space (redis-py splits it): the caller falls back to
            redis-py's packer.
    """
    if " " in args[0]:
        raise TypeError("a command name of several words")
    parts = [b"*%d\r\n" % len(args)]
    append = parts.append
    for arg in args:
        kind = type(arg)
        if kind is bytes:
            data = arg
        elif kind is str:
            data = arg.encode()
        elif kind is int:
            data = b"%d" % arg
        elif kind is float:
            data = repr(arg).encode()
        else:
            raise TypeError(kind.__name__)
        append(b"$%d\r\n" % len(data))
        append(data)
        append(b"\r\n")
    return b"".join(parts)
