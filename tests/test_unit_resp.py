"""The data paths pack commands themselves: byte for byte what redis-py sends."""

from __future__ import annotations

import random
from enum import IntEnum

import pytest
from redis.asyncio.connection import Connection

from crmcache import _replies, _resp
from crmcache._replies import _HUGE_AFTER_CRLF, _HUGE_AT_START, huge_array_header
from crmcache._resp import pack, pack_all


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


def test_whole_script_calls_are_memoized_within_a_bound_and_only_for_plain_types() -> None:
    conn = Connection()
    check = ("EVALSHA", "a" * 40, 1, "crm:ratelimit:api:60", 1, 60_000, 1)
    first = pack(check)
    assert first == b"".join(conn.pack_command(*check))
    assert _resp._COMMANDS[check] == first
    again = tuple(str(arg) if type(arg) is str else arg for arg in check)
    assert again == check
    assert again is not check
    assert pack(again) is first  # an equal call: its bytes, not packed again

    class One(IntEnum):
        ONE = 1

    # Equal to a memoized tuple, but of other types that pack otherwise: never its bytes.
    as_float = (*check[:4], 1.0, 60_000, 1)
    assert as_float == check
    assert pack(as_float) == b"".join(conn.pack_command(*as_float)) != first
    for odd in (True, One.ONE):
        with pytest.raises(TypeError):  # redis-py's to pack (it refuses bool)
            pack((*check[:4], odd, 60_000, 1))
    # Only plain script calls are kept: values, lists and other commands are not.
    pack(("EVALSHA", "a" * 40, 1, "crm:prefs:c1", b"{}", 1, 60_000))
    pack(["EVALSHA", "a" * 40, 1, "crm:prefs:c1", 1])
    pack(("SET", "crm:prefs:c1", "x", "PX", 60_000))
    assert all(key[0] == "EVALSHA" and type(key) is tuple for key in _resp._COMMANDS)
    assert not any(bytes in map(type, key) for key in _resp._COMMANDS)
    # A stream of distinct calls never grows it past its bound; long ones stay out.
    for i in range(3 * _resp.COMMAND_MEMO_SIZE):
        args = ("EVALSHA", "a" * 40, 1, f"crm:ratelimit:api-{i}:60", 1, 60_000, 1)
        assert pack(args) == b"".join(conn.pack_command(*args))
        assert len(_resp._COMMANDS) <= _resp.COMMAND_MEMO_SIZE
    long_call = ("EVALSHA", "a" * 40, 1, "k" * _resp.COMMAND_MEMO_MAX_BYTES, 1)
    assert pack(long_call) == b"".join(conn.pack_command(*long_call))
    assert long_call not in _resp._COMMANDS


def test_a_batch_is_packed_as_redis_py_packs_it_in_one_chunk_while_small() -> None:
    """pack_all (batches: a cluster node's commands, a handshake) writes what redis-py's
    pack_commands writes; a command redis-py must pack (a bytearray value) is packed by
    it; a small batch is one chunk (the sync side writes each with a system call of its
    own), a large one keeps its pieces."""
    conn = Connection()
    small = [("MGET", "k1"), ("SET", "k2", bytearray(b"v")), ("EVALSHA", "a" * 40, 1, "k", 7)]
    chunks = pack_all(conn, small)  # type: ignore[arg-type]
    assert len(chunks) == 1
    assert chunks[0] == b"".join(conn.pack_commands(small))
    large = [("SET", f"k{i}", b"x" * 40_000) for i in range(3)]
    chunks = pack_all(conn, large)  # type: ignore[arg-type]
    assert len(chunks) == 3
    assert b"".join(chunks) == b"".join(conn.pack_commands(large))


def test_the_screen_takes_the_regex_only_where_crs_come_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Large values (a template batch: headers, then kilobytes without a CR) are looked
    at CR by CR; many small replies (rate-limit checks) go to the regex at once. A batch
    of large values handed to the regex cost 5x (31.7 against 5.4 µs for 64 KiB)."""
    searched: list[int] = []
    real = _HUGE_AFTER_CRLF

    class Spy:
        def search(self, chunk: bytes, pos: int = 0) -> object:
            searched.append(len(chunk) - pos)
            return real.search(chunk, pos)

    monkeypatch.setattr(_replies, "_HUGE_AFTER_CRLF", Spy())
    value = b"Hello {{first_name}}, your order has shipped. " * 110
    batch = (b"*50\r\n" + (b"$%d\r\n%b\r\n" % (len(value), value)) * 50)[: 64 * 1024]
    assert not huge_array_header(batch)
    assert searched == []
    checks = b"*3\r\n:1\r\n:5\r\n:59000\r\n" * 100
    assert not huge_array_header(checks)
    assert len(searched) == 1
    assert searched[0] > len(checks) - 64  # nearly all of it, after a few CRs


def test_the_huge_header_screen_agrees_with_the_regex_everywhere() -> None:
    """The screen finds CRs with memchr and looks behind each (then, where they come
    close together or past a few dozen, hands the rest to the regex): on random chunks
    of framing, values, CRLF-rich text and headers of every size it answers exactly what
    the plain regex scan answers."""
    rng = random.Random(11)
    pieces = [
        b"$5\r\nhello\r\n",
        b"*2\r\n",
        b"*1234567\r\n",
        b"%9999999\r\n",
        b"~-5\r\n",
        b"*-1\r\n",
        b"line\r\n" * 20,  # a template with CRLF line ends: many CRs
        b"\r",
        b"\r\n",
        b"x" * 300,
        b"y" * 3000,  # CRs far apart: looked at one by one
        b"\r\n>1000000",
        b"|12",
    ]
    for _ in range(5000):
        chunk = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 60)))
        at_start = rng.random() < 0.5
        expected = bool(
            at_start and chunk and chunk[0] in b"*%~>|" and _HUGE_AT_START.match(chunk)
        ) or (_HUGE_AFTER_CRLF.search(chunk) is not None)
        assert huge_array_header(chunk, at_start=at_start) is expected, chunk
        assert huge_array_header(memoryview(chunk), at_start=at_start) is expected, chunk
