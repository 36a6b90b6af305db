"""Templates: 50 cached 5 KB templates fetched at once.

crmcache's batched ``get_templates`` (one ``MGET``) against a hand-written ``MGET`` + UTF-8
decode, and against 50 sequential ``get_template`` calls (50 round trips).
"""

from __future__ import annotations

import pytest
import redis
from pytest_benchmark.fixture import BenchmarkFixture

from crmcache import CRMCacheManager, MessageChannel
from crmcache._keys import template_key

COUNT = 50
TEMPLATE_BYTES = 5 * 1024
CHANNEL = MessageChannel.EMAIL

REFS: list[tuple[str, str]] = [(f"bench-template-{i:02d}", CHANNEL.value) for i in range(COUNT)]
KEYS = [template_key(CHANNEL, name) for name, _ in REFS]


def _template_text(i: int) -> str:
    line = f"Hello {{{{first_name}}}}, this is template {i:02d}: your order has shipped. "
    text = (line * (TEMPLATE_BYTES // len(line) + 1))[:TEMPLATE_BYTES]
    assert len(text.encode("utf-8")) == TEMPLATE_BYTES
    return text


TEXTS = {ref: _template_text(i) for i, ref in enumerate(REFS)}


@pytest.fixture
def cached_templates(cache: CRMCacheManager, raw: redis.Redis) -> dict[tuple[str, str], str]:
    """The 50 templates, cached by crmcache itself."""
    raw.delete(*KEYS)
    assert cache.set_templates(TEXTS)
    return TEXTS


@pytest.mark.benchmark(group="templates-50")
def test_templates_50_crmcache_get_templates(
    benchmark: BenchmarkFixture,
    cache: CRMCacheManager,
    cached_templates: dict[tuple[str, str], str],
) -> None:
    assert cache.get_templates(REFS) == cached_templates
    result = benchmark(cache.get_templates, REFS)
    assert result == cached_templates


@pytest.mark.benchmark(group="templates-50")
def test_templates_50_raw_mget_decode(
    benchmark: BenchmarkFixture,
    raw: redis.Redis,
    cached_templates: dict[tuple[str, str], str],
) -> None:
    def mget_and_decode() -> list[str | None]:
        values: list[bytes | None] = raw.mget(KEYS)  # type: ignore[assignment]
        return [None if v is None else v.decode("utf-8") for v in values]

    expected = [cached_templates[ref] for ref in REFS]
    assert mget_and_decode() == expected
    result = benchmark(mget_and_decode)
    assert result == expected


@pytest.mark.benchmark(group="templates-50")
def test_templates_50_crmcache_sequential_get_template(
    benchmark: BenchmarkFixture,
    cache: CRMCacheManager,
    cached_templates: dict[tuple[str, str], str],
) -> None:
    def one_by_one() -> dict[tuple[str, str], str | None]:
        return {ref: cache.get_template(*ref) for ref in REFS}

    assert one_by_one() == cached_templates
    result = benchmark(one_by_one)
    assert result == cached_templates
