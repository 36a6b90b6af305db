"""crmcache._keys without Redis: the spec's key formats and the checks on key parts."""

from __future__ import annotations

from enum import Enum
from fnmatch import fnmatchcase

import pytest

from crmcache import MessageChannel
from crmcache._keys import (
    DEFAULT_KEY_PREFIX,
    DEFAULT_KEYS,
    KEY_PREFIX,
    MAX_BATCH,
    MAX_KEY_PREFIX_LENGTH,
    PREFS_SCAN_PATTERN,
    SCAN_PATTERN,
    TEMPLATE_PREFIX,
    TRACKED_PREFIXES,
    KeySpace,
    check_channel,
    check_id,
    check_key_prefix,
    lease_key,
    prefs_key,
    rate_limit_key,
    template_key,
    template_key_for,
    template_keys,
)

MAX = 16


def test_prefs_key_format() -> None:
    """Preferences live at crm:prefs:<client_id>."""
    assert prefs_key("client-123") == "crm:prefs:client-123"


@pytest.mark.parametrize(
    ("channel", "expected"),
    [
        (MessageChannel.EMAIL, "crm:template:email:welcome"),
        (MessageChannel.SMS, "crm:template:sms:welcome"),
        (MessageChannel.WHATSAPP, "crm:template:whatsapp:welcome"),
    ],
)
def test_template_key_format(channel: MessageChannel, expected: str) -> None:
    """Templates live at crm:template:<channel>:<name>, the channel by its value."""
    assert template_key(channel, "welcome") == expected


def test_rate_limit_key_format() -> None:
    """Rate-limit counters live at crm:ratelimit:<api>:<window seconds>."""
    assert rate_limit_key("whatsapp", 60) == "crm:ratelimit:whatsapp:60"
    assert rate_limit_key("sms-gateway", 3600) == "crm:ratelimit:sms-gateway:3600"


def test_lease_key_format() -> None:
    """Database-load leases live at crm:lease:prefs:<client_id>."""
    assert lease_key("client-123") == "crm:lease:prefs:client-123"


def test_key_parts_are_used_verbatim() -> None:
    """Glob characters, braces and colons in a part reach the key unchanged (never a pattern)."""
    part = "a*b?[c]{d}:e"
    assert prefs_key(part) == f"crm:prefs:{part}"
    assert template_key(MessageChannel.SMS, part) == f"crm:template:sms:{part}"
    assert rate_limit_key(part, 1) == f"crm:ratelimit:{part}:1"
    assert lease_key(part) == f"crm:lease:prefs:{part}"


def test_every_key_is_under_the_scan_pattern() -> None:
    """Every key starts with crm: and matches SCAN_PATTERN, which is crm:* and nothing wider."""
    assert (KEY_PREFIX, SCAN_PATTERN) == ("crm:", "crm:*")
    keys = [
        prefs_key("c"),
        template_key(MessageChannel.EMAIL, "t"),
        rate_limit_key("api", 60),
        lease_key("c"),
    ]
    for key in keys:
        assert key.startswith(KEY_PREFIX), key
        assert fnmatchcase(key, SCAN_PATTERN), key
    assert not fnmatchcase("other:crm:prefs:c", SCAN_PATTERN)


# -- check_id -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["c", "client-123", "a*b?[c]{d}", "Grüße-你好", "x" * MAX, " padded "],
    ids=["one-char", "plain", "glob", "unicode", "max-length", "inner-spaces"],
)
def test_check_id_returns_valid_parts_unchanged(value: str) -> None:
    """A printable, non-blank str of at most max_length characters comes back as is."""
    assert check_id("client_id", value, MAX) == value


class Api(str, Enum):  # noqa: UP042 - the mixin is the point
    """A (str, Enum) whose str() is 'Api.WHATSAPP', not its value."""

    WHATSAPP = "whatsapp"


def test_check_id_keys_a_str_enum_member_by_its_value() -> None:
    """A str subclass (a (str, Enum) member) is returned as a plain str of its value."""
    checked = check_id("api", Api.WHATSAPP, MAX)
    assert checked == "whatsapp"
    assert type(checked) is str


@pytest.mark.parametrize(
    ("name", "value", "type_name"),
    [
        ("client_id", 123, "int"),
        ("name", b"welcome", "bytes"),
        ("api", None, "NoneType"),
        ("preferences.client_id", ["c"], "list"),
    ],
)
def test_check_id_rejects_non_str_naming_the_argument(
    name: str, value: object, type_name: str
) -> None:
    """A non-str raises TypeError naming the argument and the type given."""
    with pytest.raises(TypeError) as info:
        check_id(name, value, MAX)
    assert str(info.value) == f"{name} must be a str, not {type_name}"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "must not be empty or whitespace"),
        ("   ", "must not be empty or whitespace"),
        ("x" * (MAX + 1), f"is longer than {MAX} characters ({MAX + 1})"),
        ("a\nb", "must not contain control characters"),
        ("a\tb", "must not contain control characters"),
        ("nul\x00", "must not contain control characters"),
        ("\x1b[31mred", "must not contain control characters"),
        ("del\x7f", "must not contain control characters"),
    ],
    ids=["empty", "blank", "too-long", "newline", "tab", "nul", "escape", "del"],
)
def test_check_id_rejects_bad_values_naming_the_argument(value: str, message: str) -> None:
    """Blank, too long or control-character values raise ValueError naming the argument."""
    with pytest.raises(ValueError, match=r"^client_id ") as info:
        check_id("client_id", value, MAX)
    assert message in str(info.value)


def test_check_id_length_limit_is_the_argument() -> None:
    """The limit is max_length as passed: 3 accepts 'abc' and refuses 'abcd'."""
    assert check_id("name", "abc", 3) == "abc"
    with pytest.raises(ValueError, match="name is longer than 3 characters"):
        check_id("name", "abcd", 3)


# -- check_channel --------------------------------------------------------------------------


@pytest.mark.parametrize("channel", list(MessageChannel))
def test_check_channel_accepts_members_and_their_values(channel: MessageChannel) -> None:
    """A MessageChannel comes back as is; its string value gives the same member."""
    assert check_channel(channel) is channel
    assert check_channel(channel.value) is channel


@pytest.mark.parametrize("value", ["fax", "EMAIL", "", "email "])
def test_check_channel_rejects_unknown_strings(value: str) -> None:
    """An unknown string (values are exact, lower case) raises ValueError listing the channels."""
    with pytest.raises(ValueError, match=r"^channel must be one of ") as info:
        check_channel(value)
    assert str(info.value) == f"channel must be one of email, sms, whatsapp; got {value!r}"


@pytest.mark.parametrize(
    ("value", "type_name"), [(1, "int"), (None, "NoneType"), (b"sms", "bytes")]
)
def test_check_channel_rejects_non_str(value: object, type_name: str) -> None:
    """Neither a MessageChannel nor a str raises TypeError naming the argument and the type."""
    with pytest.raises(TypeError) as info:
        check_channel(value)
    assert str(info.value) == f"channel must be a MessageChannel or str, not {type_name}"


def test_every_key_and_pattern_derives_from_key_prefix() -> None:
    """KEY_PREFIX is the one source: every key builder and fixed pattern starts with it."""
    built = [
        prefs_key("c"),
        template_key(MessageChannel.SMS, "t"),
        rate_limit_key("api", 60),
        lease_key("c"),
        SCAN_PATTERN,
        PREFS_SCAN_PATTERN,
        *TRACKED_PREFIXES,
    ]
    assert all(k.startswith(KEY_PREFIX) for k in built), built
    assert PREFS_SCAN_PATTERN == "crm:prefs:*"
    assert TRACKED_PREFIXES == ("crm:prefs:", "crm:template:")


@pytest.mark.parametrize("channel", [MessageChannel.EMAIL, "email"])
def test_template_key_for_accepts_a_member_or_its_value(channel: object) -> None:
    """A template key is the same whether the channel is a member or its string value."""
    assert template_key_for("welcome", channel, MAX) == "crm:template:email:welcome"


def test_template_key_for_checks_name_and_channel() -> None:
    """A bad name or channel raises, naming the argument."""
    with pytest.raises(ValueError, match="channel must be one of"):
        template_key_for("welcome", "fax", MAX)
    with pytest.raises(TypeError, match="name must be a str"):
        template_key_for(3, "email", MAX)
    with pytest.raises(ValueError, match="name is longer than 16"):
        template_key_for("x" * 17, "email", MAX)


def test_template_keys_keep_order_and_drop_repeats() -> None:
    """Pairs map to keys in the order given; a repeated pair is asked for once."""
    refs, keys = template_keys([("a", "email"), ("b", "sms"), ("a", "email")], MAX)
    assert refs == [("a", "email"), ("b", "sms")]
    assert keys == ["crm:template:email:a", "crm:template:sms:b"]


@pytest.mark.parametrize(
    ("templates", "error", "message"),
    [
        ("welcome", TypeError, "iterable of \\(name, channel\\) pairs"),
        (5, TypeError, "iterable of \\(name, channel\\) pairs"),
        ([("a", "email", "x")], TypeError, "items must be \\(name, channel\\) pairs"),
        ([(["unhashable"], "email")], TypeError, "name must be a str"),
    ],
)
def test_template_keys_refuse_what_is_not_pairs(
    templates: object, error: type[Exception], message: str
) -> None:
    """Anything but an iterable of (name, channel) pairs raises; a bad name is named before
    the pair is hashed."""
    with pytest.raises(error, match=message):
        template_keys(templates, MAX)  # type: ignore[arg-type]


def test_template_keys_are_bounded() -> None:
    """More than MAX_BATCH distinct templates in one call raises ValueError."""
    pairs = [(f"t{i}", "email") for i in range(MAX_BATCH + 1)]
    with pytest.raises(ValueError, match=f"at most {MAX_BATCH}"):
        template_keys(pairs, MAX)


def test_the_default_key_space_is_the_spec_formats() -> None:
    """KeySpace("crm") gives exactly the module-level keys and patterns."""
    keys = KeySpace(DEFAULT_KEY_PREFIX)
    assert keys == DEFAULT_KEYS
    assert (keys.prefix, keys.root) == ("crm", KEY_PREFIX)
    assert keys.prefs_key("c") == prefs_key("c")
    assert keys.template_key(MessageChannel.SMS, "t") == template_key(MessageChannel.SMS, "t")
    assert keys.rate_limit_key("api", 60) == rate_limit_key("api", 60)
    assert keys.lease_key("c") == lease_key("c")
    assert keys.scan_pattern == SCAN_PATTERN
    assert keys.prefs_scan_pattern == PREFS_SCAN_PATTERN
    assert keys.tracked_prefixes == TRACKED_PREFIXES
    assert dict(keys.template_prefix) == dict(TEMPLATE_PREFIX)


def test_a_key_space_puts_every_key_and_pattern_under_its_prefix() -> None:
    keys = KeySpace("tenant-7")
    assert keys.prefs_key("c") == "tenant-7:prefs:c"
    assert keys.template_key(MessageChannel.EMAIL, "w") == "tenant-7:template:email:w"
    assert keys.template_key_for("w", "whatsapp", MAX) == "tenant-7:template:whatsapp:w"
    assert keys.template_key_for("w", MessageChannel.SMS, MAX) == "tenant-7:template:sms:w"
    assert keys.template_keys([("a", "email"), ("a", "email")], MAX) == (
        [("a", "email")],
        ["tenant-7:template:email:a"],
    )
    assert keys.rate_limit_key("api", 60) == "tenant-7:ratelimit:api:60"
    assert keys.lease_key("c") == "tenant-7:lease:prefs:c"
    assert keys.scan_pattern == "tenant-7:*"
    assert keys.prefs_scan_pattern == "tenant-7:prefs:*"
    assert keys.tracked_prefixes == ("tenant-7:prefs:", "tenant-7:template:")
    assert fnmatchcase(keys.prefs_key("c"), keys.scan_pattern)
    assert not fnmatchcase(prefs_key("c"), keys.scan_pattern)
    with pytest.raises(ValueError, match=r"^name "):
        keys.template_key_for("", "email", MAX)


def test_a_key_space_is_immutable() -> None:
    keys = KeySpace("tenant")
    with pytest.raises(AttributeError):
        keys.prefix = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    "prefix", ["", " ", "a b", "a\x7f", "a\u2028", "*", "a?", "[a]", "a\\", "{a}", "x" * 65]
)
def test_check_key_prefix_refuses(prefix: str) -> None:
    with pytest.raises(ValueError, match=r"^key_prefix "):
        check_key_prefix(prefix)
    with pytest.raises(ValueError, match=r"^key_prefix "):
        KeySpace(prefix)


def test_check_key_prefix_accepts_and_types() -> None:
    assert check_key_prefix("x" * MAX_KEY_PREFIX_LENGTH) == "x" * 64
    assert check_key_prefix("tenant:42") == "tenant:42"
    with pytest.raises(TypeError, match=r"^key_prefix must be a str, not NoneType"):
        check_key_prefix(None)
