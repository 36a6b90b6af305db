"""Before/after: this tree's hot paths against another revision's, in one process.

Usage (from the repository)::

    python benchmarks/ab.py --base REV [--rounds N] [--tasks N]

A refactoring must not make a hot path slower, and the difference to show is a few
percent: less than what separates two runs of the pytest-benchmark suite on a shared
machine (the raw redis-py baseline itself moves by 10-20 % between runs). So this
script imports both versions into one process (``REV``'s ``src/crmcache`` is unpacked
with ``git archive`` and imported as ``crmcache_base``), points both at one throwaway
``redis-server``, and runs each operation in rounds that alternate which version goes
first. It prints, per operation, the median time per call of each and the median of the
per-round ratios (this tree / base): 1.00 means equal, below 1 faster.

The Lua scripts come from each tree's own ``lua/`` folder. Both facades are measured:
the sync manager call by call, the async manager awaited call by call on one loop.

With ``--tasks N`` it measures throughput instead, as test_bench_mux.py does: ``N``
asyncio tasks sharing one pipelined ``AsyncCRMCacheManager`` (preference hits, then
rate-limit checks), client and server pinned to one CPU (the highest this process may
use; ``CRMCACHE_BENCH_CPU=<n>`` or ``off`` as for the suite). It prints the median ops/s of
each side and the median of the per-round ratios (this tree / base): above 1 is faster.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def unpack_base(rev: str, into: Path) -> Any:
    """Import revision ``rev``'s package as ``crmcache_base``."""
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", rev, "src/crmcache", "lua"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "src" / "crmcache").rename(into / "src" / "crmcache_base")
    sys.path.insert(0, str(into / "src"))
    return importlib.import_module("crmcache_base")


def interleave(
    name: str, run: Callable[[Any, int], float], managers: tuple[Any, Any], n: int, rounds: int
) -> None:
    """Time ``run(manager, n)`` (seconds per call) for the base's manager and this tree's,
    alternating who goes first."""
    times: dict[int, list[float]] = {0: [], 1: []}
    ratios = []
    for r in range(rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for side in order:
            times[side].append(run(managers[side], n))
        ratios.append(times[1][-1] / times[0][-1])
    print(
        f"{name:30s} base {statistics.median(times[0]) * 1e6:8.2f} µs   "
        f"this {statistics.median(times[1]) * 1e6:8.2f} µs   "
        f"this/base {statistics.median(ratios):.3f}",
        flush=True,
    )


def sync_ops(base_mod: Any, this_mod: Any, url: str, rounds: int) -> None:
    """The sync facade's hot paths."""
    made: list[Any] = []

    def pair(**kwargs: Any) -> tuple[Any, Any]:
        managers = (
            base_mod.CRMCacheManager(redis_url=url, **kwargs),
            this_mod.CRMCacheManager(redis_url=url, **kwargs),
        )
        made.extend(managers)
        return managers

    base, this = pair()
    near_base, near_this = pair(near_cache=True)
    refs = [(f"t{i}", "email") for i in range(50)]
    this.set_templates(dict.fromkeys(refs, "<p>Hello {{ name }}</p>" * 5))
    rows = {
        m: m_mod.ClientPreferences(client_id="c1", version=1)
        for m, m_mod in ((base, base_mod), (this, this_mod))
    }
    this.set_client_preferences(rows[this])
    for manager in (near_base, near_this):  # until the near cache is live and holds both
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and manager.get_stats().near_cache["size"] < 2:
            manager.get_client_preferences("c1")
            manager.get_template("t1", "email")

    def loop(call: Callable[[Any], object]) -> Callable[[Any, int], float]:
        def run(manager: Any, n: int) -> float:
            start = time.perf_counter()
            for _ in range(n):
                call(manager)
            return (time.perf_counter() - start) / n

        return run

    interleave(
        "sync get_client_preferences",
        loop(lambda m: m.get_client_preferences("c1")),
        (base, this),
        1000,
        rounds,
    )
    interleave(
        "sync set_client_preferences",
        loop(lambda m: m.set_client_preferences(rows[m])),
        (base, this),
        1000,
        rounds,
    )
    interleave(
        "sync check_rate_limit",
        loop(lambda m: m.check_rate_limit("api", 10**9, 60)),
        (base, this),
        1000,
        rounds,
    )
    interleave(
        "sync get_template",
        loop(lambda m: m.get_template("t1", "email")),
        (base, this),
        1000,
        rounds,
    )
    interleave(
        "sync get_templates (50)", loop(lambda m: m.get_templates(refs)), (base, this), 300, rounds
    )
    interleave(
        "sync near-cached preferences",
        loop(lambda m: m.get_client_preferences("c1")),
        (near_base, near_this),
        20000,
        rounds,
    )
    interleave(
        "sync near-cached template",
        loop(lambda m: m.get_template("t1", "email")),
        (near_base, near_this),
        20000,
        rounds,
    )
    for manager in made:
        manager.close()


def async_ops(base_mod: Any, this_mod: Any, url: str, rounds: int) -> None:
    """The async facade's hot paths, awaited one after another on one loop."""

    async def main() -> None:
        base = base_mod.AsyncCRMCacheManager(redis_url=url)
        this = this_mod.AsyncCRMCacheManager(redis_url=url)
        await this.set_client_preferences(this_mod.ClientPreferences(client_id="c1", version=1))
        loop = asyncio.get_running_loop()

        def timed(call: Callable[[Any], Awaitable[object]]) -> Callable[[Any, int], float]:
            def run(manager: Any, n: int) -> float:
                async def many() -> float:
                    start = time.perf_counter()
                    for _ in range(n):
                        await call(manager)
                    return (time.perf_counter() - start) / n

                return asyncio.run_coroutine_threadsafe(many(), loop).result()

            return run

        # The timing loops run on this loop from a worker thread, so that this coroutine
        # can keep the loop turning meanwhile.
        await asyncio.to_thread(
            interleave,
            "async get_client_preferences",
            timed(lambda m: m.get_client_preferences("c1")),
            (base, this),
            1000,
            rounds,
        )
        await asyncio.to_thread(
            interleave,
            "async check_rate_limit",
            timed(lambda m: m.check_rate_limit("api", 10**9, 60)),
            (base, this),
            1000,
            rounds,
        )
        await base.aclose()
        await this.aclose()

    asyncio.run(main())


def task_ops(base_mod: Any, this_mod: Any, url: str, rounds: int, tasks: int) -> None:
    """``tasks`` tasks on each side's pipelined async manager, rounds alternating."""
    calls = 300 * tasks

    async def main() -> None:
        managers = []
        for mod in (base_mod, this_mod):
            manager = mod.AsyncCRMCacheManager(
                redis_url=url, rate_limit_policy="closed", pipelining=True
            )
            await manager.set_client_preferences(mod.ClientPreferences(client_id="c1", version=1))
            managers.append(manager)

        async def hit(manager: Any) -> None:
            if await manager.get_client_preferences("c1") is None:
                raise AssertionError("a miss: the benchmark measures hits")

        async def check(manager: Any) -> None:
            if not (await manager.check_rate_limit("ab-api", 10**9, 60)).allowed:
                raise AssertionError("refused or degraded: the benchmark measures checks")

        async def throughput(call: Callable[[Any], Awaitable[None]], manager: Any) -> float:
            async def worker() -> None:
                for _ in range(calls // tasks):
                    await call(manager)

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(tasks)))
            return calls / (time.perf_counter() - start)

        for name, call in (("preference hits", hit), ("rate-limit checks", check)):
            for manager in managers:  # warm-up: connections, scripts, memos
                await throughput(call, manager)
            rates: dict[int, list[float]] = {0: [], 1: []}
            ratios = []
            for r in range(rounds):
                order = (0, 1) if r % 2 == 0 else (1, 0)
                for side in order:
                    rates[side].append(await throughput(call, managers[side]))
                ratios.append(rates[1][-1] / rates[0][-1])
            print(
                f"{tasks} tasks, {name:18s} base {statistics.median(rates[0]):9,.0f} ops/s   "
                f"this {statistics.median(rates[1]):9,.0f} ops/s   "
                f"this/base {statistics.median(ratios):.3f}",
                flush=True,
            )
        for manager in managers:
            await manager.aclose()

    asyncio.run(main())


def _pin() -> str:
    """Pin this process (and the server it starts next) to one CPU, as the suite does."""
    choice = os.environ.get("CRMCACHE_BENCH_CPU", "").strip().lower()
    if choice in {"off", "none", "no", "false"} or not hasattr(os, "sched_setaffinity"):
        return "off"
    cpu = int(choice) if choice else max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return f"CPU {cpu}"


def main() -> int:
    """Parse the arguments, start a server, compare, stop it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the revision to compare against")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--tasks",
        type=int,
        default=0,
        help="measure the throughput of this many tasks on the pipelined async manager",
    )
    args = parser.parse_args()
    pinning = _pin() if args.tasks > 0 else "off"
    import crmcache  # noqa: PLC0415 - after argparse, so --help needs no import
    from crmcache.testing import RedisServer  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp, RedisServer() as server:
        base_mod = unpack_base(args.base, Path(tmp))
        print(
            f"base {args.base}, this tree; {args.rounds} rounds, Redis {server.url}, "
            f"pinning {pinning}"
        )
        if args.tasks > 0:
            task_ops(base_mod, crmcache, server.url, args.rounds, args.tasks)
        else:
            sync_ops(base_mod, crmcache, server.url, args.rounds)
            async_ops(base_mod, crmcache, server.url, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
