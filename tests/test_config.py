"""Settings: environment variables, constructor validation, password masking, TLS URLs,
the disabled mode, the get_cache_manager registry and the context manager."""

from __future__ import annotations

import json
import logging
import math
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

import crmcache
from crmcache import (
    ClientPreferences,
    ConfigurationError,
    CRMCacheManager,
    MessageChannel,
    close_cache_managers,
    get_cache_manager,
    mask_url,
)
from crmcache._config import MAX_DURATION
from crmcache.testing import RedisServer, find_redis_server_binary, free_loopback_port
from helpers import poll

SECRET = "s3cretpw"


def with_db(url: str, db: int) -> str:
    """``url`` with its database number replaced by ``db``."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{db}"))


def dead_url(password: str | None = None, scheme: str = "redis") -> str:
    """A URL on loopback where (almost certainly) nothing listens."""
    auth = "" if password is None else f"user:{password}@"
    return f"{scheme}://{auth}127.0.0.1:{free_loopback_port()}/0"


def full_text(exc: BaseException) -> str:
    """Everything a traceback of ``exc`` would print, chained exceptions included."""
    return "".join(traceback.format_exception(exc))


def assert_no_secret_in_logs(caplog: pytest.LogCaptureFixture, secret: str) -> None:
    """No captured record, message, argument or traceback mentions ``secret``."""
    assert secret not in caplog.text
    for record in caplog.records:
        assert secret not in record.getMessage()
        assert secret not in repr(record.args)
        if record.exc_info and record.exc_info[1] is not None:
            assert secret not in full_text(record.exc_info[1])


# -- environment variables -------------------------------------------------------------


def test_env_redis_url_is_used(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, raw: redis.Redis
) -> None:
    """REDIS_URL picks the server when no redis_url argument is given."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    with CRMCacheManager() as manager:
        assert manager.settings.redis_url == redis_url
        assert manager.set_template("welcome", "email", "hi") is True
    assert raw.get("crm:template:email:welcome") == b"hi"


def test_env_cache_ttl_sets_the_preference_ttl_in_redis(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, raw: redis.Redis
) -> None:
    """CACHE_TTL=120 makes crm:prefs:<id> expire in 120 s, not the default 3600 s."""
    monkeypatch.setenv("CACHE_TTL", "120")
    with CRMCacheManager(redis_url=redis_url) as manager:
        assert manager.settings.cache_ttl == 120
        assert manager.set_client_preferences(ClientPreferences(client_id="c1")) is True
    ttl = raw.ttl("crm:prefs:c1")
    pttl = raw.pttl("crm:prefs:c1")
    assert 100 <= ttl <= 120
    assert 100_000 <= pttl <= 120_000


def test_default_ttl_without_env(redis_url: str, raw: redis.Redis) -> None:
    """With no CACHE_TTL the preference TTL is the spec's one hour."""
    with CRMCacheManager(redis_url=redis_url) as manager:
        assert manager.settings.cache_ttl == crmcache.DEFAULT_CACHE_TTL == 3600
        assert manager.set_client_preferences(ClientPreferences(client_id="c1")) is True
    assert 3500 <= raw.ttl("crm:prefs:c1") <= 3600


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("true", True),
        ("false", False),
        ("1", True),
        ("0", False),
        ("TRUE", True),
        ("False", False),
    ],
)
def test_env_enable_caching_values(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, value: str, expected: bool
) -> None:
    """ENABLE_CACHING accepts true/false/1/0 (any case) and switches the cache."""
    monkeypatch.setenv("ENABLE_CACHING", value)
    with CRMCacheManager(redis_url=redis_url) as manager:
        assert manager.settings.enabled is expected
        assert manager.enabled is expected
        assert (manager._transport is not None) is expected
        assert manager.set_template("t", "sms", "x") is expected


def test_explicit_arguments_win_over_env(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, raw: redis.Redis
) -> None:
    """redis_url, cache_ttl and enabled given to the constructor override all three env vars."""
    monkeypatch.setenv("REDIS_URL", dead_url())
    monkeypatch.setenv("CACHE_TTL", "5")
    monkeypatch.setenv("ENABLE_CACHING", "false")
    with CRMCacheManager(redis_url=redis_url, cache_ttl=300, enabled=True) as manager:
        assert manager.settings.redis_url == redis_url
        assert manager.settings.cache_ttl == 300
        assert manager.enabled is True
        assert manager.set_client_preferences(ClientPreferences(client_id="c1")) is True
    assert 290 <= raw.ttl("crm:prefs:c1") <= 300


def test_explicit_false_wins_over_env_true(
    monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """enabled=False beats ENABLE_CACHING=true."""
    monkeypatch.setenv("ENABLE_CACHING", "true")
    with CRMCacheManager(redis_url=redis_url, enabled=False) as manager:
        assert manager.enabled is False
        assert manager._transport is None


def test_explicit_cache_ttl_wins_over_invalid_env(
    monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """An explicit cache_ttl makes a malformed CACHE_TTL irrelevant."""
    monkeypatch.setenv("CACHE_TTL", "abc")
    with CRMCacheManager(redis_url=redis_url, cache_ttl=10) as manager:
        assert manager.settings.cache_ttl == 10


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CACHE_TTL", "abc"),
        ("CACHE_TTL", "0"),
        ("CACHE_TTL", "-5"),
        ("CACHE_TTL", "1.5"),
        ("ENABLE_CACHING", "maybe"),
        ("ENABLE_CACHING", "2"),
        ("REDIS_URL", "http://x"),
        ("REDIS_URL", "redis://"),
        ("REDIS_URL", "redis://h:notaport/0"),
    ],
)
def test_invalid_env_value_raises_configuration_error(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, name: str, value: str
) -> None:
    """A malformed env var raises ConfigurationError (a ValueError) naming the variable."""
    monkeypatch.setenv(name, value)
    kwargs = {} if name == "REDIS_URL" else {"redis_url": redis_url}
    with pytest.raises(ConfigurationError) as info:
        CRMCacheManager(**kwargs)
    assert isinstance(info.value, ValueError)
    # REDIS_URL problems are reported as "redis_url": accept either spelling.
    assert name.lower() in str(info.value).lower()


def test_invalid_env_raises_from_get_cache_manager(monkeypatch: pytest.MonkeyPatch) -> None:
    """get_cache_manager() validates the environment too."""
    monkeypatch.setenv("CACHE_TTL", "zero")
    with pytest.raises(ConfigurationError, match="CACHE_TTL"):
        get_cache_manager()


@pytest.mark.parametrize(
    ("name", "value"),
    [("CACHE_TTL", "abc"), ("CACHE_TTL", "0"), ("ENABLE_CACHING", "maybe")],
)
def test_env_error_never_shows_the_redis_url_password(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    """With a password in REDIS_URL, an error about another env var does not leak it."""
    monkeypatch.setenv("REDIS_URL", f"redis://:{SECRET}@127.0.0.1:6390/0")
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError) as info:
        CRMCacheManager()
    assert name in str(info.value)
    assert SECRET not in str(info.value)
    assert SECRET not in full_text(info.value)


def test_env_bad_redis_url_with_password_is_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unparsable REDIS_URL holding a password is reported with the password masked."""
    monkeypatch.setenv("REDIS_URL", f"rediss://:{SECRET}@host:notaport/0")
    with pytest.raises(ConfigurationError) as info:
        CRMCacheManager()
    assert "***" in str(info.value)
    assert SECRET not in full_text(info.value)


# -- constructor validation ------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"max_connections": 0}, ConfigurationError, "max_connections"),
        ({"max_connections": -1}, ConfigurationError, "max_connections"),
        ({"max_connections": "10"}, TypeError, "max_connections"),
        ({"max_connections": 2.5}, TypeError, "max_connections"),
        ({"max_connections": True}, TypeError, "max_connections"),
        ({"socket_timeout": -1}, ConfigurationError, "socket_timeout"),
        ({"socket_timeout": 0}, ConfigurationError, "socket_timeout"),
        ({"socket_timeout": float("nan")}, ConfigurationError, "socket_timeout"),
        ({"socket_timeout": math.inf}, ConfigurationError, "socket_timeout"),
        ({"socket_timeout": "5"}, TypeError, "socket_timeout"),
        ({"socket_timeout": None}, TypeError, "socket_timeout"),
        ({"socket_connect_timeout": 0}, ConfigurationError, "socket_connect_timeout"),
        ({"socket_connect_timeout": float("nan")}, ConfigurationError, "socket_connect_timeout"),
        ({"pool_timeout": -0.5}, ConfigurationError, "pool_timeout"),
        ({"cache_ttl": "10"}, TypeError, "cache_ttl"),
        ({"cache_ttl": 1.5}, TypeError, "cache_ttl"),
        ({"cache_ttl": 0}, ConfigurationError, "cache_ttl"),
        ({"cache_ttl": -60}, ConfigurationError, "cache_ttl"),
        ({"tombstone_ttl": 0}, ConfigurationError, "tombstone_ttl"),
        ({"enabled": "yes"}, TypeError, "enabled"),
        ({"enabled": 1}, TypeError, "enabled"),
        ({"redis_url": 123}, TypeError, "redis_url"),
        ({"redis_url": b"redis://127.0.0.1:6390/0"}, TypeError, "redis_url"),
        ({"redis_url": "ftp://h"}, ConfigurationError, "redis_url"),
        ({"redis_url": "http://127.0.0.1:6390/0"}, ConfigurationError, "redis_url"),
        ({"redis_url": ""}, ConfigurationError, "redis_url"),
        ({"redis_url": "redis://"}, ConfigurationError, "redis_url"),
        ({"redis_url": "localhost:6390"}, ConfigurationError, "redis_url"),
        ({"redis_url": "redis://h:99999/0"}, ConfigurationError, "redis_url"),
        ({"rate_limit_policy": "maybe"}, ValueError, "rate_limit_policy"),
        ({"rate_limit_policy": None}, TypeError, "rate_limit_policy"),
        ({"max_id_length": 0}, ConfigurationError, "max_id_length"),
        ({"max_template_bytes": -1}, ConfigurationError, "max_template_bytes"),
        ({"breaker_failures": 0}, ConfigurationError, "breaker_failures"),
        ({"breaker_failures": -3}, ConfigurationError, "breaker_failures"),
        ({"breaker_failures": 2.5}, TypeError, "breaker_failures"),
        ({"breaker_failures": "5"}, TypeError, "breaker_failures"),
        ({"breaker_failures": True}, TypeError, "breaker_failures"),
        ({"breaker_max_backoff": 0}, ConfigurationError, "breaker_max_backoff"),
        ({"breaker_max_backoff": -1.0}, ConfigurationError, "breaker_max_backoff"),
        ({"breaker_max_backoff": math.inf}, ConfigurationError, "breaker_max_backoff"),
        ({"breaker_max_backoff": float("nan")}, ConfigurationError, "breaker_max_backoff"),
        ({"breaker_max_backoff": "30"}, TypeError, "breaker_max_backoff"),
        ({"breaker_max_backoff": None}, TypeError, "breaker_max_backoff"),
    ],
)
def test_constructor_rejects_bad_settings(
    redis_url: str, kwargs: dict[str, object], error: type[Exception], name: str
) -> None:
    """Each bad constructor argument raises the right error type naming the argument."""
    arguments: dict[str, object] = {"redis_url": redis_url, **kwargs}
    with pytest.raises(error) as info:
        CRMCacheManager(**arguments)  # type: ignore[arg-type]
    assert name in str(info.value)


DURATIONS = ["socket_timeout", "socket_connect_timeout", "pool_timeout", "near_cache_ttl"]


@pytest.mark.parametrize("name", DURATIONS)
@pytest.mark.parametrize(
    "value",
    [sys.maxsize, 2**64, 10**5000, 1e10, MAX_DURATION + 0.001, 86401],
    ids=["maxsize", "2**64", "10**5000", "1e10", "just-over", "86401"],
)
def test_durations_are_capped_at_one_day(redis_url: str, name: str, value: float) -> None:
    """A duration past MAX_DURATION (one day) is refused at construction, naming the
    argument (before: socket_timeout=sys.maxsize passed, then every call raised
    OverflowError inside and degraded; an int too large for a float raised OverflowError
    from the constructor)."""
    with pytest.raises(ConfigurationError, match=f"{name} must be") as info:
        CRMCacheManager(redis_url, near_cache=True, **{name: value})  # type: ignore[arg-type]
    assert "86400" in str(info.value) or "finite" in str(info.value)


def test_the_longest_durations_work(redis_url: str, raw: redis.Redis) -> None:
    """Every duration at its maximum: every call answers, the near cache goes live, and
    callers queued for the one pooled connection wait with the longest pool timeout."""
    longest = dict.fromkeys(DURATIONS, MAX_DURATION)
    with CRMCacheManager(redis_url, **longest) as manager:  # type: ignore[arg-type]
        assert manager.settings.socket_timeout == MAX_DURATION
        run_every_call(manager)
    with CRMCacheManager(
        redis_url,
        max_connections=1,
        near_cache=True,
        pipelining=False,  # callers queue for the one pooled connection
        **longest,  # type: ignore[arg-type]
    ) as manager:
        manager.set_template("t", "email", "x")
        poll(lambda: manager.get_template("t", "email") == "x" and manager._near.live)
        errors: list[BaseException] = []

        def worker() -> None:
            try:
                for i in range(50):
                    assert manager.set_template(f"w{i}", "sms", "y") is True
                    assert manager.check_rate_limit("longest", 10**6).degraded is False
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == []
        counters = manager.get_cache_stats()["counters"]
        assert counters["unexpected_errors"] == 0
        assert counters["redis_errors"] == 0
        assert manager._transport is not None
        assert manager._transport.accounting().waits > 0  # the pool timeout was waited on


def test_valid_settings_are_normalised(redis_url: str) -> None:
    """Integer seconds become floats and every accepted value is kept as given."""
    with CRMCacheManager(
        redis_url=redis_url,
        max_connections=3,
        socket_timeout=2,
        socket_connect_timeout=1,
        cache_ttl=42,
        rate_limit_policy="closed",
    ) as manager:
        settings = manager.settings
        assert settings.max_connections == 3
        assert settings.socket_timeout == 2.0
        assert isinstance(settings.socket_timeout, float)
        assert settings.socket_connect_timeout == 1.0
        assert settings.cache_ttl == 42
        assert settings.rate_limit_policy == "closed"
        assert manager._transport is not None
        assert manager._transport.max_connections == 3


def test_settings_are_immutable(redis_url: str) -> None:
    """CacheSettings is frozen: a manager's settings cannot be changed after validation."""
    with CRMCacheManager(redis_url=redis_url) as manager:
        with pytest.raises(AttributeError):
            manager.settings.cache_ttl = 0  # type: ignore[misc]
        assert manager.settings.cache_ttl == 3600


# -- password masking ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
        ("redis://user:pw@h:1/0", "redis://user:***@h:1/0"),
        ("rediss://user:pw@h:6380/2", "rediss://user:***@h:6380/2"),
        ("unix://:pw@/tmp/redis.sock?db=1", "unix://:***@/tmp/redis.sock?db=1"),
        ("redis://h:1/0?password=pw", "redis://h:1/0?password=***"),
        ("redis://h:1/0?db=1&password=pw&x=y", "redis://h:1/0?db=1&password=***&x=y"),
        ("redis://h:1/0?PASSWORD=pw", "redis://h:1/0?PASSWORD=***"),
        ("rediss://h:1/0?ssl_password=pw&db=1", "rediss://h:1/0?ssl_password=***&db=1"),
        ("redis://h:1/0", "redis://h:1/0"),
        ("redis://user@h:1/0", "redis://user@h:1/0"),
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        pytest.param(
            "redis://:p@ss@h:1/0",
            "redis://:***@h:1/0",
            id="password-with-at-sign",
        ),
        pytest.param(
            "REDIS://:pw@h:1/0",
            "REDIS://:***@h:1/0",
            id="uppercase-scheme",
        ),
    ],
)
def test_mask_url(url: str, expected: str) -> None:
    """mask_url hides authority and query passwords and keeps everything else."""
    assert mask_url(url) == expected


def test_password_never_shown_by_a_manager_or_its_logs(
    crm_logs: pytest.LogCaptureFixture,
) -> None:
    """repr, settings, stats and every log line of a failing manager hide the password."""
    url = dead_url(password=SECRET)
    manager = CRMCacheManager(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        for text in (repr(manager), str(manager), repr(manager.settings), str(manager.settings)):
            assert SECRET not in text
        assert "user:***@" in repr(manager)
        assert "user:***@" in repr(manager.settings)

        for _ in range(7):  # enough to open the circuit breaker (a log line of its own)
            assert manager.get_client_preferences("c1") is None
        assert manager.set_client_preferences(ClientPreferences(client_id="c1")) is False
        assert manager.invalidate_client_preferences("c1") is False
        assert manager.get_template("welcome", "email") is None
        assert manager.set_template("welcome", "email", "hi") is False
        assert manager.invalidate_template("welcome", "email") is False
        assert manager.get_templates([("welcome", "email")]) == {("welcome", "email"): None}
        assert manager.check_rate_limit("api", 10).degraded is True
        assert manager.health_check() is False

        stats = manager.get_cache_stats()
        assert SECRET not in json.dumps(stats, default=str)
        assert stats["counters"]["redis_errors"] > 0
    finally:
        manager.close()

    warnings = [r for r in crm_logs.records if r.levelno >= logging.WARNING]
    assert warnings, "the failure path logged nothing: the test proves nothing"
    assert any("health check failed" in r.getMessage() for r in warnings)
    assert_no_secret_in_logs(crm_logs, SECRET)


@pytest.mark.parametrize(
    "url",
    [
        f"rediss://:{SECRET}@host:notaport/0",
        f"redis://user:{SECRET}@host:99999/0",
        f"ftp://user:{SECRET}@host/0",
        f"redis://:{SECRET}@/0",
        f"http://h/0?password={SECRET}",
        f"redis://:{SECRET}@127.0.0.1:6390/0?socket_timeout=abc",
        pytest.param(
            f"REDIS://:{SECRET}@127.0.0.1:6390/0",
            id="uppercase-scheme",
        ),
    ],
)
def test_bad_url_error_never_shows_the_password(url: str) -> None:
    """The error for a malformed URL holding a password never contains the password."""
    with pytest.raises(ValueError, match="redis_url") as info:
        CRMCacheManager(url)
    assert SECRET not in str(info.value)
    assert SECRET not in full_text(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "rediss://:pw@host:notaport/0",
        "redis://h:99999/0",
        "redis://:pw@/0",
        pytest.param(
            "redis://127.0.0.1:6390/0?socket_timeout=abc",
            id="bad-query-option",
        ),
        pytest.param(
            "REDIS://127.0.0.1:6390/0",
            id="uppercase-scheme",
        ),
    ],
)
def test_bad_url_raises_configuration_error(url: str) -> None:
    """Every unusable URL is reported as ConfigurationError, whichever layer notices."""
    with pytest.raises(ConfigurationError, match="redis_url"):
        CRMCacheManager(url)


def test_query_password_is_masked_in_repr() -> None:
    """A ?password= query parameter is masked in repr and settings."""
    with CRMCacheManager(f"redis://127.0.0.1:6390/0?password={SECRET}") as manager:
        assert SECRET not in repr(manager)
        assert SECRET not in repr(manager.settings)
        assert "password=***" in repr(manager)


# -- URL query parameters -------------------------------------------------------------


def with_query(url: str, query: str, *, password: str | None = None, path: str = "/0") -> str:
    """``url`` (the session's server) with ``query``, database ``path``, and a password."""
    parts = urlsplit(url)
    auth = "" if password is None else f":{password}@"
    return f"{parts.scheme}://{auth}{parts.hostname}:{parts.port}{path}?{query}"


def run_every_call(manager: CRMCacheManager) -> None:
    """Every public call answers correctly, undegraded; nothing raised or was swallowed."""
    prefs = ClientPreferences(client_id="q1", timezone="Europe/Berlin", version=2)
    assert manager.get_client_preferences("q1") is None
    assert manager.set_client_preferences(prefs) is True
    assert manager.get_client_preferences("q1") == prefs
    assert manager.invalidate_client_preferences("q1", version=3) is True
    assert manager.get_client_preferences("q1") is None
    assert manager.set_template("welcome", "email", "<h1>Hi</h1>") is True
    assert manager.get_template("welcome", MessageChannel.EMAIL) == "<h1>Hi</h1>"
    assert manager.set_templates({("otp", "sms"): "Code"}) is True
    assert manager.get_templates([("otp", "sms"), ("none", "email")]) == {
        ("otp", "sms"): "Code",
        ("none", "email"): None,
    }
    assert manager.invalidate_template("welcome", "email") is True
    assert manager.get_template("welcome", "email") is None
    first, second = (manager.check_rate_limit("q-api", limit=1, window=60) for _ in range(2))
    assert (first.allowed, first.degraded) == (True, False)
    assert (second.allowed, second.degraded) == (False, False)
    assert manager.health_check() is True
    stats = manager.get_cache_stats()
    assert stats["total_keys"] == 3  # the tombstone, the SMS template and the counter
    assert stats["redis"] is not None
    assert stats["counters"]["redis_errors"] == 0
    assert stats["counters"]["unexpected_errors"] == 0


#: Query parameters crmcache refuses at construction, whatever their value.
REFUSED_URL_PARAMETERS = [
    "foo=bar",
    "decode_responses=true",
    "decode_responses=false",
    "protocol=3",
    "protocol=2",
    "legacy_responses=false",
    "encoding=latin-1",
    "encoding_errors=ignore",
    "max_connections=1",
    "timeout=0.5",
    "retry_on_timeout=true",
    "retry_on_error=TimeoutError",
    "lib_name=other",
    "host=elsewhere",
    "port=6390",
    "path=/tmp/x.sock",
    "connection_class=UnixDomainSocketConnection",
    "parser_class=x",
    "credential_provider=x",
    "single_connection_client=true",
    "DB=1",  # redis-py's names are case-sensitive: DB would reach Connection() as is
    "Password=x",
]

#: Known parameters with a value that does not parse (or does not mean what it says).
BAD_URL_VALUES = [
    ("db=x", "db"),
    ("db=-1", "db"),
    ("db=1.5", "db"),
    ("db=", "db"),
    ("socket_timeout=abc", "socket_timeout"),
    ("socket_timeout=0", "socket_timeout"),
    ("socket_timeout=-1", "socket_timeout"),
    ("socket_timeout=nan", "socket_timeout"),
    ("socket_timeout=inf", "socket_timeout"),
    ("socket_timeout=", "socket_timeout"),
    ("socket_connect_timeout=0", "socket_connect_timeout"),
    ("socket_connect_timeout=-1", "socket_connect_timeout"),
    ("socket_connect_timeout=-0.5", "socket_connect_timeout"),
    # Past one day (MAX_DURATION): before, accepted, then every call overflowed.
    ("socket_timeout=86401", "socket_timeout"),
    ("socket_timeout=1e12", "socket_timeout"),
    ("socket_timeout=9223372036854775807", "socket_timeout"),
    ("socket_connect_timeout=1e12", "socket_connect_timeout"),
    ("health_check_interval=86401", "health_check_interval"),
    ("health_check_interval=99999999999999999999999", "health_check_interval"),
    # Each read allocates a buffer of this size (before: MemoryError on every call).
    ("socket_read_size=99999999999999", "socket_read_size"),
    ("health_check_interval=1.5", "health_check_interval"),
    ("health_check_interval=-1", "health_check_interval"),
    ("socket_read_size=0", "socket_read_size"),
    ("socket_keepalive=maybe", "socket_keepalive"),
    ("socket_keepalive=off", "socket_keepalive"),  # redis-py would read "off" as True
    ("client_name=two%20words", "client_name"),
    ("client_name=a%0Ab", "client_name"),
    ("client_name=", "client_name"),
    ("password=", "password"),
    ("db=1&db=2", "db"),
    ("socket_timeout=1&socket_timeout=1", "socket_timeout"),
    ("ssl_ca_certs=/tmp/ca.crt", "ssl_ca_certs"),  # TLS options need rediss://
    ("ssl_cert_reqs=none", "ssl_cert_reqs"),
]


@pytest.mark.parametrize("query", REFUSED_URL_PARAMETERS)
@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.single_only
def test_refused_url_parameter_raises_at_construction(
    redis_url: str, query: str, enabled: bool
) -> None:
    """A parameter crmcache controls, or does not know, is refused by the constructor,
    named in the error, with the password masked (before: accepted, then every call
    failed or raised)."""
    name = query.partition("=")[0]
    url = with_query(redis_url, query, password=SECRET)
    with pytest.raises(ConfigurationError) as info:
        CRMCacheManager(url, enabled=enabled)
    assert f"'{name}'" in str(info.value)
    assert "redis_url" in str(info.value)
    assert SECRET not in full_text(info.value)


@pytest.mark.parametrize(("query", "name"), BAD_URL_VALUES)
@pytest.mark.single_only
def test_bad_url_parameter_value_raises_naming_it(redis_url: str, query: str, name: str) -> None:
    """A known parameter whose value does not parse is refused, named, password masked."""
    url = with_query(redis_url, query, password=SECRET)
    with pytest.raises(ConfigurationError) as info:
        CRMCacheManager(url)
    assert f"'{name}'" in str(info.value)
    assert SECRET not in full_text(info.value)


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("rediss://127.0.0.1:6390/0?ssl_cert_reqs=never", "ssl_cert_reqs"),
        ("rediss://127.0.0.1:6390/0?ssl_cert_reqs=NONE", "ssl_cert_reqs"),
        ("rediss://127.0.0.1:6390/0?ssl_check_hostname=maybe", "ssl_check_hostname"),
        ("rediss://127.0.0.1:6390/0?ssl_min_version=5", "ssl_min_version"),
        ("rediss://127.0.0.1:6390/0?ssl_min_version=TLSv1_2", "ssl_min_version"),
        ("rediss://127.0.0.1:6390/0?ssl_ciphers=NOT-A-CIPHER", "ssl_ciphers"),
        ("rediss://127.0.0.1:6390/0?ssl_include_verify_flags=BOGUS", "ssl_include_verify_flags"),
        ("rediss://127.0.0.1:6390/0?ssl_exclude_verify_flags=X", "ssl_exclude_verify_flags"),
        ("rediss://127.0.0.1:6390/0?ssl_ca_data=x", "ssl_ca_data"),
        ("rediss://127.0.0.1:6390/0?ssl_validate_ocsp=true", "ssl_validate_ocsp"),
        ("rediss://127.0.0.1:6390/0?retry_on_timeout=false", "retry_on_timeout"),
        ("redis://127.0.0.1:6390/0?db=1", "db"),  # two different databases
        ("unix:///tmp/redis.sock?socket_keepalive=true", "socket_keepalive"),
        ("unix:///tmp/redis.sock?ssl_ca_certs=/tmp/ca.crt", "ssl_ca_certs"),
    ],
)
def test_url_parameter_refused_for_its_scheme_or_value(url: str, name: str) -> None:
    """TLS options with their values, and options that do not fit the URL, are refused."""
    with pytest.raises(ConfigurationError, match=f"'{name}'"):
        CRMCacheManager(url)


@pytest.mark.single_only
def test_refused_url_parameter_raises_from_env_and_get_cache_manager(
    monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """REDIS_URL is checked the same way, by the constructor and by get_cache_manager."""
    monkeypatch.setenv("REDIS_URL", with_query(redis_url, "decode_responses=true"))
    with pytest.raises(ConfigurationError, match="'decode_responses'"):
        CRMCacheManager()
    with pytest.raises(ConfigurationError, match="'decode_responses'"):
        get_cache_manager()


@pytest.mark.single_only
def test_url_parameter_error_never_shows_a_password_in_the_query(redis_url: str) -> None:
    """A ?password= (or ?ssl_password=) next to a refused parameter stays hidden."""
    for query in (f"password={SECRET}&foo=bar", f"foo=bar&ssl_password={SECRET}"):
        with pytest.raises(ConfigurationError, match="'foo'") as info:
            CRMCacheManager(with_query(redis_url, query))
        assert SECRET not in full_text(info.value)
    # A password pasted where a parameter's name goes is not echoed either.
    with pytest.raises(ConfigurationError) as info:
        CRMCacheManager(with_query(redis_url, f"password={SECRET}&{SECRET}=1"))
    assert SECRET not in full_text(info.value)


@pytest.mark.parametrize(
    "query",
    [
        "socket_timeout=2.5",
        "socket_connect_timeout=1.5",
        "socket_keepalive=false",
        "socket_keepalive=yes",
        "socket_read_size=4096",
        "health_check_interval=0",
        "health_check_interval=1",
        "client_name=orders-service",
        "db=0",
        "socket_timeout=3&socket_connect_timeout=2&health_check_interval=10",
        "socket_timeout=86400&socket_connect_timeout=86400&health_check_interval=86400",
        "socket_read_size=16777216",
    ],
)
@pytest.mark.single_only
def test_accepted_url_parameters_work_against_a_real_server(
    redis_url: str, raw: redis.Redis, query: str
) -> None:
    """Every call works with each accepted parameter: none raises or degrades."""
    with CRMCacheManager(with_query(redis_url, query)) as manager:
        run_every_call(manager)


@pytest.mark.single_only
def test_url_db_parameter_selects_the_database(redis_url: str, raw: redis.Redis) -> None:
    """?db=1 (with no database in the path) writes to database 1."""
    other = redis.Redis.from_url(with_db(redis_url, 1), protocol=2)
    try:
        other.flushdb()
        with CRMCacheManager(with_query(redis_url, "db=1", path="")) as manager:
            run_every_call(manager)
        assert other.get("crm:template:sms:otp") == b"Code"
        assert raw.get("crm:template:sms:otp") is None
        other.flushdb()
    finally:
        other.close()


@pytest.mark.single_only
def test_url_timeouts_win_over_the_arguments(redis_url: str) -> None:
    """A timeout in the URL overrides the argument (redis-py's rule), and the settings
    show the value in force."""
    url = with_query(redis_url, "socket_timeout=2.5&socket_connect_timeout=1.5")
    with CRMCacheManager(url, socket_timeout=7, socket_connect_timeout=6) as manager:
        assert manager.settings.socket_timeout == 2.5
        assert manager.settings.socket_connect_timeout == 1.5
        assert manager._transport is not None
        assert manager._transport.connection_kwargs["socket_timeout"] == 2.5
        assert manager._transport.connection_kwargs["socket_connect_timeout"] == 1.5


@pytest.mark.single_only
def test_url_client_name_names_the_data_connections(redis_url: str, raw: redis.Redis) -> None:
    """?client_name= names the data-path connections; health checks keep their own name."""
    with CRMCacheManager(with_query(redis_url, "client_name=orders-service")) as manager:
        assert manager.set_template("welcome", "email", "hi") is True
        assert manager.health_check() is True
        names = {c["name"] for c in raw.client_list()}
        assert {"orders-service", "crmcache-health"} <= names


@pytest.mark.skipif(find_redis_server_binary() is None, reason="needs a redis-server binary")
def test_url_username_and_password_parameters(redis_url: str) -> None:
    """?username=&password= authenticate, as the authority's user:password@ would."""
    with RedisServer(password="pw-query") as server:
        url = f"redis://127.0.0.1:{server.port}/0?username=default&password=pw-query"
        with CRMCacheManager(url) as manager:
            run_every_call(manager)
            assert "pw-query" not in repr(manager)


@pytest.fixture
def hang_up_port() -> Iterator[int]:
    """A loopback port that accepts connections and closes them at once (a TLS handshake
    then fails in milliseconds instead of waiting for the read timeout)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.close()

    thread = threading.Thread(target=serve, name="hang-up", daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


@pytest.mark.parametrize(
    "query",
    [
        "ssl_cert_reqs=none",
        "ssl_cert_reqs=optional",
        "ssl_cert_reqs=required&ssl_check_hostname=false",
        "ssl_ca_certs=/nonexistent/ca.crt",
        "ssl_ca_path=/nonexistent",
        "ssl_certfile=/nonexistent/c.crt&ssl_keyfile=/nonexistent/c.key&ssl_password=k3y",
        "ssl_min_version=772",
        "ssl_ciphers=ECDHE%2BAESGCM",
        "ssl_include_verify_flags=VERIFY_X509_STRICT",
        "ssl_exclude_verify_flags=[VERIFY_X509_STRICT,VERIFY_X509_PARTIAL_CHAIN]",
    ],
)
def test_accepted_tls_url_parameters_never_raise(hang_up_port: int, query: str) -> None:
    """rediss:// with each accepted TLS option, to a port that hangs up (or with files
    that do not exist): every call degrades, none raises. (tests/test_security.py shows
    them working against a real TLS server.)"""
    url = f"rediss://127.0.0.1:{hang_up_port}/0?{query}"
    with CRMCacheManager(url, socket_timeout=1, socket_connect_timeout=1) as manager:
        assert manager.get_client_preferences("q1") is None
        assert manager.set_client_preferences(ClientPreferences(client_id="q1")) is False
        assert manager.get_template("welcome", "email") is None
        assert manager.get_templates([("welcome", "email")]) == {("welcome", "email"): None}
        assert manager.set_template("welcome", "email", "x") is False
        assert manager.check_rate_limit("q-api", limit=5).degraded is True
        assert manager.health_check() is False
        assert manager.get_cache_stats()["redis"] is None
        assert "k3y" not in repr(manager)


# -- a real password-protected server --------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(find_redis_server_binary() is None, reason="needs a redis-server binary")
def test_password_protected_server(crm_logs: pytest.LogCaptureFixture) -> None:
    """The right password works; no or a wrong password degrades without raising."""
    password = "pw-123"
    prefs = ClientPreferences(client_id="c1", timezone="Europe/Berlin", version=2)
    with RedisServer(password=password) as server:
        assert password in server.url
        with CRMCacheManager(server.url) as good:
            assert good.health_check() is True
            assert good.set_client_preferences(prefs) is True
            assert good.get_client_preferences("c1") == prefs
            assert good.set_template("welcome", MessageChannel.EMAIL, "hello") is True
            assert good.get_template("welcome", "email") == "hello"
            assert repr(good).count("***") == 1

        for url in (
            f"redis://127.0.0.1:{server.port}/0",
            f"redis://:wrong-pw@127.0.0.1:{server.port}/0",
        ):
            with CRMCacheManager(url, socket_connect_timeout=1, socket_timeout=1) as bad:
                assert bad.get_client_preferences("c1") is None
                assert bad.set_client_preferences(prefs) is False
                assert bad.get_template("welcome", "email") is None
                assert bad.set_template("welcome", "email", "x") is False
                assert bad.health_check() is False
                assert bad.get_cache_stats()["counters"]["redis_errors"] > 0

        # The refused writes really did not land.
        checker = redis.Redis.from_url(server.url)
        try:
            assert checker.get("crm:template:email:welcome") == b"hello"
        finally:
            checker.close()

    assert any(r.levelno == logging.WARNING for r in crm_logs.records)
    assert_no_secret_in_logs(crm_logs, password)
    assert_no_secret_in_logs(crm_logs, "wrong-pw")


# -- TLS URLs --------------------------------------------------------------------------


def test_rediss_url_uses_tls_and_degrades_without_a_server() -> None:
    """A rediss:// URL builds SSL connections; with no server it reports unhealthy fast."""
    manager = CRMCacheManager(redis_url=dead_url(scheme="rediss"), socket_connect_timeout=0.5)
    try:
        assert manager._transport is not None
        # redis.SSLConnection, or its redis.asyncio namesake under --facade=async, for the
        # data path, the admin calls and the health probe alike.
        assert manager._transport.connection_class.__name__ == "SSLConnection"
        for pool in (manager._transport, manager._transport.admin, manager._transport.health):
            assert type(pool._factory()).__name__ == "SSLConnection"
        started = time.monotonic()
        assert manager.health_check() is False
        assert time.monotonic() - started < 2.0
        assert manager.get_client_preferences("c1") is None
        assert manager.get_template("welcome", "email") is None
        assert manager.set_template("welcome", "email", "x") is False
    finally:
        manager.close()


@pytest.mark.single_only
def test_rediss_url_against_plain_server_never_downgrades(redis_url: str) -> None:
    """rediss:// to a non-TLS server fails the handshake (bounded) instead of talking plain."""
    parts = urlsplit(redis_url)
    url = f"rediss://{parts.hostname}:{parts.port}/0"
    manager = CRMCacheManager(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        started = time.monotonic()
        assert manager.health_check() is False
        assert manager.get_client_preferences("c1") is None
        assert time.monotonic() - started < 5.0
    finally:
        manager.close()


# -- disabled mode ---------------------------------------------------------------------


def _crmcache_clients(client: redis.Redis) -> list[dict[str, object]]:
    return [c for c in client.client_list() if str(c.get("name", "")).startswith("crmcache")]


def test_disabled_manager_never_connects(redis_url: str, raw: redis.Redis) -> None:
    """enabled=False: every call is a miss/no-op and not one connection is opened."""
    raw.ping()  # our own connection exists before the baseline is taken
    before = int(raw.info("stats")["total_connections_received"])
    prefs = ClientPreferences(client_id="c1")

    manager = CRMCacheManager(redis_url=redis_url, enabled=False)
    assert manager._transport is None
    assert manager.enabled is False
    assert manager.get_client_preferences("c1") is None
    assert manager.set_client_preferences(prefs) is False
    assert manager.invalidate_client_preferences("c1") is False
    assert manager.get_template("welcome", "email") is None
    assert manager.set_template("welcome", "email", "hi") is False
    assert manager.invalidate_template("welcome", "email") is False
    assert manager.get_templates([("welcome", "email"), ("x", "sms")]) == {
        ("welcome", "email"): None,
        ("x", "sms"): None,
    }
    assert manager.set_templates({("welcome", "email"): "hi"}) is False

    opened = manager.check_rate_limit("api", 5)
    assert opened.degraded is True
    assert opened.allowed is True
    closed = manager.check_rate_limit("api", 5, policy="closed")
    assert closed.degraded is True
    assert closed.allowed is False

    stats = manager.get_cache_stats()
    assert stats["enabled"] is False
    assert stats["total_keys"] is None
    assert stats["redis"] is None
    assert manager.health_check() is False
    manager.close()

    assert manager._transport is None
    assert _crmcache_clients(raw) == []
    assert int(raw.info("stats")["total_connections_received"]) == before
    assert raw.dbsize() == 0

    # Positive control: an enabled manager does show up, so the checks above can fail.
    with CRMCacheManager(redis_url=redis_url) as enabled:
        assert enabled.get_client_preferences("c1") is None
        assert [c["name"] for c in _crmcache_clients(raw)] == ["crmcache"]
    assert int(raw.info("stats")["total_connections_received"]) > before


def test_disabled_closed_policy_refuses(redis_url: str) -> None:
    """A disabled manager built with rate_limit_policy='closed' refuses rate-limited calls."""
    with CRMCacheManager(redis_url=redis_url, enabled=False, rate_limit_policy="closed") as m:
        result = m.check_rate_limit("api", 5)
        assert result.degraded is True
        assert result.allowed is False
        assert result.remaining == 0


# -- get_cache_manager -----------------------------------------------------------------


def test_get_cache_manager_same_url_same_instance(redis_url: str) -> None:
    """Two calls with one URL return one manager."""
    first = get_cache_manager(redis_url=redis_url)
    assert get_cache_manager(redis_url) is first
    assert first.enabled is True


def test_get_cache_manager_kwargs_apply_on_creation_only(redis_url: str) -> None:
    """Keyword arguments configure the manager when it is created and are ignored later."""
    first = get_cache_manager(redis_url, cache_ttl=50)
    again = get_cache_manager(redis_url, cache_ttl=99)
    assert again is first
    assert first.settings.cache_ttl == 50


def test_get_cache_manager_uses_env_url(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    """get_cache_manager() with no URL uses REDIS_URL and shares the explicit URL's manager."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    assert get_cache_manager() is get_cache_manager(redis_url)


@pytest.mark.single_only
def test_get_cache_manager_different_urls_differ(redis_url: str, raw: redis.Redis) -> None:
    """Different URLs (db 0 vs db 1) get different managers that write to their own db."""
    url_db1 = with_db(redis_url, 1)
    raw_db1 = redis.Redis.from_url(url_db1)
    raw_db1.flushdb()
    try:
        db0 = get_cache_manager(redis_url)
        db1 = get_cache_manager(url_db1)
        assert db0 is not db1
        assert db1.settings.redis_url == url_db1
        assert db1.set_template("welcome", "email", "db1") is True
        assert raw_db1.get("crm:template:email:welcome") == b"db1"
        assert raw.get("crm:template:email:welcome") is None
        assert db0.get_template("welcome", "email") is None
    finally:
        raw_db1.flushdb()
        raw_db1.close()


def test_get_cache_manager_is_thread_safe(redis_url: str) -> None:
    """16 threads racing on the first call all get one and the same manager."""
    close_cache_managers()
    barrier = threading.Barrier(16)
    results: list[CRMCacheManager] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        try:
            barrier.wait(timeout=10)
            manager = get_cache_manager(redis_url)
        except BaseException as exc:
            with lock:
                errors.append(exc)
            return
        with lock:
            results.append(manager)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert len(results) == 16
    assert len({id(m) for m in results}) == 1
    assert get_cache_manager(redis_url) is results[0]


def test_get_cache_manager_replaces_a_closed_manager(redis_url: str) -> None:
    """After close(), get_cache_manager hands out a fresh, working manager."""
    first = get_cache_manager(redis_url)
    first.close()
    second = get_cache_manager(redis_url)
    assert second is not first
    assert first.enabled is False
    assert second.enabled is True
    assert second.health_check() is True


def test_close_cache_managers_closes_them_all(redis_url: str) -> None:
    """close_cache_managers() closes every registered manager and forgets it."""
    db0 = get_cache_manager(redis_url)
    db1 = get_cache_manager(with_db(redis_url, 1))
    assert db0.health_check() is True
    close_cache_managers()
    assert db0.enabled is False
    assert db1.enabled is False
    assert db0.health_check() is False
    assert db0.get_template("welcome", "email") is None
    fresh = get_cache_manager(redis_url)
    assert fresh is not db0
    assert fresh.enabled is True
    close_cache_managers()  # idempotent, also with nothing registered
    close_cache_managers()
    assert fresh.enabled is False


# -- context manager -------------------------------------------------------------------


def test_context_manager_closes(redis_url: str, raw: redis.Redis) -> None:
    """Leaving `with` closes the manager: disabled, reads None, writes False, data kept."""
    prefs = ClientPreferences(client_id="c1", version=1)
    with CRMCacheManager(redis_url=redis_url) as manager:
        assert manager.enabled is True
        assert manager.set_client_preferences(prefs) is True
        assert manager.get_client_preferences("c1") == prefs
    assert manager.enabled is False
    assert "closed" in repr(manager)
    assert manager.get_client_preferences("c1") is None
    assert manager.set_client_preferences(prefs) is False
    assert manager.set_template("welcome", "email", "x") is False
    assert manager.health_check() is False
    assert manager.check_rate_limit("api", 1).degraded is True
    assert raw.exists("crm:prefs:c1") == 1  # closing drops connections, not data
    manager.close()  # idempotent
    assert manager.enabled is False


def test_context_manager_closes_on_exception(redis_url: str) -> None:
    """An exception inside `with` propagates and the manager is still closed."""
    manager = CRMCacheManager(redis_url=redis_url)
    with pytest.raises(RuntimeError, match="boom"), manager:
        raise RuntimeError("boom")
    assert manager.enabled is False
    assert manager.get_template("welcome", "email") is None
