"""The data paths pack commands themselves: byte for byte what redis-py sends."""

from __future__ import annotations

import random

import pytest
from redis.asyncio.connection import Connection

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
