"""Message templates: keys without TTL, channels, invalidation and the batched fetch."""

from __future__ import annotations

import pytest
import redis

from crmcache import CRMCacheManager, MessageChannel


def test_set_get_invalidate(cache: CRMCacheManager) -> None:
    """The spec's template flow: miss, set, hit, invalidate, miss."""
    assert cache.get_template("welcome", "email") is None
    assert cache.set_template("welcome", "email", "<h1>Hello {{ name }}</h1>")
    assert cache.get_template("welcome", "email") == "<h1>Hello {{ name }}</h1>"
    assert cache.invalidate_template("welcome", "email")
    assert cache.get_template("welcome", "email") is None


def test_key_format_and_no_ttl(cache: CRMCacheManager, raw: redis.Redis) -> None:
    """Templates live at crm:template:<channel>:<name> and never expire."""
    cache.set_template("welcome", MessageChannel.WHATSAPP, "hi")
    assert raw.get("crm:template:whatsapp:welcome") == b"hi"
    assert raw.ttl("crm:template:whatsapp:welcome") == -1


def test_channel_as_enum_or_string_is_the_same_key(cache: CRMCacheManager) -> None:
    """MessageChannel.SMS and "sms" name the same template."""
    cache.set_template("otp", MessageChannel.SMS, "code {{c}}")
    assert cache.get_template("otp", "sms") == "code {{c}}"
    assert cache.get_template("otp", "email") is None


def test_unicode_and_empty_content(cache: CRMCacheManager) -> None:
    """Any str round-trips as UTF-8, including the empty template."""
    text = "Grüße, 你好, 👋 — {{ name }}"
    cache.set_template("hello", "email", text)
    cache.set_template("blank", "email", "")
    assert cache.get_template("hello", "email") == text
    assert cache.get_template("blank", "email") == ""


def test_batched_fetch_returns_every_requested_pair(cache: CRMCacheManager) -> None:
    """get_templates maps each (name, channel) to its text, or None for a miss."""
    cache.set_template("welcome", "email", "E")
    cache.set_template("welcome", "sms", "S")
    result = cache.get_templates(
        [("welcome", "email"), ("welcome", MessageChannel.SMS), ("missing", "whatsapp")]
    )
    assert result == {
        ("welcome", "email"): "E",
        ("welcome", MessageChannel.SMS): "S",
        ("missing", "whatsapp"): None,
    }
    assert result["welcome", MessageChannel.EMAIL] == "E"
    stats = cache.get_stats().by_kind
    assert (stats["templates"].hits, stats["templates"].misses) == (2, 1)


@pytest.mark.single_only  # a cluster sends one MGET per slot: tests/test_cluster.py
def test_batched_fetch_is_one_round_trip(cache: CRMCacheManager, raw: redis.Redis) -> None:
    """Fifty templates cost one MGET on the server, not fifty GETs."""
    pairs = [(f"t{i}", "email") for i in range(50)]
    cache.set_templates({pair: f"body {i}" for i, pair in enumerate(pairs)})
    raw.config_resetstat()
    result = cache.get_templates(pairs)
    assert all(result[pair] == f"body {i}" for i, pair in enumerate(pairs))
    commands = raw.info("commandstats")
    assert commands["cmdstat_mget"]["calls"] == 1
    assert "cmdstat_get" not in commands


def test_batched_fetch_of_nothing(cache: CRMCacheManager) -> None:
    """An empty batch is an empty dict, without a round trip."""
    assert cache.get_templates([]) == {}


def test_batched_fetch_deduplicates(cache: CRMCacheManager) -> None:
    """A pair asked twice appears once."""
    cache.set_template("a", "sms", "x")
    assert cache.get_templates([("a", "sms"), ("a", "sms")]) == {("a", "sms"): "x"}


def test_set_templates_writes_all_without_ttl(cache: CRMCacheManager, raw: redis.Redis) -> None:
    """The batched write stores every template, none with an expiry."""
    assert cache.set_templates({("a", "email"): "A", ("b", "sms"): "B"})
    assert raw.get("crm:template:email:a") == b"A"
    assert raw.ttl("crm:template:sms:b") == -1


def test_invalidate_touches_only_its_key(cache: CRMCacheManager, raw: redis.Redis) -> None:
    """Invalidating one template leaves the same name on other channels alone."""
    cache.set_templates({("w", "email"): "1", ("w", "sms"): "2"})
    cache.invalidate_template("w", "email")
    assert raw.exists("crm:template:email:w") == 0
    assert raw.get("crm:template:sms:w") == b"2"
