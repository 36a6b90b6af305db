"""Argument validation of every call, what ids are allowed, and corrupt cached values."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from enum import Enum, StrEnum

import pytest
import redis

from crmcache import ClientPreferences, CRMCacheManager, MessageChannel
from crmcache._codec import encode_preferences
from crmcache._ratelimit import MAX_WINDOW

Call = Callable[[CRMCacheManager, object], object]

# -- bad ids ---------------------------------------------------------------------------

BAD_IDS: list[tuple[object, type[Exception]]] = [
    (None, TypeError),
    (1, TypeError),
    (b"x", TypeError),
    (1.5, TypeError),
    (True, TypeError),
    ("", ValueError),
    ("   ", ValueError),
    ("\t", ValueError),
    ("a\nb", ValueError),
    ("a\x00b", ValueError),
    ("\x1b[31m", ValueError),
    ("a\u2028b", ValueError),
    ("x" * 257, ValueError),
]
BAD_ID_IDS = [
    "None",
    "int",
    "bytes",
    "float",
    "bool",
    "empty",
    "spaces",
    "tab",
    "newline",
    "nul",
    "ansi-escape",
    "line-separator",
    "257-chars",
]

ID_CALLS: list[tuple[str, str, Call]] = [
    ("get_client_preferences", "client_id", lambda c, v: c.get_client_preferences(v)),
    (
        "invalidate_client_preferences",
        "client_id",
        lambda c, v: c.invalidate_client_preferences(v),
    ),
    (
        "set_client_preferences",
        "client_id",
        # model_construct skips pydantic, so the manager's own check is what is tested.
        lambda c, v: c.set_client_preferences(ClientPreferences.model_construct(client_id=v)),
    ),
    ("get_template", "name", lambda c, v: c.get_template(v, "email")),
    ("set_template", "name", lambda c, v: c.set_template(v, "email", "body")),
    ("invalidate_template", "name", lambda c, v: c.invalidate_template(v, "email")),
    ("get_templates", "name", lambda c, v: c.get_templates([("ok", "sms"), (v, "email")])),
    (
        "set_templates",
        "name",
        lambda c, v: c.set_templates({("ok", "sms"): "b", (v, "email"): "b"}),
    ),
    ("check_rate_limit", "api", lambda c, v: c.check_rate_limit(v, 10)),
]


@pytest.mark.parametrize(("value", "error"), BAD_IDS, ids=BAD_ID_IDS)
@pytest.mark.parametrize(("op", "argument", "call"), ID_CALLS, ids=[c[0] for c in ID_CALLS])
def test_bad_id_is_rejected(
    *,
    cache: CRMCacheManager,
    raw: redis.Redis,
    op: str,
    argument: str,
    call: Call,
    value: object,
    error: type[Exception],
) -> None:
    """A bad client id / template name / api raises the right error naming the argument."""
    with pytest.raises(error) as info:
        call(cache, value)
    assert type(info.value) is error, op
    assert argument in str(info.value)
    assert raw.dbsize() == 0  # nothing was written on the way to the error


def test_max_id_length_is_configurable(redis_url: str, raw: redis.Redis) -> None:
    """max_id_length=10 accepts 10 characters and rejects 11, naming the argument."""
    with CRMCacheManager(redis_url=redis_url, max_id_length=10) as manager:
        assert manager.set_template("x" * 10, "email", "ok") is True
        with pytest.raises(ValueError, match="name"):
            manager.set_template("x" * 11, "email", "ok")
        with pytest.raises(ValueError, match="client_id"):
            manager.get_client_preferences("c" * 11)
        with pytest.raises(ValueError, match="api"):
            manager.check_rate_limit("a" * 11, 1)
    assert raw.dbsize() == 1


def test_validation_does_not_need_redis(redis_url: str) -> None:
    """Bad arguments raise the same way on a disabled manager (no Redis involved)."""
    with CRMCacheManager(redis_url=redis_url, enabled=False) as manager:
        with pytest.raises(ValueError, match="client_id"):
            manager.get_client_preferences("")
        with pytest.raises(TypeError, match="name"):
            manager.set_template(None, "email", "x")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="channel"):
            manager.get_template("welcome", "fax")
        with pytest.raises(ValueError, match="limit"):
            manager.check_rate_limit("api", 0)


# -- bad channels ----------------------------------------------------------------------

BAD_CHANNELS: list[tuple[object, type[Exception]]] = [
    ("fax", ValueError),
    ("", ValueError),
    ("EMAIL", ValueError),
    (" email", ValueError),
    (None, TypeError),
    (1, TypeError),
    (b"email", TypeError),
]

CHANNEL_CALLS: list[tuple[str, Call]] = [
    ("get_template", lambda c, v: c.get_template("welcome", v)),
    ("set_template", lambda c, v: c.set_template("welcome", v, "body")),
    ("invalidate_template", lambda c, v: c.invalidate_template("welcome", v)),
    ("get_templates", lambda c, v: c.get_templates([("welcome", v)])),
    ("set_templates", lambda c, v: c.set_templates({("a", "sms"): "b", ("welcome", v): "b"})),
]


@pytest.mark.parametrize(("value", "error"), BAD_CHANNELS, ids=repr)
@pytest.mark.parametrize(("op", "call"), CHANNEL_CALLS, ids=[c[0] for c in CHANNEL_CALLS])
def test_bad_channel_is_rejected(
    *,
    cache: CRMCacheManager,
    raw: redis.Redis,
    op: str,
    call: Call,
    value: object,
    error: type[Exception],
) -> None:
    """An unknown or mistyped channel raises the right error naming `channel`."""
    with pytest.raises(error) as info:
        call(cache, value)
    assert type(info.value) is error, op
    assert "channel" in str(info.value)
    assert raw.dbsize() == 0


def test_channel_enum_and_string_are_the_same_key(
    cache: CRMCacheManager, raw: redis.Redis
) -> None:
    """MessageChannel.SMS and "sms" address one key, crm:template:sms:<name>."""
    assert cache.set_template("welcome", MessageChannel.SMS, "hi") is True
    assert cache.get_template("welcome", "sms") == "hi"
    assert [k.decode() for k in raw.scan_iter("*")] == ["crm:template:sms:welcome"]


# -- template content ------------------------------------------------------------------


@pytest.fixture
def small(redis_url: str, raw: redis.Redis) -> Iterator[CRMCacheManager]:
    """A manager that accepts templates of at most 1024 UTF-8 bytes."""
    with CRMCacheManager(redis_url=redis_url, max_template_bytes=1024) as manager:
        yield manager


BAD_CONTENT: list[tuple[object, type[Exception]]] = [
    (b"bytes", TypeError),
    (None, TypeError),
    (5, TypeError),
    (["x"], TypeError),
    ("x" * 2000, ValueError),
    ("é" * 600, ValueError),  # 600 characters but 1200 bytes: the limit is in bytes
    ("\ud800", ValueError),
    ("ok\udfffok", ValueError),
]

CONTENT_CALLS: list[tuple[str, Call]] = [
    ("set_template", lambda c, v: c.set_template("welcome", "email", v)),
    ("set_templates", lambda c, v: c.set_templates({("a", "sms"): "b", ("welcome", "email"): v})),
]


@pytest.mark.parametrize(
    ("value", "error"),
    BAD_CONTENT,
    ids=["bytes", "None", "int", "list", "2000-chars", "1200-bytes", "surrogate", "surrogate2"],
)
@pytest.mark.parametrize(("op", "call"), CONTENT_CALLS, ids=[c[0] for c in CONTENT_CALLS])
def test_bad_content_is_rejected(
    *,
    small: CRMCacheManager,
    raw: redis.Redis,
    op: str,
    call: Call,
    value: object,
    error: type[Exception],
) -> None:
    """Non-str, oversized or unencodable template content raises, naming `content`."""
    with pytest.raises(error) as info:
        call(small, value)
    assert type(info.value) is error, op
    assert "content" in str(info.value)
    assert raw.dbsize() == 0


def test_content_limit_is_inclusive(small: CRMCacheManager, raw: redis.Redis) -> None:
    """Exactly max_template_bytes is accepted; an empty template round-trips as ''."""
    assert small.set_template("full", "email", "x" * 1024) is True
    assert small.get_template("full", "email") == "x" * 1024
    assert small.set_template("empty", "email", "") is True
    assert small.get_template("empty", "email") == ""
    assert small.get_templates([("empty", "email")]) == {("empty", "email"): ""}
    assert raw.strlen("crm:template:email:full") == 1024


# -- batches ---------------------------------------------------------------------------

BAD_TEMPLATE_ITERABLES: list[tuple[object, type[Exception]]] = [
    (None, TypeError),
    (5, TypeError),
    ("ab", TypeError),
    (b"ab", TypeError),
    ([("welcome",)], TypeError),
    ([("welcome", "email", "x")], TypeError),
    ([["welcome", "email"]], TypeError),
    (["ab"], TypeError),
    ([None], TypeError),
    ([(str(i), "email") for i in range(10_001)], ValueError),
]


@pytest.mark.parametrize(
    ("value", "error"),
    BAD_TEMPLATE_ITERABLES,
    ids=[
        "None",
        "int",
        "str",
        "bytes",
        "1-tuple",
        "3-tuple",
        "list-pair",
        "str-item",
        "None-item",
        "10001-items",
    ],
)
def test_get_templates_rejects_bad_batches(
    cache: CRMCacheManager, value: object, error: type[Exception]
) -> None:
    """get_templates refuses non-iterables, non-pairs and more than 10,000 pairs."""
    with pytest.raises(error) as info:
        cache.get_templates(value)  # type: ignore[arg-type]
    assert type(info.value) is error
    assert "templates" in str(info.value)


def test_get_templates_unhashable_name_names_the_argument(cache: CRMCacheManager) -> None:
    """A pair whose name is a list raises a TypeError that names the argument."""
    with pytest.raises(TypeError, match=r"name|templates"):
        cache.get_templates([(["welcome"], "email")])  # type: ignore[list-item]


def test_get_templates_stops_reading_an_endless_iterable(cache: CRMCacheManager) -> None:
    """An infinite generator is refused after 10,000 items instead of hanging."""
    endless = ((str(i), "email") for i in itertools.count())
    with pytest.raises(ValueError, match="templates"):
        cache.get_templates(endless)


def test_get_templates_accepts_exactly_the_maximum(cache: CRMCacheManager) -> None:
    """10,000 distinct pairs are accepted (all misses on an empty cache)."""
    refs = [(str(i), "email") for i in range(10_000)]
    result = cache.get_templates(refs)
    assert len(result) == 10_000
    assert set(result.values()) == {None}


BAD_TEMPLATE_MAPPINGS: list[tuple[object, type[Exception], str]] = [
    (None, TypeError, "templates"),
    ([(("welcome", "email"), "x")], TypeError, "templates"),
    ("ab", TypeError, "templates"),
    ({"ab": "x"}, TypeError, "templates"),
    ({("welcome",): "x"}, TypeError, "templates"),
    ({("welcome", "fax"): "x"}, ValueError, "channel"),
    ({("", "email"): "x"}, ValueError, "name"),
    ({("welcome", "email"): b"x"}, TypeError, "content"),
    ({(str(i), "email"): "x" for i in range(10_001)}, ValueError, "templates"),
]


@pytest.mark.parametrize(
    ("value", "error", "argument"),
    BAD_TEMPLATE_MAPPINGS,
    ids=[
        "None",
        "list-of-items",
        "str",
        "str-key",
        "1-tuple-key",
        "bad-channel",
        "empty-name",
        "bytes-content",
        "10001-items",
    ],
)
def test_set_templates_rejects_bad_mappings(
    cache: CRMCacheManager,
    raw: redis.Redis,
    value: object,
    error: type[Exception],
    argument: str,
) -> None:
    """set_templates refuses non-mappings and bad entries, and then writes nothing."""
    with pytest.raises(error) as info:
        cache.set_templates(value)  # type: ignore[arg-type]
    assert type(info.value) is error
    assert argument in str(info.value)
    assert raw.dbsize() == 0


def test_set_templates_validates_everything_before_writing(
    cache: CRMCacheManager, raw: redis.Redis
) -> None:
    """One bad entry after good ones aborts the whole batch: no partial write."""
    batch = {(f"t{i}", "email"): f"body {i}" for i in range(50)}
    batch["last", "sms"] = "\ud800"
    with pytest.raises(ValueError, match="content"):
        cache.set_templates(batch)
    assert raw.dbsize() == 0


# -- rate limit arguments --------------------------------------------------------------

BAD_NUMBERS: list[tuple[object, type[Exception]]] = [
    (None, TypeError),
    ("10", TypeError),
    (1.5, TypeError),
    (True, TypeError),
    ([60], TypeError),
    ({}, TypeError),
    (0, ValueError),
    (-1, ValueError),
]


@pytest.mark.parametrize(("value", "error"), BAD_NUMBERS, ids=repr)
@pytest.mark.parametrize("argument", ["limit", "window", "cost"])
def test_check_rate_limit_rejects_bad_numbers(
    cache: CRMCacheManager, raw: redis.Redis, argument: str, value: object, error: type[Exception]
) -> None:
    """limit, window and cost must be positive ints (bools refused), named in the error."""
    kwargs: dict[str, object] = {"limit": 10, "window": 60, "cost": 1, argument: value}
    with pytest.raises(error) as info:
        cache.check_rate_limit("api", **kwargs)  # type: ignore[arg-type]
    assert type(info.value) is error
    assert argument in str(info.value)
    assert raw.dbsize() == 0


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"limit": 2**53}, "limit"),
        ({"limit": 10**18, "cost": 10**17}, "limit"),
        ({"limit": 5, "cost": 6}, "cost"),
        ({"limit": 1, "cost": 2**53 - 1}, "cost"),
    ],
    ids=repr,
)
def test_check_rate_limit_rejects_numbers_lua_cannot_count(
    cache: CRMCacheManager, raw: redis.Redis, kwargs: dict[str, int], argument: str
) -> None:
    """A limit above 2**53 - 1 (inexact in Lua), or a cost above the limit (a call that
    can never be allowed), raises ValueError naming the argument and touches nothing."""
    with pytest.raises(ValueError, match=argument):
        cache.check_rate_limit("api", window=60, **kwargs)
    assert raw.dbsize() == 0


def test_check_rate_limit_accepts_the_largest_numbers(
    cache: CRMCacheManager, raw: redis.Redis
) -> None:
    """limit = cost = 2**53 - 1 is one exact call."""
    result = cache.check_rate_limit("api", 2**53 - 1, 60, cost=2**53 - 1)
    assert (result.allowed, result.current_count, result.degraded) == (True, 2**53 - 1, False)
    assert raw.get("crm:ratelimit:api:60") == b"%d" % (2**53 - 1)


@pytest.mark.parametrize("window", [MAX_WINDOW + 1, 10**30])
def test_check_rate_limit_rejects_huge_windows(
    cache: CRMCacheManager, raw: redis.Redis, window: int
) -> None:
    """A window longer than ten years raises ValueError naming `window`."""
    with pytest.raises(ValueError, match="window"):
        cache.check_rate_limit("api", 10, window)
    assert raw.dbsize() == 0


def test_check_rate_limit_accepts_the_longest_window(
    cache: CRMCacheManager, raw: redis.Redis
) -> None:
    """A ten-year window is accepted and its counter gets that expiry."""
    result = cache.check_rate_limit("api", 10, MAX_WINDOW)
    assert result.allowed is True
    assert result.degraded is False
    ttl = raw.ttl(f"crm:ratelimit:api:{MAX_WINDOW}")
    assert MAX_WINDOW - 60 <= ttl <= MAX_WINDOW


@pytest.mark.parametrize(
    ("policy", "error"),
    [("maybe", ValueError), ("", ValueError), ("OPEN", ValueError), (1, TypeError)],
    ids=repr,
)
def test_check_rate_limit_rejects_bad_policy(
    cache: CRMCacheManager, policy: object, error: type[Exception]
) -> None:
    """An unknown policy raises, naming `policy`."""
    with pytest.raises(error) as info:
        cache.check_rate_limit("api", 10, policy=policy)  # type: ignore[arg-type]
    assert type(info.value) is error
    assert "policy" in str(info.value)


# -- preference call arguments ---------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "error"),
    [(True, TypeError), ("1", TypeError), (1.0, TypeError), (-1, ValueError), (2**53, ValueError)],
    ids=repr,
)
def test_invalidate_rejects_bad_version(
    cache: CRMCacheManager, raw: redis.Redis, version: object, error: type[Exception]
) -> None:
    """invalidate_client_preferences(version=...) must be an int in 0..2**53-1."""
    with pytest.raises(error) as info:
        cache.invalidate_client_preferences("c1", version=version)  # type: ignore[arg-type]
    assert type(info.value) is error
    assert "version" in str(info.value)
    assert raw.dbsize() == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "argument"),
    [
        ({"preferences": None}, TypeError, "preferences"),
        ({"preferences": {"client_id": "c1"}}, TypeError, "preferences"),
        ({"ttl": 0}, ValueError, "ttl"),
        ({"ttl": -1}, ValueError, "ttl"),
        ({"ttl": "60"}, TypeError, "ttl"),
        ({"ttl": 1.5}, TypeError, "ttl"),
        ({"ttl": True}, TypeError, "ttl"),
        # Built without validation: the scripts must never see such a version.
        (
            {"preferences": ClientPreferences.model_construct(client_id="c1", version=None)},
            TypeError,
            "preferences.version",
        ),
        (
            {"preferences": ClientPreferences.model_construct(client_id="c1", version=2**63)},
            ValueError,
            "preferences.version",
        ),
    ],
    ids=repr,
)
def test_set_client_preferences_rejects_bad_arguments(
    cache: CRMCacheManager,
    raw: redis.Redis,
    kwargs: dict[str, object],
    error: type[Exception],
    argument: str,
) -> None:
    """set_client_preferences checks its preferences and ttl arguments."""
    arguments: dict[str, object] = {"preferences": ClientPreferences(client_id="c1"), **kwargs}
    with pytest.raises(error) as info:
        cache.set_client_preferences(**arguments)  # type: ignore[arg-type]
    assert type(info.value) is error
    assert argument in str(info.value)
    assert raw.dbsize() == 0


def test_set_client_preferences_rejects_absurd_ttl(cache: CRMCacheManager) -> None:
    """A TTL Redis cannot store is a caller error (ValueError naming ttl), not an outage."""
    with pytest.raises(ValueError, match="ttl"):
        cache.set_client_preferences(ClientPreferences(client_id="c1"), ttl=10**15)


# -- what IS allowed -------------------------------------------------------------------

ALLOWED_IDS = [
    "{tag}",
    "a{b}c",
    "*",
    "a*b?c[d]",
    "[abc]",
    "?",
    "клиент-1",
    "客户🙂",
    "a:b:c",
    "crm:prefs:other",
    " padded ",
    "x" * 256,
]


@pytest.mark.parametrize("value", ALLOWED_IDS, ids=lambda v: v if len(v) < 20 else "256-chars")
def test_allowed_ids_round_trip_and_touch_only_their_key(
    cache: CRMCacheManager, raw: redis.Redis, value: str
) -> None:
    """Braces, glob characters, unicode and colons are valid ids that map to one exact key."""
    # Decoys that a glob or hash-tag interpretation of ``value`` would hit.
    assert cache.set_client_preferences(ClientPreferences(client_id="decoy")) is True
    assert cache.set_template("decoy", "sms", "decoy body") is True
    decoys = {"crm:prefs:decoy", "crm:template:sms:decoy"}

    prefs = ClientPreferences(client_id=value, language="ru", version=3)
    assert cache.set_client_preferences(prefs) is True
    assert cache.get_client_preferences(value) == prefs
    assert cache.set_template(value, "sms", f"body of {value}") is True
    assert cache.get_template(value, "sms") == f"body of {value}"
    assert cache.get_templates([(value, "sms"), ("decoy", "sms")]) == {
        (value, "sms"): f"body of {value}",
        ("decoy", "sms"): "decoy body",
    }
    result = cache.check_rate_limit(value, 5, 60)
    assert (result.allowed, result.current_count, result.degraded) == (True, 1, False)

    expected = decoys | {
        f"crm:prefs:{value}",
        f"crm:template:sms:{value}",
        f"crm:ratelimit:{value}:60",
    }
    assert {k.decode("utf-8") for k in raw.scan_iter("*")} == expected

    # Invalidations remove (or tombstone) exactly their own key.
    assert cache.invalidate_template(value, "sms") is True
    assert cache.invalidate_client_preferences(value) is True
    assert cache.get_client_preferences(value) is None
    assert cache.get_client_preferences("decoy") == ClientPreferences(client_id="decoy")
    assert cache.get_template("decoy", "sms") == "decoy body"
    assert {k.decode("utf-8") for k in raw.scan_iter("*")} == expected - {
        f"crm:template:sms:{value}"
    }
    assert raw.get(f"crm:prefs:{value}".encode()).startswith(b"T")


class _StrEnumApi(StrEnum):
    WHATSAPP = "whatsapp"


class _MixinApi(str, Enum):  # noqa: UP042 - the mixin is the point
    WHATSAPP = "whatsapp"


def test_str_enum_member_is_keyed_by_its_value(cache: CRMCacheManager, raw: redis.Redis) -> None:
    """A StrEnum member works as an id and is keyed by its value."""
    assert cache.check_rate_limit(_StrEnumApi.WHATSAPP, 5).current_count == 1
    assert cache.check_rate_limit("whatsapp", 5).current_count == 2
    assert [k.decode() for k in raw.scan_iter("*")] == ["crm:ratelimit:whatsapp:60"]


def test_str_mixin_enum_member_is_keyed_by_its_value(
    cache: CRMCacheManager, raw: redis.Redis
) -> None:
    """A (str, Enum) member is keyed by its string value, like the plain string."""
    assert cache.check_rate_limit(_MixinApi.WHATSAPP, 5).current_count == 1
    assert [k.decode() for k in raw.scan_iter("*")] == ["crm:ratelimit:whatsapp:60"]


# -- corrupt values --------------------------------------------------------------------


def _corrupt_warnings(caplog: pytest.LogCaptureFixture, key: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING
        and key in r.getMessage()
        and "undecodable" in r.getMessage()
    ]


def _corrupt_count(cache: CRMCacheManager) -> int:
    return int(cache.get_cache_stats()["counters"]["corrupt_values"])


PREFS_V8 = encode_preferences(ClientPreferences(client_id="c1", version=8))
GARBAGE_PREFS = [
    b"not-json",
    b"5:{bad",
    b"7:" + PREFS_V8.partition(b":")[2],  # valid JSON of version 8 behind a "7:" prefix
    b"abc:{}",
    b"1:[]",
    b'1:{"client_id": "c1", "timezone": "Not/AZone", "version": 1}',
    b"\xff\xfe",
    b"",
    # Issue 11: a valid value of another client, served to c1 before.
    encode_preferences(ClientPreferences(client_id="someone-else", version=8)),
    # A version prefix no ClientPreferences can have (the 5000 digits raised ValueError).
    b"9007199254740992:" + PREFS_V8.partition(b":")[2],
    b"9" * 5000 + b":" + PREFS_V8.partition(b":")[2],
    # Tombstones neither script recognises as one (read as a plain miss, kept before).
    b"T-9223372036854775808",
    b"T9223372036854775808",
    b"T5x",
]


@pytest.mark.parametrize("garbage", GARBAGE_PREFS)
def test_corrupt_preferences_are_evicted(
    cache: CRMCacheManager,
    raw: redis.Redis,
    crm_logs: pytest.LogCaptureFixture,
    garbage: bytes,
) -> None:
    """Undecodable preferences read as a miss, are deleted, counted and logged at WARNING."""
    raw.set("crm:prefs:c1", garbage)
    assert cache.get_client_preferences("c1") is None
    assert raw.exists("crm:prefs:c1") == 0
    assert _corrupt_count(cache) == 1
    assert len(_corrupt_warnings(crm_logs, "crm:prefs:c1")) == 1
    # The cache heals: the next fill is stored and read back.
    prefs = ClientPreferences(client_id="c1", version=9)
    assert cache.set_client_preferences(prefs) is True
    assert cache.get_client_preferences("c1") == prefs
    assert _corrupt_count(cache) == 1


@pytest.mark.parametrize("writer", ["hash", "list"])
def test_wrong_type_preferences_are_evicted(
    cache: CRMCacheManager,
    raw: redis.Redis,
    crm_logs: pytest.LogCaptureFixture,
    writer: str,
) -> None:
    """A non-string at crm:prefs:<id> (WRONGTYPE) reads as a miss and is deleted."""
    if writer == "hash":
        raw.hset("crm:prefs:c2", "field", "value")
    else:
        raw.rpush("crm:prefs:c2", "item")
    assert cache.get_client_preferences("c2") is None
    assert raw.exists("crm:prefs:c2") == 0
    assert _corrupt_count(cache) == 1
    assert len(_corrupt_warnings(crm_logs, "crm:prefs:c2")) == 1
    assert cache.get_cache_stats()["counters"]["redis_errors"] == 0


def test_write_over_wrong_type_preferences_replaces_it(
    cache: CRMCacheManager, raw: redis.Redis
) -> None:
    """set_client_preferences over a hash at the key stores a proper value."""
    raw.hset("crm:prefs:c2", "field", "value")
    prefs = ClientPreferences(client_id="c2", version=1)
    assert cache.set_client_preferences(prefs) is True
    assert raw.type("crm:prefs:c2") == b"string"
    assert cache.get_client_preferences("c2") == prefs


def test_tombstone_is_not_treated_as_corrupt(cache: CRMCacheManager, raw: redis.Redis) -> None:
    """An invalidation tombstone reads as a plain miss: kept, not counted as corrupt."""
    assert cache.invalidate_client_preferences("c1", version=4) is True
    assert cache.get_client_preferences("c1") is None
    assert raw.get("crm:prefs:c1") == b"T4"
    assert _corrupt_count(cache) == 0


def test_invalid_utf8_template_is_evicted(
    cache: CRMCacheManager, raw: redis.Redis, crm_logs: pytest.LogCaptureFixture
) -> None:
    """A template that is not UTF-8 reads as a miss, is deleted, counted and logged."""
    key = "crm:template:email:welcome"
    raw.set(key, b"\xff\xfe")
    assert cache.get_template("welcome", "email") is None
    assert raw.exists(key) == 0
    assert _corrupt_count(cache) == 1
    assert len(_corrupt_warnings(crm_logs, key)) == 1


def test_invalid_utf8_template_is_evicted_by_batch_read(
    cache: CRMCacheManager, raw: redis.Redis, crm_logs: pytest.LogCaptureFixture
) -> None:
    """get_templates evicts an undecodable template and still returns the good ones."""
    raw.set("crm:template:email:bad", b"\xc3(")
    raw.set("crm:template:email:good", "fine")
    result = cache.get_templates([("bad", "email"), ("good", "email")])
    assert result == {("bad", "email"): None, ("good", "email"): "fine"}
    assert raw.exists("crm:template:email:bad") == 0
    assert raw.get("crm:template:email:good") == b"fine"
    assert _corrupt_count(cache) == 1
    assert len(_corrupt_warnings(crm_logs, "crm:template:email:bad")) == 1


def test_wrong_type_template_is_evicted(
    cache: CRMCacheManager, raw: redis.Redis, crm_logs: pytest.LogCaptureFixture
) -> None:
    """A hash at a template key reads as a miss and is deleted, counted and logged."""
    key = "crm:template:sms:welcome"
    raw.hset(key, "field", "value")
    assert cache.get_template("welcome", "sms") is None
    assert raw.exists(key) == 0
    assert _corrupt_count(cache) == 1
    assert len(_corrupt_warnings(crm_logs, key)) == 1


def test_wrong_type_template_in_batch_read_is_a_miss(
    cache: CRMCacheManager, raw: redis.Redis
) -> None:
    """get_templates answers None for a hash at a template key and does not raise."""
    raw.hset("crm:template:sms:welcome", "field", "value")
    raw.set("crm:template:sms:other", "ok")
    result = cache.get_templates([("welcome", "sms"), ("other", "sms")])
    assert result == {("welcome", "sms"): None, ("other", "sms"): "ok"}
    assert cache.get_cache_stats()["counters"]["redis_errors"] == 0


# -- the eviction script ---------------------------------------------------------------


def _delete_if_equals(cache: CRMCacheManager, key: str, mode: str, expected: bytes) -> int:
    """Run the eviction script the manager uses, by its SHA, through the manager's pool."""
    assert cache._transport.scripts is not None
    lean = cache._transport
    assert lean is not None
    return int(lean.evalsha(cache._transport.scripts.delete_if_equals, [key], [mode, expected]))


def test_evict_script_keeps_a_value_replaced_since_the_read(
    cache: CRMCacheManager, raw: redis.Redis
) -> None:
    """Eviction deletes only the exact bytes that failed: a newer good value survives."""
    key = "crm:prefs:c1"
    good = encode_preferences(ClientPreferences(client_id="c1", version=2))
    raw.set(key, good)
    assert _delete_if_equals(cache, key, "value", b"old-bytes") == 0
    assert raw.get(key) == good
    assert cache.get_client_preferences("c1") == ClientPreferences(client_id="c1", version=2)


def test_evict_script_deletes_the_unchanged_bad_value(
    cache: CRMCacheManager, raw: redis.Redis
) -> None:
    """Eviction deletes the key when it still holds exactly the bad bytes (even empty)."""
    raw.set("crm:prefs:c1", b"old-bytes")
    assert _delete_if_equals(cache, "crm:prefs:c1", "value", b"old-bytes") == 1
    assert raw.exists("crm:prefs:c1") == 0
    assert _delete_if_equals(cache, "crm:prefs:c1", "value", b"old-bytes") == 0
    raw.set("crm:prefs:c1", b"")
    assert _delete_if_equals(cache, "crm:prefs:c1", "value", b"") == 1
    assert raw.exists("crm:prefs:c1") == 0


def test_evict_script_value_mode_never_deletes_other_types(
    cache: CRMCacheManager, raw: redis.Redis
) -> None:
    """In value mode a non-string key is left alone, whatever bytes are passed."""
    raw.hset("crm:prefs:h", "f", "v")
    assert _delete_if_equals(cache, "crm:prefs:h", "value", b"") == 0
    assert raw.type("crm:prefs:h") == b"hash"


def test_evict_script_wrong_type_mode(cache: CRMCacheManager, raw: redis.Redis) -> None:
    """In wrong-type mode the script deletes a non-string but never a string value."""
    raw.hset("crm:prefs:h", "f", "v")
    raw.set("crm:prefs:s", b"1:{}")
    assert _delete_if_equals(cache, "crm:prefs:h", "wrongtype", b"") == 1
    assert _delete_if_equals(cache, "crm:prefs:s", "wrongtype", b"") == 0
    assert _delete_if_equals(cache, "crm:prefs:missing", "wrongtype", b"") == 0
    assert raw.exists("crm:prefs:h") == 0
    assert raw.get("crm:prefs:s") == b"1:{}"


def test_ten_megabyte_template(redis_url: str, raw: redis.Redis) -> None:
    """A 10 MB template is refused by default (naming content) and stored when allowed."""
    big = "x" * (10 * 1024 * 1024)
    with CRMCacheManager(redis_url=redis_url) as cache:
        with pytest.raises(ValueError, match="content"):
            cache.set_template("big", "email", big)
        assert raw.exists("crm:template:email:big") == 0
    with CRMCacheManager(redis_url=redis_url, max_template_bytes=16 * 1024 * 1024) as roomy:
        assert roomy.set_template("big", "email", big) is True
        assert roomy.get_template("big", "email") == big
        assert roomy.get_templates([("big", "email")]) == {("big", "email"): big}
