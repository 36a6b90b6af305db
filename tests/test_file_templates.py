"""Templates read from files with the cache in front: reads, batches, warm-up, safety."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from crmcache import AsyncCRMCacheManager, CRMCacheManager, MessageChannel
from crmcache._sync.file_templates import FileTemplateSource as SyncSource
from crmcache._sync.manager import CRMCacheManager as SyncManager
from crmcache.templates import AsyncFileTemplateSource, FileTemplateSource, warm_templates

WELCOME = "<h1>Welcome, {{ name }}!</h1>"
OTP = "Your code is {{ code }}"
REMINDER = "Grüße 👋 — see you at {{ time }}"
TEMPLATE_KEYS = [
    b"crm:template:email:welcome",
    b"crm:template:sms:otp",
    b"crm:template:whatsapp:reminder",
]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A templates tree: three templates, a hidden file and an unknown extension."""
    base = tmp_path / "templates"
    for channel in MessageChannel:
        (base / channel.value).mkdir(parents=True)
    (base / "email" / "welcome.html").write_text(WELCOME, encoding="utf-8")
    (base / "sms" / "otp.txt").write_text(OTP, encoding="utf-8")
    (base / "whatsapp" / "reminder.txt").write_text(REMINDER, encoding="utf-8")
    (base / "email" / ".draft.html").write_text("hidden", encoding="utf-8")
    (base / "email" / "notes.docx").write_text("not a template", encoding="utf-8")
    return base


def template_keys(raw: redis.Redis) -> list[bytes]:
    """Every template key in Redis, sorted."""
    return sorted(raw.scan_iter(match="crm:template:*"))


def test_get_reads_the_file_once_then_serves_the_cache(
    root: Path, cache: CRMCacheManager, raw: redis.Redis
) -> None:
    """A miss reads the file and caches it without TTL; the next get does not read the file."""
    source = FileTemplateSource(root, cache)
    assert source.get("welcome", "email") == WELCOME
    assert source.file_reads == 1
    assert raw.get("crm:template:email:welcome") == WELCOME.encode()
    assert raw.ttl("crm:template:email:welcome") == -1

    (root / "email" / "welcome.html").write_text("changed on disk", encoding="utf-8")
    assert source.get("welcome", MessageChannel.EMAIL) == WELCOME
    assert source.file_reads == 1


def test_missing_template_is_none(root: Path, cache: CRMCacheManager, raw: redis.Redis) -> None:
    """A template with no file is None, and nothing is cached for it."""
    source = FileTemplateSource(root, cache)
    assert source.get("nope", "email") is None
    assert source.get("welcome", "sms") is None  # exists on another channel only
    assert source.file_reads == 0
    assert template_keys(raw) == []


def test_get_many_mixes_hits_files_and_missing_in_two_round_trips(
    root: Path, cache: CRMCacheManager, raw: redis.Redis
) -> None:
    """get_many: one MGET for all, files for the misses, one MSET for what was read."""
    source = FileTemplateSource(root, cache)
    assert source.get("welcome", "email") == WELCOME
    reads = source.file_reads
    raw.config_resetstat()

    result = source.get_many(
        [
            ("welcome", "email"),
            ("otp", MessageChannel.SMS),
            ("reminder", "whatsapp"),
            ("nope", "sms"),
        ]
    )
    assert result == {
        ("welcome", "email"): WELCOME,
        ("otp", MessageChannel.SMS): OTP,
        ("reminder", "whatsapp"): REMINDER,
        ("nope", "sms"): None,
    }
    commands = raw.info("commandstats")
    assert commands["cmdstat_mget"]["calls"] == 1
    assert commands["cmdstat_mset"]["calls"] == 1
    assert "cmdstat_get" not in commands
    assert "cmdstat_set" not in commands
    assert source.file_reads == reads + 2
    assert template_keys(raw) == TEMPLATE_KEYS

    # Now all cached: a second batch reads no file and writes nothing.
    raw.config_resetstat()
    again = source.get_many([("otp", "sms"), ("reminder", "whatsapp")])
    assert again == {("otp", "sms"): OTP, ("reminder", "whatsapp"): REMINDER}
    assert source.file_reads == reads + 2
    assert "cmdstat_mset" not in raw.info("commandstats")


def test_warm_loads_the_folder_in_one_mset(
    root: Path, cache: CRMCacheManager, raw: redis.Redis
) -> None:
    """warm() caches every template file in one MSET, skipping hidden and unknown files."""
    source = FileTemplateSource(root, cache)
    raw.config_resetstat()
    assert source.warm() == 3
    commands = raw.info("commandstats")
    assert commands["cmdstat_mset"]["calls"] == 1
    assert "cmdstat_set" not in commands
    assert template_keys(raw) == TEMPLATE_KEYS
    assert raw.get("crm:template:whatsapp:reminder") == REMINDER.encode()
    assert all(raw.ttl(key) == -1 for key in TEMPLATE_KEYS)

    reads = source.file_reads
    assert source.get("otp", "sms") == OTP
    assert source.file_reads == reads


def test_warm_templates_function(root: Path, cache: CRMCacheManager, raw: redis.Redis) -> None:
    """warm_templates(cache, directory) warms the folder and returns the count."""
    assert warm_templates(cache, str(root)) == 3
    assert template_keys(raw) == TEMPLATE_KEYS
    assert cache.get_template("welcome", "email") == WELCOME


def test_warm_of_an_empty_folder(tmp_path: Path, cache: CRMCacheManager, raw: redis.Redis) -> None:
    """A folder without channel subfolders warms nothing and writes nothing."""
    assert FileTemplateSource(tmp_path, cache).warm() == 0
    assert template_keys(raw) == []


@pytest.mark.parametrize("name", ["../secret", "a/b", ".hidden", "..", "a\\b"])
@pytest.mark.parametrize("cached", [True, False], ids=["cache", "no-cache"])
def test_path_traversal_names_are_refused(
    root: Path, cache: CRMCacheManager, raw: redis.Redis, name: str, *, cached: bool
) -> None:
    """Names that would leave the channel folder (or pick hidden files) raise ValueError."""
    (root / "secret.html").write_text("top secret", encoding="utf-8")
    (root / "email" / ".hidden.html").write_text("hidden", encoding="utf-8")
    source = FileTemplateSource(root, cache if cached else None)
    with pytest.raises(ValueError, match="name"):
        source.get(name, "email")
    with pytest.raises(ValueError, match="name"):
        source.get_many([(name, "email")])
    assert source.file_reads == 0
    assert template_keys(raw) == []


@pytest.mark.parametrize("kind", ["file", "missing"])
def test_root_must_be_a_folder(tmp_path: Path, kind: str) -> None:
    """A root that is a file, or does not exist, raises ValueError."""
    target = tmp_path / "templates"
    if kind == "file":
        target.write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match="folder"):
        FileTemplateSource(target)


def test_without_a_cache_files_are_read_every_time(root: Path) -> None:
    """With cache=None every get reads the file (and sees changes); warm() writes nothing."""
    source = FileTemplateSource(root)
    assert source.get("welcome", "email") == WELCOME
    (root / "email" / "welcome.html").write_text("v2", encoding="utf-8")
    assert source.get("welcome", "email") == "v2"
    assert source.file_reads == 2
    assert source.get_many([("otp", "sms"), ("nope", "email")]) == {
        ("otp", "sms"): OTP,
        ("nope", "email"): None,
    }
    assert source.file_reads == 3
    assert source.warm() == 0


@pytest.fixture
def small_cache(redis_url: str, raw: redis.Redis) -> Iterator[CRMCacheManager]:
    """A manager that caches templates of at most 64 bytes."""
    with CRMCacheManager(redis_url=redis_url, max_template_bytes=64) as manager:
        yield manager


def test_too_large_template_is_served_but_not_cached(
    root: Path, small_cache: CRMCacheManager, raw: redis.Redis, crm_logs: pytest.LogCaptureFixture
) -> None:
    """A file over max_template_bytes is served from the file, not cached, with a WARNING."""
    big = "x" * 200
    (root / "email" / "big.html").write_text(big, encoding="utf-8")
    source = FileTemplateSource(root, small_cache)

    assert source.get("big", "email") == big
    assert raw.exists("crm:template:email:big") == 0
    warnings = [r for r in crm_logs.records if r.levelno == logging.WARNING]
    assert any("big" in r.getMessage() and "not cached" in r.getMessage() for r in warnings)
    assert source.get("big", "email") == big
    assert source.file_reads == 2


def test_too_large_template_in_a_batch_leaves_the_rest_cached(
    root: Path, small_cache: CRMCacheManager, raw: redis.Redis, crm_logs: pytest.LogCaptureFixture
) -> None:
    """get_many with one oversized file serves all, caches the others, and warns."""
    big = "y" * 200
    (root / "email" / "big.html").write_text(big, encoding="utf-8")
    source = FileTemplateSource(root, small_cache)
    result = source.get_many([("big", "email"), ("otp", "sms")])
    assert result == {("big", "email"): big, ("otp", "sms"): OTP}
    assert raw.exists("crm:template:email:big") == 0
    assert raw.get("crm:template:sms:otp") == OTP.encode()
    assert any(r.levelno == logging.WARNING for r in crm_logs.records)


def test_warm_counts_only_templates_it_cached(
    root: Path, small_cache: CRMCacheManager, raw: redis.Redis
) -> None:
    """warm() with one oversized file returns how many it actually wrote (3, not 4)."""
    (root / "email" / "big.html").write_text("z" * 200, encoding="utf-8")
    written = FileTemplateSource(root, small_cache).warm()
    assert template_keys(raw) == TEMPLATE_KEYS
    assert written == 3


def test_warm_and_get_pick_the_same_file(
    root: Path, cache: CRMCacheManager, raw: redis.Redis
) -> None:
    """With promo.txt and promo.md, warm() caches the file get() would read."""
    (root / "sms" / "promo.txt").write_text("from txt", encoding="utf-8")
    (root / "sms" / "promo.md").write_text("from md", encoding="utf-8")
    from_file = FileTemplateSource(root).get("promo", "sms")
    assert from_file == "from txt"
    FileTemplateSource(root, cache).warm()
    assert cache.get_template("promo", "sms") == from_file


def test_each_source_refuses_the_other_facades_manager(redis_url: str, root: Path) -> None:
    """FileTemplateSource refuses an AsyncCRMCacheManager (its calls would return
    coroutines), and AsyncFileTemplateSource a CRMCacheManager, with a TypeError naming both."""
    sync_cache = SyncManager(redis_url=redis_url)
    async_cache = AsyncCRMCacheManager(redis_url=redis_url)
    try:
        with pytest.raises(
            TypeError,
            match=r"FileTemplateSource works with CRMCacheManager .*, not AsyncCRM",
        ):
            SyncSource(root, async_cache)  # type: ignore[arg-type]
        with pytest.raises(
            TypeError,
            match=r"AsyncFileTemplateSource works with AsyncCRMCacheManager .*, not CRMCache",
        ):
            AsyncFileTemplateSource(root, sync_cache)  # type: ignore[arg-type]
    finally:
        sync_cache.close()
        asyncio.run(async_cache.aclose())


def test_async_source_reads_caches_and_warms(redis_url: str, root: Path, raw: redis.Redis) -> None:
    """AsyncFileTemplateSource serves files through an AsyncCRMCacheManager: a miss reads the
    file and caches it, the next read is a cache hit, warm() caches the whole tree."""

    async def main() -> None:
        async with AsyncCRMCacheManager(redis_url=redis_url) as cache:
            source = AsyncFileTemplateSource(root, cache)
            assert await source.get("welcome", "email") == WELCOME
            assert await source.get("welcome", "email") == WELCOME
            assert source.file_reads == 1
            assert raw.get("crm:template:email:welcome") == WELCOME.encode()
            found = await source.get_many([("otp", "sms"), ("nope", "sms")])
            assert found == {("otp", "sms"): OTP, ("nope", "sms"): None}
            assert await source.warm() == 3

    asyncio.run(main())
    assert template_keys(raw) == TEMPLATE_KEYS
