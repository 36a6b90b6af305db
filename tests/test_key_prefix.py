"""key_prefix: managers with different prefixes share one Redis without sharing keys."""

from __future__ import annotations

import pytest
import redis

from crmcache import ClientPreferences, ConfigurationError, CRMCacheManager
from crmcache.cache_manager import LeaseState, get_cache_manager
from crmcache.testing import RedisServer
from helpers import poll


def keys_of(raw: redis.Redis) -> set[str]:
    return {key.decode() for key in raw.scan_iter(count=1000)}


def test_default_prefix_is_crm(cache: CRMCacheManager, raw: redis.Redis) -> None:
    """Without key_prefix or CACHE_KEY_PREFIX every key is the spec's crm:..."""
    assert cache.settings.key_prefix == "crm"
    cache.set_client_preferences(ClientPreferences(client_id="c", version=1))
    cache.set_template("t", "sms", "x")
    cache.check_rate_limit("api", 5, 60)
    lease = cache.acquire_load_lease("c")
    assert lease.state is LeaseState.ACQUIRED
    assert keys_of(raw) == {
        "crm:prefs:c",
        "crm:template:sms:t",
        "crm:ratelimit:api:60",
        "crm:lease:prefs:c",
    }
    lease.release()


def test_two_prefixes_on_one_redis_do_not_share_keys(redis_url: str, raw: redis.Redis) -> None:
    """Preferences, templates, rate-limit counters and leases of one prefix are invisible
    to a manager with another prefix, and every key carries its manager's prefix."""
    with (
        CRMCacheManager(redis_url=redis_url, key_prefix="tenant-a") as a,
        CRMCacheManager(redis_url=redis_url, key_prefix="tenant-b") as b,
    ):
        prefs = ClientPreferences(client_id="c1", version=1)
        assert a.set_client_preferences(prefs) is True
        assert a.set_template("welcome", "email", "hello a") is True
        assert a.check_rate_limit("whatsapp", 1, 60).allowed is True
        lease = a.acquire_load_lease("c1")
        assert lease.state is LeaseState.ACQUIRED

        assert b.get_client_preferences("c1") is None
        assert b.get_template("welcome", "email") is None
        assert b.get_templates([("welcome", "email")]) == {("welcome", "email"): None}
        assert b.check_rate_limit("whatsapp", 1, 60).allowed is True  # its own counter
        other_lease = b.acquire_load_lease("c1")
        assert other_lease.state is LeaseState.ACQUIRED
        # A stale write refused under a's tombstone is accepted under b's prefix.
        assert a.invalidate_client_preferences("c1", version=5) is True
        assert b.set_client_preferences(ClientPreferences(client_id="c1", version=2)) is True
        assert a.get_client_preferences("c1") is None
        assert b.get_client_preferences("c1").version == 2  # type: ignore[union-attr]

        assert a.check_rate_limit("whatsapp", 1, 60).allowed is False
        assert a.get_template("welcome", "email") == "hello a"
        assert keys_of(raw) == {
            "tenant-a:prefs:c1",
            "tenant-a:template:email:welcome",
            "tenant-a:ratelimit:whatsapp:60",
            "tenant-a:lease:prefs:c1",
            "tenant-b:prefs:c1",
            "tenant-b:ratelimit:whatsapp:60",
            "tenant-b:lease:prefs:c1",
        }
        assert a.invalidate_template("welcome", "email") is True
        lease.release()
        other_lease.release()
        assert "tenant-a:template:email:welcome" not in keys_of(raw)
        assert "tenant-a:lease:prefs:c1" not in keys_of(raw)
        assert "tenant-b:lease:prefs:c1" not in keys_of(raw)


def test_total_keys_counts_only_its_own_prefix(redis_url: str, raw: redis.Redis) -> None:
    """get_cache_stats' SCAN follows the prefix: a tenant counts its keys, not the
    default prefix's nor another tenant's (nor a prefix that merely starts alike)."""
    with raw.pipeline(transaction=False) as pipe:
        for i in range(1200):
            pipe.set(f"crm:template:email:t{i}", "x")
        for i in range(30):
            pipe.set(f"tenant-a:template:sms:t{i}", "x")
        for i in range(7):
            pipe.set(f"tenant-ab:template:sms:t{i}", "x")
        pipe.execute()
    with (
        CRMCacheManager(redis_url=redis_url, key_prefix="tenant-a") as a,
        CRMCacheManager(redis_url=redis_url, key_prefix="tenant-ab") as ab,
        CRMCacheManager(redis_url=redis_url) as default,
    ):
        assert a.get_cache_stats()["total_keys"] == 30
        assert ab.get_cache_stats()["total_keys"] == 7
        assert default.get_cache_stats()["total_keys"] == 1200


@pytest.mark.parametrize("protocol", [2, 3])
def test_near_cache_tracks_the_custom_prefix(own_server: RedisServer, protocol: int) -> None:
    """The near cache's tracking prefixes follow key_prefix: another client's writes under
    the prefix still invalidate what this process holds."""
    url = own_server.url
    with (
        CRMCacheManager(
            redis_url=url, key_prefix="stage", near_cache=True, near_cache_protocol=protocol
        ) as cache,
        CRMCacheManager(redis_url=url, key_prefix="stage") as other,
    ):
        cache.get_template("warm-up", "email")  # starts the listener
        poll(lambda: cache.get_cache_stats()["near_cache"]["live"])
        other.set_client_preferences(ClientPreferences(client_id="c1", version=1))
        other.set_template("t", "sms", "old")
        assert cache.get_client_preferences("c1").version == 1  # type: ignore[union-attr]
        assert cache.get_template("t", "sms") == "old"
        # Held in process now: a second read is a near-cache hit.
        hits = cache.get_cache_stats()["near_cache"]["hits"]
        poll(
            lambda: (
                cache.get_template("t", "sms") == "old"
                and cache.get_cache_stats()["near_cache"]["hits"] > hits
            )
        )
        other.set_client_preferences(ClientPreferences(client_id="c1", version=2))
        other.set_template("t", "sms", "new")
        poll(lambda: cache.get_client_preferences("c1").version == 2)  # type: ignore[union-attr]
        poll(lambda: cache.get_template("t", "sms") == "new")
        other.invalidate_template("t", "sms")
        poll(lambda: cache.get_template("t", "sms") is None)


def test_environment_and_argument_precedence(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, raw: redis.Redis
) -> None:
    """key_prefix wins over CACHE_KEY_PREFIX, which wins over the default crm."""
    monkeypatch.setenv("CACHE_KEY_PREFIX", "from-env")
    with CRMCacheManager(redis_url=redis_url) as env:
        assert env.settings.key_prefix == "from-env"
        env.set_template("t", "email", "x")
    with CRMCacheManager(redis_url=redis_url, key_prefix="from-arg") as arg:
        assert arg.settings.key_prefix == "from-arg"
        arg.set_template("t", "email", "y")
    assert keys_of(raw) == {"from-env:template:email:t", "from-arg:template:email:t"}
    monkeypatch.setenv("CACHE_KEY_PREFIX", "  ")  # blank: not set
    with CRMCacheManager(redis_url=redis_url) as default:
        assert default.settings.key_prefix == "crm"
    monkeypatch.setenv("CACHE_KEY_PREFIX", "bad prefix")
    with pytest.raises(ConfigurationError) as info:
        CRMCacheManager(redis_url=redis_url)
    assert "CACHE_KEY_PREFIX" in str(info.value)
    assert "key_prefix" in str(info.value)
    # An explicit argument makes a malformed variable irrelevant.
    with CRMCacheManager(redis_url=redis_url, key_prefix="ok") as explicit:
        assert explicit.settings.key_prefix == "ok"


@pytest.mark.parametrize(
    "prefix",
    [
        "",
        "a b",
        " crm",
        "crm\t",
        "crm\n",
        "crm\x00",
        "c*",
        "c?",
        "c[1]",
        "c\\x",
        "{crm}",
        "c{",
        "x" * 65,
    ],
)
def test_bad_prefixes_are_refused(redis_url: str, prefix: str) -> None:
    """A prefix that is empty, too long, or holds whitespace, a control character, a glob
    character or a brace raises ConfigurationError naming key_prefix."""
    with pytest.raises(ConfigurationError, match=r"^key_prefix "):
        CRMCacheManager(redis_url=redis_url, key_prefix=prefix)
    with pytest.raises(ConfigurationError, match=r"^key_prefix "):
        get_cache_manager(redis_url, key_prefix=prefix)


def test_a_prefix_must_be_a_str(redis_url: str) -> None:
    with pytest.raises(TypeError, match=r"^key_prefix must be a str, not bytes"):
        CRMCacheManager(redis_url=redis_url, key_prefix=b"crm")  # type: ignore[arg-type]


@pytest.mark.parametrize("prefix", ["x" * 64, "prod", "tenant:42", "app.v2-eu_1", "Ω"])
def test_good_prefixes_are_accepted(redis_url: str, raw: redis.Redis, prefix: str) -> None:
    with CRMCacheManager(redis_url=redis_url, key_prefix=prefix) as cache:
        assert cache.set_template("t", "email", "x") is True
        assert cache.get_template("t", "email") == "x"
        assert cache.get_cache_stats()["total_keys"] == 1
    assert keys_of(raw) == {f"{prefix}:template:email:t"}


def test_registry_keys_managers_by_url_and_prefix(
    monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """get_cache_manager gives one manager per (URL, prefix); the prefix may come from
    CACHE_KEY_PREFIX."""
    default = get_cache_manager(redis_url)
    a = get_cache_manager(redis_url, key_prefix="a")
    b = get_cache_manager(redis_url, key_prefix="b")
    assert len({id(default), id(a), id(b)}) == 3
    assert get_cache_manager(redis_url, key_prefix="a") is a
    assert get_cache_manager(redis_url, key_prefix="crm") is default
    assert (default.settings.key_prefix, a.settings.key_prefix) == ("crm", "a")
    monkeypatch.setenv("CACHE_KEY_PREFIX", "b")
    assert get_cache_manager(redis_url) is b
    assert get_cache_manager(redis_url, key_prefix="crm") is default
