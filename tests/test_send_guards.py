"""Send guards: ``claim_send`` / ``try_claim_send`` / ``release_send`` (issue 14, item 4).

One atomic ``SET <prefix>:send:<key> <token> NX PX <ttl>`` per claim; the first claim wins,
every retry is refused; a release deletes only this manager's claim; without Redis the
answer follows ``send_guard_policy`` and is counted and logged.
"""

from __future__ import annotations

import asyncio
import logging
import re
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

import crmcache
from crmcache import ConfigurationError, CRMCacheManager
from crmcache.cache_manager import SendClaim
from crmcache.testing import free_loopback_port
from helpers import poll, run_processes


def counters(cache: CRMCacheManager) -> dict[str, int]:
    """The send-claim counters of ``get_cache_stats()``."""
    every = cache.get_cache_stats()["counters"]
    return {name: n for name, n in every.items() if name.startswith("send_claims_")}


def test_first_claim_wins_and_retries_are_refused(
    cache: CRMCacheManager, raw: redis.Redis
) -> None:
    """The first claim of a key is True, every later one False; the key is
    crm:send:<key>, holds the manager's token and expires at the ttl."""
    assert cache.claim_send("msg-1") is True
    assert [cache.claim_send("msg-1") for _ in range(3)] == [False, False, False]
    assert cache.claim_send("msg-2") is True  # another message is another claim
    assert re.fullmatch(rb"[0-9a-f]{32}", raw.get("crm:send:msg-1") or b"")
    assert 86_390_000 < raw.pttl("crm:send:msg-1") <= 86_400_000
    assert counters(cache) == {
        "send_claims_won": 2,
        "send_claims_refused": 3,
        "send_claims_degraded": 0,
        "send_claims_released": 0,
    }


def test_ttl_is_the_claims_life(cache: CRMCacheManager, raw: redis.Redis) -> None:
    """ttl sets the claim's expiry; once it lapses the message may be claimed again."""
    assert cache.claim_send("otp:client-9", ttl=300) is True
    assert 299_000 < raw.pttl("crm:send:otp:client-9") <= 300_000
    raw.pexpire("crm:send:otp:client-9", 1)
    poll(lambda: cache.claim_send("otp:client-9", ttl=300), what="the claim to lapse")
    assert cache.claim_send("otp:client-9", ttl=300) is False


def test_try_claim_send_tells_every_outcome(cache: CRMCacheManager) -> None:
    """try_claim_send says CLAIMED, then DUPLICATE, as a SendClaim."""
    assert cache.try_claim_send("m") is SendClaim.CLAIMED
    assert cache.try_claim_send("m") is SendClaim.DUPLICATE
    assert cache.claim_send("m") is False  # the same claim, seen by both methods


def test_release_lets_a_retry_claim_again(cache: CRMCacheManager, raw: redis.Redis) -> None:
    """A send that failed gives its claim back: the retry wins it."""
    assert cache.claim_send("m") is True
    assert cache.release_send("m") is True
    assert not raw.exists("crm:send:m")
    assert cache.claim_send("m") is True
    assert cache.release_send("gone") is False  # nothing to release
    assert counters(cache)["send_claims_released"] == 1


def test_release_deletes_only_this_managers_claim(
    cache: CRMCacheManager, redis_url: str, raw: redis.Redis
) -> None:
    """Another manager (another process) cannot release a claim it did not make, and a
    claim that lapsed and was taken by someone else survives the first owner's release."""
    with CRMCacheManager(redis_url=redis_url) as other:
        assert cache.claim_send("m") is True
        assert other.release_send("m") is False
        assert other.claim_send("m") is False  # still claimed
        # The claim lapses; the other manager claims the message; the first owner's
        # late release must not delete the new claim.
        raw.delete("crm:send:m")
        assert other.claim_send("m") is True
        assert cache.release_send("m") is False
        assert raw.exists("crm:send:m")
        assert cache.claim_send("m") is False
        assert other.release_send("m") is True


def test_key_prefix_applies(redis_url: str, raw: redis.Redis) -> None:
    """Claims live under <key_prefix>:send:, so prefixes do not see each other's."""
    with (
        CRMCacheManager(redis_url=redis_url, key_prefix="tenant-a") as a,
        CRMCacheManager(redis_url=redis_url, key_prefix="tenant-b") as b,
    ):
        assert a.claim_send("m") is True
        assert b.claim_send("m") is True
        assert raw.exists("tenant-a:send:m", "tenant-b:send:m") == 2


def test_braces_and_globs_are_plain_characters(cache: CRMCacheManager, raw: redis.Redis) -> None:
    """An idempotency key may hold braces and glob characters; it names only itself."""
    assert cache.claim_send("{campaign-7}:*:[x]") is True
    assert cache.claim_send("{campaign-7}:a:[x]") is True
    assert raw.exists("crm:send:{campaign-7}:*:[x]")
    assert cache.release_send("{campaign-7}:*:[x]") is True
    assert raw.exists("crm:send:{campaign-7}:a:[x]")


@pytest.mark.parametrize(
    ("kwargs", "error", "named"),
    [
        ({"idempotency_key": ""}, ValueError, "idempotency_key"),
        ({"idempotency_key": "   "}, ValueError, "idempotency_key"),
        ({"idempotency_key": "a\nb"}, ValueError, "idempotency_key"),
        ({"idempotency_key": "x" * 257}, ValueError, "idempotency_key"),
        ({"idempotency_key": b"m"}, TypeError, "idempotency_key"),
        ({"idempotency_key": None}, TypeError, "idempotency_key"),
        ({"idempotency_key": "m", "ttl": 0}, ValueError, "ttl"),
        ({"idempotency_key": "m", "ttl": -5}, ValueError, "ttl"),
        ({"idempotency_key": "m", "ttl": 10 * 365 * 86400 + 1}, ValueError, "ttl"),
        ({"idempotency_key": "m", "ttl": 1.5}, TypeError, "ttl"),
        ({"idempotency_key": "m", "ttl": True}, TypeError, "ttl"),
        ({"idempotency_key": "m", "ttl": "60"}, TypeError, "ttl"),
        ({"idempotency_key": "m", "policy": "local"}, ValueError, "policy"),
        ({"idempotency_key": "m", "policy": 1}, TypeError, "policy"),
    ],
)
def test_bad_arguments_are_refused_by_name(
    cache: CRMCacheManager, raw: redis.Redis, kwargs: dict[str, object], error: type, named: str
) -> None:
    """Bad input raises ValueError/TypeError naming the argument, and claims nothing."""
    with pytest.raises(error, match=f"^{named}"):
        cache.claim_send(**kwargs)  # type: ignore[arg-type]
    if "policy" not in kwargs:
        with pytest.raises(error, match=f"^{named}"):
            cache.try_claim_send(**kwargs)  # type: ignore[arg-type]
    if set(kwargs) == {"idempotency_key"}:
        with pytest.raises(error, match=f"^{named}"):
            cache.release_send(**kwargs)  # type: ignore[arg-type]
    assert raw.exists("crm:send:m") == 0


def test_send_guard_policy_setting_is_checked(redis_url: str) -> None:
    """send_guard_policy is 'open' or 'closed'; anything else is refused by name."""
    with pytest.raises(ConfigurationError, match="send_guard_policy"):
        CRMCacheManager(redis_url=redis_url, send_guard_policy="local")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="send_guard_policy"):
        CRMCacheManager(redis_url=redis_url, send_guard_policy=None)  # type: ignore[arg-type]
    with CRMCacheManager(redis_url=redis_url, send_guard_policy="closed") as cache:
        assert cache.settings.send_guard_policy == "closed"
        assert "send_guard_policy='closed'" in repr(cache.settings)


def test_exactly_one_winner_under_threads(cache: CRMCacheManager) -> None:
    """8 threads claiming the same 100 messages: each message is won exactly once."""
    barrier = threading.Barrier(8)

    def worker(_: int) -> list[str]:
        barrier.wait(timeout=10)
        return [f"m{i}" for i in range(100) if cache.claim_send(f"m{i}")]

    with ThreadPoolExecutor(max_workers=8) as pool:
        won = [key for keys in pool.map(worker, range(8)) for key in keys]
    assert sorted(won) == sorted(f"m{i}" for i in range(100))
    assert counters(cache)["send_claims_won"] == 100
    assert counters(cache)["send_claims_refused"] == 700


def test_exactly_one_winner_among_pipelined_tasks(redis_url: str, raw: redis.Redis) -> None:
    """The async facade's auto-pipelined transport: 200 tasks on one manager claiming
    20 messages 10 times each, all in flight together: each message won once."""

    async def main() -> list[bool]:
        async with crmcache.AsyncCRMCacheManager(redis_url=redis_url, pipelining=True) as cache:
            return await asyncio.gather(*(cache.claim_send(f"m{i % 20}") for i in range(200)))

    outcomes = asyncio.run(main())
    won = [i % 20 for i, ok in enumerate(outcomes) if ok]
    assert sorted(won) == list(range(20))
    assert all(raw.exists(f"crm:send:m{i}") for i in range(20))


WORKER = textwrap.dedent(
    """
    import sys, time
    from crmcache import CRMCacheManager

    url = sys.argv[1]
    with CRMCacheManager(redis_url=url) as cache:
        deadline = time.monotonic() + 30
        while cache.get_template("go", "sms") is None:
            if time.monotonic() > deadline:
                sys.exit("never told to go")
            time.sleep(0.005)
        print(" ".join(str(i) for i in range(300) if cache.claim_send(f"msg-{i}")))
    """
)


@pytest.mark.slow
def test_exactly_one_winner_across_processes(redis_url: str, raw: redis.Redis) -> None:
    """4 processes claiming the same 300 messages: each message is won by one process."""
    outputs = run_processes(WORKER, redis_url, go=lambda: raw.set("crm:template:sms:go", "1"))
    won = [int(i) for out in outputs for i in out.split()]
    assert sorted(won) == list(range(300))


# -- without Redis --------------------------------------------------------------------------


def _degraded_warnings(logs: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in logs.records
        if r.levelno == logging.WARNING and r.getMessage().startswith("claim_send without Redis")
    ]


def test_redis_away_default_policy_sends(crm_logs: pytest.LogCaptureFixture) -> None:
    """No Redis: claim_send answers True by the default policy 'open' (never block a
    send), counted as degraded and logged once however many calls; try_claim_send says
    UNAVAILABLE; release_send answers False."""
    url = f"redis://127.0.0.1:{free_loopback_port()}/0"
    with CRMCacheManager(redis_url=url, socket_connect_timeout=0.5) as cache:
        assert [cache.claim_send("m") for _ in range(20)] == [True] * 20
        assert cache.try_claim_send("m") is SendClaim.UNAVAILABLE
        assert cache.release_send("m") is False
        assert counters(cache) == {
            "send_claims_won": 0,
            "send_claims_refused": 0,
            "send_claims_degraded": 21,
            "send_claims_released": 0,
        }
    warnings = _degraded_warnings(crm_logs)
    assert len(warnings) == 1, warnings
    assert "Redis could not be asked" in warnings[0]
    assert "'open'" in warnings[0]


def test_redis_away_closed_policy_refuses(crm_logs: pytest.LogCaptureFixture) -> None:
    """send_guard_policy='closed' (never send a duplicate) answers False without Redis;
    policy= overrides it per call."""
    url = f"redis://127.0.0.1:{free_loopback_port()}/0"
    with CRMCacheManager(
        redis_url=url, socket_connect_timeout=0.5, send_guard_policy="closed"
    ) as cache:
        assert cache.claim_send("m") is False
        assert cache.claim_send("m", policy="open") is True
        assert cache.claim_send("m", policy="closed") is False
        assert counters(cache)["send_claims_degraded"] == 3
    warnings = _degraded_warnings(crm_logs)
    assert len(warnings) == 1, warnings
    assert "'closed'" in warnings[0]


def test_disabled_or_closed_cache_answers_by_policy(
    redis_url: str, raw: redis.Redis, crm_logs: pytest.LogCaptureFixture
) -> None:
    """A disabled manager, and a closed one, claim nothing: the policy answers,
    counted and logged (the cache is off)."""
    with CRMCacheManager(redis_url=redis_url, enabled=False) as off:
        assert off.claim_send("m") is True
        assert off.try_claim_send("m") is SendClaim.UNAVAILABLE
        assert off.release_send("m") is False
        assert counters(off)["send_claims_degraded"] == 2
    assert "the cache is off" in _degraded_warnings(crm_logs)[0]
    closed = CRMCacheManager(redis_url=redis_url, send_guard_policy="closed")
    closed.close()
    assert closed.claim_send("m") is False
    assert not raw.exists("crm:send:m")


def test_claims_survive_only_with_redis(
    cache: CRMCacheManager, raw: redis.Redis, redis_url: str
) -> None:
    """What a flush (a restart without persistence) does: every claim is gone, and a
    retry of a message already sent is claimed again (the documented limit)."""
    assert cache.claim_send("m") is True
    if isinstance(raw, redis.RedisCluster):
        raw.flushdb(target_nodes=redis.RedisCluster.PRIMARIES)
    else:
        raw.flushdb()
    assert cache.claim_send("m") is True
