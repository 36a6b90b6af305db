"""A FastAPI service in front of crmcache: the send path, ``/health`` and ``/metrics``.

Run it (``pip install 'crmcache[prometheus]' fastapi uvicorn``)::

    REDIS_URL=redis://localhost:6379/0 uvicorn examples.fastapi_app:app

* The lifespan opens one ``AsyncCRMCacheManager`` per process and closes it at shutdown
  (which also sends the invalidations still pending); a dependency hands it out.
* ``POST /send/{client_id}`` reads the client's preferences (cache first, then the
  database, then fills the cache), picks the channel, reads the template (cache first,
  then the template store), and checks the channel's rate limit: 429 when refused.
* ``GET /health`` is ``health_check()``: 200 or 503, for a readiness probe.
* ``GET /metrics`` is the Prometheus text of this process's manager
  (``crmcache.metrics.PrometheusCollector`` on a registry of its own).

``DATABASE`` and ``TEMPLATES`` stand in for the service's database and template store.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from crmcache import AsyncCRMCacheManager, ClientPreferences, MessageChannel
from crmcache.metrics import PrometheusCollector

#: The service's database of preferences (a real one would be SQL: crmcache.store).
DATABASE: dict[str, ClientPreferences] = {
    "client-1": ClientPreferences(
        client_id="client-1", preferred_channels=[MessageChannel.EMAIL], version=1
    ),
    "client-2": ClientPreferences(
        client_id="client-2", preferred_channels=[MessageChannel.SMS], version=1
    ),
}
#: The template store: (name, channel) -> text.
TEMPLATES = {
    ("welcome", MessageChannel.EMAIL): "<h1>Welcome, {name}</h1>",
    ("welcome", MessageChannel.SMS): "Welcome, {name}",
}
#: Messages per channel per minute, across every process sharing the Redis.
SEND_LIMIT = int(os.environ.get("SEND_LIMIT_PER_MINUTE", "600"))
#: Pool sizing per process (examples/gunicorn.conf.py sets them for its workers): the
#: async data path shares this many auto-pipelined connections per Redis node...
PIPELINE_CONNECTIONS = int(os.environ.get("CRMCACHE_PIPELINE_CONNECTIONS", "1"))
#: ... or, with pipelining off, holds up to this many (one per call in flight).
MAX_CONNECTIONS = int(os.environ.get("CRMCACHE_MAX_CONNECTIONS", "10"))


def get_cache(request: Request) -> AsyncCRMCacheManager:
    """The dependency that hands out the process's manager (opened by the lifespan)."""
    cache: AsyncCRMCacheManager = request.app.state.cache
    return cache


Cache = Annotated[AsyncCRMCacheManager, Depends(get_cache)]


def create_app(redis_url: str | None = None, *, send_limit: int = SEND_LIMIT) -> FastAPI:
    """The app; ``redis_url`` defaults to ``$REDIS_URL``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Created here, in the worker process (after gunicorn forked it): a manager's
        # connections and event loop must never cross a fork.
        cache = AsyncCRMCacheManager(
            redis_url,
            metrics_latency=True,
            pipeline_connections=PIPELINE_CONNECTIONS,
            max_connections=MAX_CONNECTIONS,
        )
        registry = CollectorRegistry()
        PrometheusCollector(cache).register(registry)
        app.state.cache, app.state.registry = cache, registry
        try:
            yield
        finally:
            await cache.aclose()

    app = FastAPI(lifespan=lifespan)

    @app.post("/send/{client_id}")
    async def send(client_id: str, cache: Cache, template: str = "welcome") -> dict[str, Any]:
        preferences = await cache.get_client_preferences(client_id)
        if preferences is None:
            preferences = DATABASE.get(client_id)
            if preferences is None:
                raise HTTPException(404, "unknown client")
            await cache.set_client_preferences(preferences)
        channel = preferences.preferred_channels[0]
        text = await cache.get_template(template, channel)
        if text is None:
            text = TEMPLATES.get((template, channel))
            if text is None:
                raise HTTPException(404, "unknown template")
            await cache.set_template(template, channel, text)
        decision = await cache.check_rate_limit(channel.value, send_limit, 60)
        if not decision.allowed:
            raise HTTPException(429, f"{channel.value} rate limit reached")
        return {"client_id": client_id, "channel": channel.value, "text": text}

    @app.get("/health")
    async def health(cache: Cache, response: Response) -> dict[str, str]:
        healthy = await cache.health_check()
        response.status_code = 200 if healthy else 503
        return {"status": "ok" if healthy else "unavailable"}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(
            generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST
        )

    return app


app = create_app()
