"""Rate-limit failure policies (per call, per API, local fallback) and replay of
invalidations that could not reach Redis."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pytest
import redis

import helpers
from crmcache import ClientPreferences, ConfigurationError, CRMCacheManager
from crmcache._pending import PendingInvalidations
from crmcache.testing import RedisServer, free_loopback_port

#: Polls in this module wait up to 15 s, checking every 20 ms.
poll = partial(helpers.poll, timeout=15.0, interval=0.02)


@pytest.fixture
def down_url() -> str:
    """A URL where nothing listens."""
    return f"redis://127.0.0.1:{free_loopback_port()}/0"


def test_per_api_policy(down_url: str) -> None:
    """rate_limit_policies picks the policy per API; a per-call policy wins over both."""
    with CRMCacheManager(
        redis_url=down_url,
        socket_connect_timeout=0.3,
        rate_limit_policies={"whatsapp": "closed"},
    ) as cache:
        assert cache.check_rate_limit("whatsapp", 10).allowed is False
        assert cache.check_rate_limit("sms", 10).allowed is True
        assert cache.check_rate_limit("whatsapp", 10, policy="open").allowed is True


def test_local_policy_enforces_its_share(down_url: str) -> None:
    """With Redis away, "local" allows ceil(limit * share) per window in this process."""
    with CRMCacheManager(
        redis_url=down_url,
        socket_connect_timeout=0.3,
        rate_limit_policy="local",
        rate_limit_local_share=0.5,
    ) as cache:
        results = [cache.check_rate_limit("api", 10, 60) for _ in range(8)]
    assert [r.allowed for r in results] == [True] * 5 + [False] * 3
    assert all(r.degraded for r in results)
    assert (results[-1].limit, results[-1].remaining, results[-1].current_count) == (5, 0, 5)
    assert 0 < results[-1].retry_after <= 60


def test_local_policy_window_resets(down_url: str) -> None:
    """The local window ends after ``window`` seconds (polled with a deadline)."""
    with CRMCacheManager(
        redis_url=down_url, socket_connect_timeout=0.3, rate_limit_policy="local"
    ) as cache:
        assert cache.check_rate_limit("api", 1, 1).allowed
        assert not cache.check_rate_limit("api", 1, 1).allowed
        poll(lambda: cache.check_rate_limit("api", 1, 1).allowed, timeout=5)


def test_local_policy_is_exact_under_threads(down_url: str) -> None:
    """8 threads x 50 calls against a local limit of 100 allow exactly 100."""
    with (
        CRMCacheManager(
            redis_url=down_url, socket_connect_timeout=0.3, rate_limit_policy="local"
        ) as cache,
        ThreadPoolExecutor(8) as pool,
    ):
        allowed = sum(
            pool.map(
                lambda _: sum(cache.check_rate_limit("api", 100, 60).allowed for _ in range(50)),
                range(8),
            )
        )
    assert allowed == 100


def test_local_policy_not_used_while_redis_answers(cache: CRMCacheManager) -> None:
    """With Redis up, the shared counter decides, not the local share."""
    with CRMCacheManager(
        redis_url=cache.settings.redis_url, rate_limit_policy="local", rate_limit_local_share=0.1
    ) as local:
        results = [local.check_rate_limit("api", 10, 60) for _ in range(10)]
    assert all(r.allowed and not r.degraded for r in results)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"rate_limit_local_share": 0}, "rate_limit_local_share"),
        ({"rate_limit_local_share": 1.5}, "rate_limit_local_share"),
        ({"rate_limit_policies": {"x": "maybe"}}, "rate_limit_policies"),
        ({"rate_limit_policy": "sometimes"}, "rate_limit_policy"),
    ],
)
def test_policy_settings_are_validated(
    redis_url: str, kwargs: dict[str, object], name: str
) -> None:
    """Bad policy settings raise ConfigurationError naming the setting."""
    with pytest.raises(ConfigurationError, match=name):
        CRMCacheManager(redis_url=redis_url, **kwargs)  # type: ignore[arg-type]


def test_policy_setting_types(redis_url: str) -> None:
    """Wrong types for the policy settings raise TypeError."""
    with pytest.raises(TypeError, match="rate_limit_policies"):
        CRMCacheManager(redis_url=redis_url, rate_limit_policies=["open"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="rate_limit_local_share"):
        CRMCacheManager(redis_url=redis_url, rate_limit_local_share="half")  # type: ignore[arg-type]


@pytest.fixture
def hung(own_server: RedisServer) -> Iterator[tuple[RedisServer, CRMCacheManager, redis.Redis]]:
    """A manager with short timeouts and a raw client on a server the test may hang."""
    raw = redis.Redis.from_url(own_server.url)
    with CRMCacheManager(
        redis_url=own_server.url, socket_timeout=0.3, socket_connect_timeout=0.3
    ) as cache:
        yield own_server, cache, raw
    raw.close()


def test_failed_invalidations_are_replayed_when_redis_returns(
    hung: tuple[RedisServer, CRMCacheManager, redis.Redis],
    crm_logs: pytest.LogCaptureFixture,
) -> None:
    """Invalidations sent while Redis hangs are delivered once it answers again."""
    server, cache, raw = hung
    cache.set_client_preferences(ClientPreferences(client_id="c1", version=5))
    cache.set_template("welcome", "email", "old text")
    server.pause_process()
    try:
        assert cache.invalidate_client_preferences("c1", version=6) is False
        assert cache.invalidate_template("welcome", "email") is False
        assert cache.get_stats().pending_invalidations == 2
    finally:
        server.resume_process()
    poll(lambda: raw.get("crm:prefs:c1") == b"T6" and not raw.exists("crm:template:email:welcome"))
    poll(lambda: cache.get_stats().pending_invalidations == 0)
    assert cache.get_stats().counters["invalidations_replayed"] == 2
    # The stale row a slow reader might still hold is refused.
    assert cache.set_client_preferences(ClientPreferences(client_id="c1", version=5)) is False
    # One INFO line for the run, with the count and duration; none per key.
    # One INFO line per replay run, with the count and duration; none per key (the
    # resume may split the two over two runs).
    info = [r.getMessage() for r in crm_logs.records if r.levelno == logging.INFO]
    runs = [
        re.fullmatch(r"replayed (\d+) invalidation\(s\) in [\d.]+s \(\d+ still pending\)", m)
        for m in info
    ]
    assert sum(int(run[1]) for run in runs if run is not None) == 2
    assert not any("replayed invalidation of" in m for m in info)


def test_a_later_successful_invalidation_supersedes_the_pending_one(
    hung: tuple[RedisServer, CRMCacheManager, redis.Redis],
) -> None:
    """Once an invalidation of the key gets through, the pending one is dropped."""
    server, cache, raw = hung
    server.pause_process()
    try:
        cache.invalidate_client_preferences("c2", version=3)
    finally:
        server.resume_process()
    poll(lambda: cache.invalidate_client_preferences("c2", version=4))
    assert cache.get_stats().pending_invalidations == 0
    assert raw.get("crm:prefs:c2") == b"T4"


def test_overflow_shortens_every_cached_preference(
    hung: tuple[RedisServer, CRMCacheManager, redis.Redis],
) -> None:
    """Past the pending bound, the replay caps every cached preference at the tombstone TTL."""
    server, cache, raw = hung
    cache._replayer.pending = PendingInvalidations(max_entries=1)
    for i in range(3):
        cache.set_client_preferences(ClientPreferences(client_id=f"c{i}", version=1))
    server.pause_process()
    try:
        for i in range(3):
            assert cache.invalidate_client_preferences(f"c{i}", version=2) is False
    finally:
        server.resume_process()
    poll(lambda: not cache._replayer.pending)
    assert raw.get("crm:prefs:c0") == b"T2"
    for i in (1, 2):
        assert 0 < raw.pttl(f"crm:prefs:c{i}") <= 30_000


def test_close_reports_undeliverable_invalidations(
    down_url: str, crm_logs: pytest.LogCaptureFixture
) -> None:
    """Closing with invalidations Redis never got says so at ERROR."""
    cache = CRMCacheManager(redis_url=down_url, socket_connect_timeout=0.3)
    assert cache.invalidate_client_preferences("c", version=1) is False
    cache.close()
    errors = [r.getMessage() for r in crm_logs.records if r.levelno == logging.ERROR]
    assert any("never received" in m for m in errors)


def test_replay_thread_stops_on_close(down_url: str) -> None:
    """close() stops the replay thread even while Redis stays away."""
    cache = CRMCacheManager(redis_url=down_url, socket_connect_timeout=0.3)
    cache.invalidate_template("t", "email")
    replayer = cache._replayer.task
    assert replayer is not None
    cache.close()
    replayer.join(timeout=5)
    assert not replayer.is_alive()
