"""The data paths pack commands themselves: byte for byte what redis-py sends."""

from __future__ import annotations

import random

import pytest
from redis.asyncio.connection import Connection

from crmcache import _resp
from crmcache._resp import pack


def test_pack_matches_redis_py_for_every_argument_type() -> None:
    conn = Connection()
    rng = random.Random(3)
    choices = [
        lambda: b"x" * rng.randint(0, 9000),  # large values are split by redis-py
        lambda: "é" * rng.randint(0, 5),
        lambda: rng.randint(-(10**18), 10**18),
        lambda: rng.random() * 1e6,
        lambda: "GET",
        lambda: b"",
        lambda: b"\r\n$1\r\n",
    ]
    for _ in range(3000):
        args = ("EVALSHA", *[rng.choice(choices)() for _ in range(rng.randint(0, 6))])
        assert pack(args) == b"".join(conn.pack_command(*args)), args


@pytest.mark.parametrize("args", [("SET", "k", True), ("SET", "k", None), ("CLIENT SETNAME", "x")])
def test_pack_leaves_what_redis_py_treats_specially_to_redis_py(args: tuple[object, ...]) -> None:
    with pytest.raises(TypeError):
        pack(args)


def test_packed_arguments_are_memoized_within_a_bound() -> None:
    conn = Connection()
    # Repeats come from the memo and stay byte-exact; 1 is memoized before 1.0 and True,
    # which hash alike but pack otherwise (True is refused, as by redis-py).
    for _ in range(3):
        for args in [("EVALSHA", "a" * 40, 1, "crm:ratelimit:x:60", 10, 60_000, 1), ("GET", "é")]:
            assert pack(args) == b"".join(conn.pack_command(*args))
    assert pack(("SET", "k", 1.0)) == b"".join(conn.pack_command("SET", "k", 1.0))
    with pytest.raises(TypeError):
        pack(("SET", "k", True))
    # A stream of distinct keys never grows the memo past its bound; long ones stay out.
    for i in range(3 * _resp.MEMO_SIZE):
        key = f"crm:prefs:client-{i}"
        assert pack(("GET", key)) == b"".join(conn.pack_command("GET", key))
        assert len(_resp._PACKED) <= _resp.MEMO_SIZE
    long_key = "k" * (_resp.MEMO_MAX_BYTES + 1)
    assert pack(("GET", long_key)) == b"".join(conn.pack_command("GET", long_key))
    assert long_key not in _resp._PACKED
