"""A threaded send worker: a ``ThreadPoolExecutor`` drains a queue of send jobs through
crmcache's send path.

Run it (``REDIS_URL`` defaults to ``redis://localhost:6379/0``)::

    REDIS_URL=redis://localhost:6379/0 python examples/threaded_worker.py

Each job, on one of the pool's threads:

1. ``claim_send(message_id)``: a message already claimed (a retry of a message sent, or
   being sent, elsewhere) is a duplicate and is skipped;
2. the client's preferences (cache first, then the database, which fills the cache) pick
   the channel; the template (cache first, then the template store) gives the text;
3. ``check_rate_limits`` charges the channel's and the client's limits at once, or
   neither: a refused job gives its claim back (``release_send``) so it can be retried;
4. the gateway sends. If it fails, the units are refunded (``refund``) and the claim
   released, so the retry is neither counted twice nor refused as a duplicate.

One ``CRMCacheManager`` serves every thread (it is thread-safe), opened before the pool
starts and closed after the pool has drained: ``close()`` sends the invalidations still
pending (``drain_timeout``), so none is lost at shutdown.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from crmcache import ClientPreferences, CRMCacheManager, MessageChannel, RateLimit

logger = logging.getLogger("threaded_worker")

#: Threads sending at once.
THREADS = 8
#: Messages per channel per minute, across every worker sharing the Redis.
CHANNEL_LIMIT = int(os.environ.get("CHANNEL_LIMIT_PER_MINUTE", "600"))
#: Messages per client per hour.
CLIENT_LIMIT = int(os.environ.get("CLIENT_LIMIT_PER_HOUR", "20"))

#: The service's database of preferences (a real one would be SQL: crmcache.store).
DATABASE: dict[str, ClientPreferences] = {
    f"client-{i}": ClientPreferences(
        client_id=f"client-{i}",
        preferred_channels=[MessageChannel.EMAIL if i % 2 else MessageChannel.SMS],
        version=1,
    )
    for i in range(1, 11)
}
#: The template store: (name, channel) -> text.
TEMPLATES = {
    ("welcome", MessageChannel.EMAIL): "<h1>Welcome</h1>",
    ("welcome", MessageChannel.SMS): "Welcome",
}


@dataclass(frozen=True)
class SendJob:
    """One message to send: ``message_id`` is its idempotency key, the same on a retry."""

    message_id: str
    client_id: str
    template: str = "welcome"


#: What the gateway is called with: channel, client id, text. It raises when it fails.
Gateway = Callable[[MessageChannel, str, str], None]


class SendWorker:
    """A pool of ``threads`` threads sending the jobs of a queue through one manager."""

    def __init__(self, redis_url: str | None, gateway: Gateway, threads: int = THREADS) -> None:
        self.threads = threads
        self.gateway = gateway
        # One manager for every thread. The sync data path is a pool of connections,
        # one per call in flight: with max_connections >= threads no thread ever waits
        # for a connection (a call holds one only while Redis answers). The alternative,
        # pipelining=True, has the threads share a couple of auto-pipelined connections:
        # fewer sockets (better with many threads or many worker processes against one
        # Redis's maxclients), a little more latency per call. With 8 threads the pool
        # is the simpler choice; past ~32 threads per process, prefer pipelining=True.
        self.cache = CRMCacheManager(redis_url, max_connections=threads + 1)
        self.outcomes: Counter[str] = Counter()
        self._lock = threading.Lock()

    def limits(self, channel: MessageChannel, client_id: str) -> list[RateLimit]:
        """The limits one send is charged to. One ``group``: on a Redis Cluster the limits
        checked together must share a hash slot."""
        return [
            RateLimit(f"channel:{channel.value}", limit=CHANNEL_LIMIT, window=60, group="send"),
            RateLimit(f"client:{client_id}", limit=CLIENT_LIMIT, window=3600, group="send"),
        ]

    def handle(self, job: SendJob) -> str:
        """Send one job; returns what happened: ``sent``, ``duplicate``, ``unknown``,
        ``rate_limited`` or ``failed``."""
        cache = self.cache
        if not cache.claim_send(job.message_id):
            return "duplicate"
        preferences = cache.get_client_preferences(job.client_id)
        if preferences is None:
            preferences = DATABASE.get(job.client_id)
            if preferences is None:
                cache.release_send(job.message_id)
                return "unknown"
            cache.set_client_preferences(preferences)
        channel = preferences.preferred_channels[0]
        text = cache.get_template(job.template, channel)
        if text is None:
            text = TEMPLATES[(job.template, channel)]
            cache.set_template(job.template, channel, text)
        limits = self.limits(channel, job.client_id)
        if not cache.check_rate_limits(limits).allowed:
            cache.release_send(job.message_id)  # a later retry may send it
            return "rate_limited"
        try:
            self.gateway(channel, job.client_id, text)
        except Exception:  # noqa: BLE001 - whatever the gateway raised, the send failed
            logger.warning("send %s failed; refunded, claim released", job.message_id)
            cache.refund(limits)  # the send did not happen: do not count it
            cache.release_send(job.message_id)  # ... and let its retry claim it
            return "failed"
        return "sent"

    def _drain(self, jobs: queue.Queue[SendJob | None]) -> None:
        while (job := jobs.get()) is not None:
            outcome = self.handle(job)
            with self._lock:
                self.outcomes[outcome] += 1

    def run(self, jobs: queue.Queue[SendJob | None]) -> Counter[str]:
        """Drain ``jobs`` on the pool until each thread takes a ``None`` (one per thread),
        then close the manager (pending invalidations sent); returns the outcomes."""
        try:
            with ThreadPoolExecutor(self.threads, thread_name_prefix="sender") as pool:
                for future in [pool.submit(self._drain, jobs) for _ in range(self.threads)]:
                    future.result()  # a thread's unexpected error surfaces here
        finally:
            self.cache.close()  # after the pool: no thread uses it any more
        return self.outcomes


def main() -> None:  # pragma: no cover - the test drives SendWorker
    """Send 100 jobs (some twice) through a gateway that prints."""
    logging.basicConfig(level=logging.INFO)
    worker = SendWorker(os.environ.get("REDIS_URL"), print)
    jobs: queue.Queue[SendJob | None] = queue.Queue()
    for i in range(100):
        jobs.put(SendJob(f"message-{i % 90}", f"client-{i % 10 + 1}"))
    for _ in range(worker.threads):
        jobs.put(None)
    print(dict(worker.run(jobs)))


if __name__ == "__main__":  # pragma: no cover
    main()
