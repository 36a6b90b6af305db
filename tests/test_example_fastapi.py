"""examples/fastapi_app.py against a real server, through httpx's ASGI transport: a
workload on the send path, then a scrape of its /metrics whose hits and misses equal the
manager's get_cache_stats() exactly."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import redis

from metrics_helpers import labels, parse_exposition

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fastapi_app.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fastapi_app", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fastapi_example_serves_metrics_equal_to_get_cache_stats(
    redis_url: str, raw: redis.Redis
) -> None:
    example = load_example()
    app = example.create_app(redis_url, send_limit=3)

    async def scenario() -> tuple[list[int], dict[str, Any], httpx.Response, dict[str, Any]]:
        # httpx's ASGI transport sends no lifespan events: run the app's lifespan here.
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                statuses = [
                    (await client.post(f"/send/{client_id}")).status_code
                    for client_id in ("client-1", "client-1", "client-2", "client-1", "client-1")
                ]
                statuses.append((await client.post("/send/nobody")).status_code)
                first = (await client.post("/send/client-2")).json()
                health = (await client.get("/health")).json()
                scraped = await client.get("/metrics")
                stats = await app.state.cache.get_cache_stats()
        return statuses, first, scraped, {"stats": stats, "health": health}

    statuses, sent, scraped, seen = asyncio.run(scenario())
    # client-1 sends by email (limit 3: the fourth is refused), client-2 by SMS.
    assert statuses == [200, 200, 200, 200, 429, 404]
    assert sent == {"client_id": "client-2", "channel": "sms", "text": "Welcome, {name}"}
    assert seen["health"] == {"status": "ok"}
    assert scraped.status_code == 200
    names, samples = parse_exposition(scraped.text)
    assert {
        "crmcache_cache_hits",
        "crmcache_cache_misses",
        "crmcache_rate_limit_decisions",
        "crmcache_pool_connections",
        "crmcache_circuit_breaker_state",
        "crmcache_operation_duration_seconds",
    } <= names
    assert all(name.startswith("crmcache_") for name in names)
    stats = seen["stats"]
    for kind, figures in stats["by_kind"].items():
        hits = sum(
            samples["crmcache_cache_hits_total", labels(manager="crm", kind=kind, tier=tier)]
            for tier in ("near", "redis")
        )
        misses = samples[
            "crmcache_cache_misses_total", labels(manager="crm", kind=kind, tier="redis")
        ]
        assert (hits, misses) == (figures["hits"], figures["misses"])
    # 7 sends: client-1 and client-2 missed once each (then cached), "nobody" once.
    assert stats["by_kind"]["preferences"]["misses"] == 3
    assert stats["by_kind"]["preferences"]["hits"] == 4
    refused = labels(manager="crm", limit="email", decision="refused")
    assert samples["crmcache_rate_limit_decisions_total", refused] == 1
    timed = labels(manager="crm", operation="check_rate_limit")
    assert samples["crmcache_operation_duration_seconds_count", timed] == 6
