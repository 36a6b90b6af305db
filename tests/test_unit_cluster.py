"""Redis Cluster arithmetic without a server: key slots (against redis-py's own CRC16),
the ``CLUSTER SLOTS`` reply checks, and ``redis+cluster://`` URLs."""

from __future__ import annotations

import random
import string

import pytest
from redis.crc import key_slot

from crmcache import ConfigurationError
from crmcache._cluster import (
    SLOTS,
    BadSlotMapError,
    group_by_slot,
    parse_cluster_slots,
    slot_of,
)
from crmcache._config import cluster_target, mask_url, resolve_settings


def test_slot_of_matches_redis_py_for_random_and_tagged_keys() -> None:
    rng = random.Random(7)
    keys = ["crm:prefs:client-1", "{}", "{}x", "a{b}c", "a{}b{c}", "{{a}}", "x{y", "é{ü}"]
    keys += ["".join(rng.choices(string.printable, k=rng.randint(0, 30))) for _ in range(2000)]
    for key in keys:
        assert slot_of(key) == key_slot(key.encode()), key
    # The well-known fixed points of the cluster spec.
    assert slot_of("123456789") == 12739
    assert slot_of("{user1000}.following") == slot_of("{user1000}.followers")


def test_group_by_slot_keeps_positions_in_order() -> None:
    keys = ["{a}1", "{b}1", "{a}2", "{b}2", "{c}"]
    groups = group_by_slot(keys)
    assert list(groups.values()) == [[0, 2], [1, 3], [4]]


def _reply(*ranges: tuple[int, int, bytes, int]) -> list[object]:
    return [[start, end, [host, port, b"id"]] for start, end, host, port in ranges]


def test_parse_cluster_slots_maps_every_slot() -> None:
    found = parse_cluster_slots(
        _reply((0, 5460, b"10.0.0.1", 7000), (5461, 10922, b"", 7001), (10923, 16383, b"h", 7002)),
        "seed",
    )
    assert found.primaries == ("10.0.0.1:7000", "seed:7001", "h:7002")
    assert found.covered == SLOTS
    assert found.owner(0) == "10.0.0.1:7000"
    assert found.owner(5461) == "seed:7001"  # an empty host is the node that was asked
    assert found.owner(16383) == "h:7002"


def test_parse_cluster_slots_reports_uncovered_slots_and_moves() -> None:
    before = parse_cluster_slots(_reply((0, 16383, b"a", 1)), "s")
    after = parse_cluster_slots(_reply((0, 99, b"b", 2), (100, 16000, b"a", 1)), "s")
    assert after.covered == 16001
    assert after.owner(16001) is None
    assert after.moved_slots(before) == 100 + (SLOTS - 16001)


@pytest.mark.parametrize(
    "reply",
    [
        None,
        b"OK",
        [[0]],
        [[0, 20000, [b"h", 1]]],
        [[5, 4, [b"h", 1]]],
        [[0, 10, [b"h", 0]]],
        [[0, 10, [b"h", "1"]]],
        [[0, 10, [b"\xff", 1]]],
        [[0, 10, [b"bad host", 1]]],
        [[0, 10, [b"h", 1]], [10, 20, [b"g", 2]]],  # slot 10 twice
        [[0, 10, b"h"]],
    ],
)
def test_parse_cluster_slots_refuses_a_malformed_reply_whole(reply: object) -> None:
    with pytest.raises(BadSlotMapError):
        parse_cluster_slots(reply, "seed")


def test_cluster_url_seeds_and_node_settings() -> None:
    target = cluster_target("redis+cluster://u:pw@h1:7000,h2,[::1]:7002?socket_timeout=2")
    assert target.seeds == (("h1", 7000), ("h2", 6379), ("::1", 7002))
    assert target.node_url == "redis://u:pw@h1:7000?socket_timeout=2"
    tls = cluster_target("rediss+cluster://h:5/0?ssl_cert_reqs=none")
    assert tls.node_url == "rediss://h:5?ssl_cert_reqs=none"
    settings = resolve_settings(redis_url="redis+cluster://:pw@h:5?socket_timeout=2")
    assert settings.socket_timeout == 2.0
    assert "pw" not in repr(settings)
    assert mask_url("redis+cluster://u:hunter2@h1:1,h2:2") == "redis+cluster://u:***@h1:1,h2:2"


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("redis+cluster://h:1/2", "only db 0"),
        ("redis+cluster:///", "no cluster node"),
        ("redis+cluster://:hunter2-secret@h:x", "not host:port"),
        ("redis+cluster://h:1,,h:2", "not host:port"),
        ("redis+cluster://h:1?bogus=1", "bogus"),
        ("rediss+cluster://h:1?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
    ],
)
def test_bad_cluster_urls_are_refused_naming_the_problem(url: str, fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment) as caught:
        resolve_settings(redis_url=url)
    assert "hunter2-secret" not in str(caught.value)
