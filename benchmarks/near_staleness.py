"""How long another client's write stays visible in the near cache.

Usage: ``python benchmarks/near_staleness.py [writes]`` (default 200). A raw redis-py
client overwrites a template; this process, with the near cache on, polls until the key
leaves its near cache. Prints p50, p99 and max of write-to-eviction in microseconds. The
time includes the raw client's SET round trip.
"""

from __future__ import annotations

import sys
import time

import redis

from crmcache import CRMCacheManager
from crmcache._near import MISSING
from crmcache.testing import RedisServer

KEY = "crm:template:email:t"


def main(writes: int) -> None:
    """Measure ``writes`` write-to-eviction delays and print their percentiles."""
    with RedisServer() as server, CRMCacheManager(redis_url=server.url, near_cache=True) as cache:
        raw = redis.Redis.from_url(server.url)
        near = cache._near
        assert near is not None  # near_cache=True always makes one
        cache.get_template("warm-up", "email")
        while not near.live:
            time.sleep(0.001)
        delays = []
        for i in range(writes):
            raw.set(KEY, f"v{i}")
            while not (
                cache.get_template("t", "email") == f"v{i}" and near.get(KEY) is not MISSING
            ):
                time.sleep(0.0005)
            started = time.perf_counter()
            raw.set(KEY, f"w{i}")
            while near.get(KEY) is not MISSING:
                pass
            delays.append((time.perf_counter() - started) * 1e6)
        raw.close()
    delays.sort()
    p50, p99 = delays[len(delays) // 2], delays[int(len(delays) * 0.99) - 1]
    worst = delays[-1]
    print(
        f"write -> evicted, {writes} writes: "
        f"p50 {p50:.0f} µs, p99 {p99:.0f} µs, max {worst:.0f} µs"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
