"""Gunicorn with uvicorn workers serving examples/fastapi_app.py, pools sized per worker.

Run it (``pip install gunicorn uvicorn-worker``; from the repository root)::

    REDIS_URL=redis://localhost:6379/0 gunicorn -c examples/gunicorn.conf.py

Every figure below can be overridden from the environment (``WEB_CONCURRENCY``,
``BIND``, ``CRMCACHE_PIPELINE_CONNECTIONS``, ``CRMCACHE_MAX_CONNECTIONS``, ``REPLICAS``,
``REDIS_MAXCLIENTS``); the arithmetic at the end refuses a configuration that could run
Redis out of client connections.

One manager per worker process, created after the fork: the app's lifespan creates it
when the worker starts serving, and closes it when the worker stops (gunicorn's
SIGTERM, graceful_timeout below), which sends the invalidations still pending.
``preload_app`` stays False: a manager created in the master and inherited through fork
would share sockets between processes.
"""

from __future__ import annotations

import os

# -- the server --------------------------------------------------------------------------

wsgi_app = "examples.fastapi_app:app"
worker_class = "uvicorn_worker.UvicornWorker"
bind = [os.environ.get("BIND", "127.0.0.1:8000")]
#: Async workers: one per CPU core is enough (each one serves many requests at once).
workers = int(os.environ.get("WEB_CONCURRENCY", str(os.cpu_count() or 1)))
preload_app = False
#: Seconds a stopping worker gets to finish its requests and run the lifespan's
#: shutdown (closing the manager drains pending invalidations: drain_timeout, 5 s).
graceful_timeout = 30
timeout = 60

# -- connections per worker (one AsyncCRMCacheManager each) --------------------------------

#: The async data path is auto-pipelined: every request of the worker shares these
#: connections per Redis node. One is the default and the fastest measured; more buy
#: little (each carries every caller).
PIPELINE_CONNECTIONS = int(os.environ.get("CRMCACHE_PIPELINE_CONNECTIONS", "1"))
#: Template reads take one more of their own (a large template never delays the rest).
TEMPLATE_CONNECTIONS = 1
#: Used only with pipelining=False (one connection per call in flight): kept small.
MAX_CONNECTIONS = int(os.environ.get("CRMCACHE_MAX_CONNECTIONS", "10"))
#: The manager's own extra connections per node: SCAN/INFO for stats (2, opened on use),
#: one for health checks, one for the near cache's invalidations (when it is on).
ADMIN_CONNECTIONS, HEALTH_CONNECTIONS, NEAR_CACHE_CONNECTIONS = 2, 1, 1
#: At most this many connections per worker per Redis node.
CONNECTIONS_PER_WORKER = (
    max(PIPELINE_CONNECTIONS, 0)
    + TEMPLATE_CONNECTIONS
    + ADMIN_CONNECTIONS
    + HEALTH_CONNECTIONS
    + NEAR_CACHE_CONNECTIONS
)

# -- the Redis maxclients arithmetic --------------------------------------------------------

#: Copies of this deployment (pods, hosts) against the same Redis.
REPLICAS = int(os.environ.get("REPLICAS", "1"))
#: Redis's ``maxclients`` (10000 by default; lower if its file-descriptor limit is).
REDIS_MAXCLIENTS = int(os.environ.get("REDIS_MAXCLIENTS", "10000"))
#: Left for everyone else: replicas, other services, `crmcache stats`, redis-cli.
RESERVED_CLIENTS = 100
#: Every worker of every replica at its maximum: must fit under maxclients.
TOTAL_CONNECTIONS = REPLICAS * workers * CONNECTIONS_PER_WORKER
if TOTAL_CONNECTIONS + RESERVED_CLIENTS > REDIS_MAXCLIENTS:
    raise ValueError(
        f"{REPLICAS} replicas x {workers} workers x {CONNECTIONS_PER_WORKER} connections "
        f"= {TOTAL_CONNECTIONS}, + {RESERVED_CLIENTS} reserved, exceeds Redis maxclients "
        f"{REDIS_MAXCLIENTS}: fewer workers, fewer pipeline connections, or a larger "
        "maxclients"
    )

#: What the app reads when each worker creates its manager.
raw_env = [
    f"CRMCACHE_PIPELINE_CONNECTIONS={PIPELINE_CONNECTIONS}",
    f"CRMCACHE_MAX_CONNECTIONS={MAX_CONNECTIONS}",
]


def post_fork(server: object, worker: object) -> None:
    """Nothing to do for crmcache: the manager is made by the app's lifespan, in the
    worker, after this fork. (Were it made here instead, this is where it would go.)"""
