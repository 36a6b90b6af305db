"""Run the benchmarks and summarise them as Markdown tables (and a bar chart).

Usage (from anywhere)::

    python benchmarks/report.py [--runs N] [extra pytest arguments, e.g. -k prefs]

Runs ``pytest benchmarks --benchmark-enable`` with this interpreter ``N`` times (default 3),
then prints:

1. the median of every per-call benchmark and its ratio to its group's baseline (the
   benchmark whose name contains ``raw`` or ``baseline``);
2. the threaded throughput runs (``extra_info`` of test_bench_threads.py): ops/s and p99
   latency of crmcache beside raw redis-py, for each thread count, and failed calls;
3. the async throughput runs (``extra_info`` of test_bench_async.py): 100 asyncio tasks
   sharing one ``AsyncCRMCacheManager`` (remote hits, and near-cached for reference)
   beside the sync manager with 16 threads (test_bench_threads.py's figure from the
   same run): ops/s, p99 and their ratios to the sync figure, and failed calls;
4. the Redis-side cost of each script (``extra_info`` of test_bench_redis_cost.py):
   ``INFO commandstats`` microseconds per call, beside GET and SET;
5. the cluster throughput runs (``extra_info`` of test_bench_cluster.py): 16 threads on
   one manager over 3 primaries beside 1 primary (and a single node, for reference):
   ops/s, p99 and their ratios to the 1-primary figure, and failed calls;
6. auto-pipelining (``extra_info`` of test_bench_mux.py and test_bench_glide.py): 100
   tasks on the pipelined async manager, on its lean pool, on raw ``redis.asyncio`` and
   on valkey-glide ("not installed" where it is not) beside the sync manager at 16
   threads, for preference hits and rate-limit checks; one sequential caller, pipelined
   beside pool; the head-of-line figures (small calls with and without concurrent 1 MiB
   template reads);
7. the sync facade's auto-pipelining (``extra_info`` of test_bench_sync_mux.py): ops/s at
   the main thread alone and 1, 4 and 16 worker threads, and the ratios to the lean pool
   and to raw redis-py;
8. what latency histograms cost (``extra_info`` of test_bench_metrics.py): the guarded
   call's ns per call before metrics (baseline), with histograms off and on, and the
   differences, per facade;

then the machine it ran on, the performance targets met or missed, and any failed test.
The same text is written to ``benchmarks/results.md``, and a bar chart of the medians per
group (ratio on each bar) to ``benchmarks/results.png`` when matplotlib is installed
(``pip install -e '.[bench]'``); neither is versioned: the numbers belong to a machine.

With several runs each benchmark reports its best run: the lowest of its per-run medians,
the highest ops/s and the lowest p99 or µs per call. Other load on the machine only ever
adds time, and it comes in bursts that can hit one side of a pair and not the other; the
least disturbed run is the best estimate of what the code costs. Failed calls, though, are
the most seen in any run: a failure is never averaged away.

A run in which tests failed is still reported (with what it measured), the failed tests
are listed, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results.md"
CHART = BENCH_DIR / "results.png"
BASELINE_MARKS = ("raw", "baseline")
DEFAULT_RUNS = 3

#: ``extra_info["report_table"]`` of the benchmarks that get a table of their own (their
#: pytest-benchmark timings are whole runs, not calls: they stay out of the median table).
REPORT_TABLE_KEY = "report_table"
THROUGHPUT_TABLE = "throughput"
ASYNC_TABLE = "async-throughput"
#: The async runs are compared with test_bench_threads.py's crmcache figure at this many
#: threads.
ASYNC_BASELINE_THREADS = 16
#: The async table's rows, in order: ``extra_info["implementation"]`` and its label.
ASYNC_IMPLEMENTATIONS = (("async", "async"), ("async-near", "async + near cache"))
REDIS_COST_TABLE = "redis-cost"
#: Group under which the Redis-side cost targets look up ``usec_per_call``.
REDIS_COST_GROUP = "redis-cost"
#: The operation the Redis-side costs are compared with.
REDIS_COST_REFERENCE = "get"

CLUSTER_TABLE = "cluster-throughput"
#: The cluster table's rows, in order: ``extra_info["implementation"]`` and its label; the
#: first is the baseline of the ratios.
CLUSTER_IMPLEMENTATIONS = (
    ("cluster_1_primary", "1 primary (baseline)"),
    ("cluster_3_primaries", "3 primaries"),
    ("single_node", "single node (reference)"),
)
#: The cluster row whose ops/s ratio has a target, and the target: the least ops/s it
#: may reach, as a fraction of the baseline's (~ 1 / 1.10, the per-call bound).
CLUSTER_MEASURED = "cluster_3_primaries"
CLUSTER_MIN_OPS_RATIO = 0.90

MUX_TABLE = "mux"
#: The auto-pipelining comparisons: workload, its title, its rows
#: (``extra_info["implementation"]`` and label). The baseline row comes first: for
#: ``prefs`` test_bench_threads.py's crmcache figure at ASYNC_BASELINE_THREADS threads,
#: for ``ratelimit`` test_bench_mux.py's ``sync-16t``.
MUX_WORKLOADS = (
    ("prefs", "preferences hits (`get_client_preferences`)", (
        ("pipelined", "async, pipelined (default)"),
        ("pool", "async, pipelining=False (lean pool)"),
        ("raw-redis-py", "raw redis.asyncio, pool of 10 (GET + orjson)"),
        ("glide-async", "valkey-glide async (GET + orjson)"),
        ("glide-sync", "valkey-glide sync, 16 threads (GET + orjson)"),
    )),
    ("ratelimit", "rate-limit checks (`check_rate_limit`, EVALSHA)", (
        ("pipelined", "async, pipelined (default)"),
        ("pool", "async, pipelining=False (lean pool)"),
        ("glide-async", "valkey-glide async (rate_limit.lua, invoke_script)"),
    )),
)  # fmt: skip
MUX_SYNC_BASELINE = "sync-16t"
#: Implementations that are other libraries: reported, never held to crmcache's targets.
MUX_GLIDE = ("glide-async", "glide-sync")
#: Targets of the pipelined rows against the sync baseline.
MUX_MIN_OPS_RATIO = 5.0
MUX_MAX_P99_RATIO = 1.0
#: The pipelined rows' ops/s over valkey-glide's async client, at least.
MUX_MIN_GLIDE_RATIO = 3.0
#: One sequential caller: pipelined time over pool time, at most.
MUX_SINGLE_MAX_TIME_RATIO = 1.05
SYNC_MUX_TABLE = "sync-mux"
SYNC_MUX_IMPLEMENTATIONS = (
    ("lean-pool", "CRMCacheManager, lean pool (default)"),
    ("pipelined", "CRMCacheManager, pipelining=True"),
    ("raw-redis-py", "raw redis-py, pool of 10 (GET + orjson)"),
)

METRICS_TABLE = "metrics-cost"
METRICS_FACADES = ("sync", "async")
#: Added ns per guarded call, at most: histograms on, and off (nothing measurable).
METRICS_ON_MAX_ADDED_NS = 300.0
METRICS_OFF_MAX_ADDED_NS = 20.0

#: pytest's exit code when tests failed (the run itself completed).
_TESTS_FAILED = 1


@dataclass(frozen=True)
class Row:
    """One per-call benchmark's summary."""

    group: str
    name: str
    median_us: float
    ratio: float | None  # to the group's baseline; None when the group has none


@dataclass(frozen=True)
class ThroughputRow:
    """One thread count: crmcache beside raw redis-py (None where a side did not report)."""

    threads: int
    crmcache_ops: float | None
    raw_ops: float | None
    crmcache_p99_us: float | None
    raw_p99_us: float | None
    crmcache_failed: int | None
    raw_failed: int | None

    @property
    def ops_ratio(self) -> float | None:
        """crmcache ops/s over raw ops/s (above 1: crmcache is faster)."""
        return _ratio(self.crmcache_ops, self.raw_ops)

    @property
    def p99_ratio(self) -> float | None:
        """crmcache p99 over raw p99 (above 1: crmcache's tail is slower)."""
        return _ratio(self.crmcache_p99_us, self.raw_p99_us)


@dataclass(frozen=True)
class AsyncRow:
    """One row of the async table: a manager, how many callers shared it, and its best
    figures over the runs (None where it did not report)."""

    label: str
    callers: str
    ops: float | None
    p99_us: float | None
    failed: int | None  # the most failed calls in any run (reads_failed included)
    base_ops: float | None  # the sync manager's at ASYNC_BASELINE_THREADS threads
    base_p99_us: float | None
    is_baseline: bool = False

    @property
    def ops_ratio(self) -> float | None:
        """ops/s over the sync manager's (above 1: faster)."""
        return _ratio(self.ops, self.base_ops)

    @property
    def p99_ratio(self) -> float | None:
        """p99 over the sync manager's (above 1: slower tail)."""
        return _ratio(self.p99_us, self.base_p99_us)


@dataclass(frozen=True)
class MuxRow:
    """One row of an auto-pipelining table: best figures over the runs (None: not
    measured; ``note`` then says why)."""

    implementation: str
    label: str
    callers: str
    ops: float | None
    p50_us: float | None
    p99_us: float | None
    failed: int | None
    base_ops: float | None
    base_p99_us: float | None
    is_baseline: bool = False
    note: str = "not measured"

    @property
    def ops_ratio(self) -> float | None:
        """ops/s over the baseline's (above 1: faster)."""
        return _ratio(self.ops, self.base_ops)

    @property
    def p99_ratio(self) -> float | None:
        """p99 over the baseline's (above 1: slower tail)."""
        return _ratio(self.p99_us, self.base_p99_us)

    @property
    def time_ratio(self) -> float | None:
        """Time for the same calls over the baseline's (above 1: slower)."""
        return _ratio(self.base_ops, self.ops)


@dataclass(frozen=True)
class HolRow:
    """Head-of-line: the small calls' latency without and with concurrent 1 MiB reads."""

    label: str
    without_p50_us: float | None
    without_p99_us: float | None
    with_p50_us: float | None
    with_p99_us: float | None
    big_reads: int | None
    big_p50_us: float | None
    big_p99_us: float | None
    failed: int | None

    @property
    def added_p50_us(self) -> float | None:
        if self.with_p50_us is None or self.without_p50_us is None:
            return None
        return self.with_p50_us - self.without_p50_us

    @property
    def added_p99_us(self) -> float | None:
        if self.with_p99_us is None or self.without_p99_us is None:
            return None
        return self.with_p99_us - self.without_p99_us


@dataclass(frozen=True)
class SyncMuxRow:
    """One implementation at one thread count in the sync multiplexing table."""

    threads: int
    implementation: str
    label: str
    ops: float | None
    p50_us: float | None
    p99_us: float | None
    failed: int | None
    lean_ops: float | None
    raw_ops: float | None

    @property
    def lean_ratio(self) -> float | None:
        """ops/s over the lean pool's (above 1: faster)."""
        return _ratio(self.ops, self.lean_ops)

    @property
    def raw_ratio(self) -> float | None:
        """ops/s over raw redis-py's (above 1: faster)."""
        return _ratio(self.ops, self.raw_ops)


@dataclass(frozen=True)
class CostRow:
    """Redis-side cost of one operation."""

    operation: str
    command: str
    description: str
    calls: int
    usec_per_call: float
    client_us_per_call: float | None
    ratio: float | None  # to REDIS_COST_REFERENCE's usec_per_call


@dataclass(frozen=True)
class Target:
    """A bound on ``name``'s figure (its median in µs; µs per call for Redis costs).

    With ``against``, the bound is on the ratio to ``against``'s figure (same group);
    without it, on the figure itself, in microseconds.
    """

    description: str
    group: str
    name: str
    bound: float
    against: str | None = None


TARGETS = (
    Target("prefs hit <= 1.10x raw GET+decode", "prefs-hit",
           "prefs_hit_crmcache", 1.10, "prefs_hit_raw_get_decode"),
    Target("rate limit <= 1.15x raw EVALSHA", "rate-limit",
           "rate_limit_crmcache", 1.15, "rate_limit_raw_evalsha"),
    Target("rate limit no slower than limits FixedWindow", "rate-limit",
           "rate_limit_crmcache", 1.0, "rate_limit_limits_fixed_window"),
    Target("50-template batch <= 1.2x raw MGET", "templates-50",
           "templates_50_crmcache_get_templates", 1.2, "templates_50_raw_mget_decode"),
    Target("50-template batch >= 10x faster than sequential", "templates-50",
           "templates_50_crmcache_get_templates", 0.1,
           "templates_50_crmcache_sequential_get_template"),
    Target("breaker-open read <= 50 µs median", "breaker-open",
           "breaker_open_crmcache_read", 50.0),
    Target("near-cache prefs hit <= 2 µs median", "near-hit",
           "near_hit_crmcache_near_cache", 2.0),
    Target("near-cache prefs hit >= 50x faster than raw GET+decode", "near-hit",
           "near_hit_crmcache_near_cache", 0.02, "near_hit_raw_get_decode"),
    Target("near-cache template hit <= 2 µs median", "near-hit-template",
           "near_hit_template_crmcache_near_cache", 2.0),
    Target("near-cache template hit >= 50x faster than raw GET+decode", "near-hit-template",
           "near_hit_template_crmcache_near_cache", 0.02, "near_hit_template_raw_get_decode"),
    Target("rate-limit script <= 10 µs per call on the server (INFO commandstats)",
           REDIS_COST_GROUP, "rate_limit", 10.0),
    Target("rate_limits.lua, one fixed limit <= 10 µs per call on the server",
           REDIS_COST_GROUP, "rate_limits_fixed", 10.0),
    Target("rate_limits.lua, one sliding limit <= 10 µs per call on the server",
           REDIS_COST_GROUP, "rate_limits_sliding", 10.0),
    Target("rate_limits.lua, one gcra limit <= 10 µs per call on the server",
           REDIS_COST_GROUP, "rate_limits_gcra", 10.0),
    Target("rate_limits.lua, one calendar limit <= 10 µs per call on the server",
           REDIS_COST_GROUP, "rate_limits_calendar", 10.0),
    Target("rate_limits.lua, a set of three <= 20 µs per call on the server",
           REDIS_COST_GROUP, "rate_limits_three", 20.0),
    Target("fixed limit no slower than limits FixedWindow", "rl-fixed",
           "rl_fixed_crmcache", 1.0, "rl_fixed_baseline_limits_fixed_window"),
    Target("sliding limit no slower than limits MovingWindow", "rl-moving",
           "rl_moving_crmcache_sliding", 1.0, "rl_moving_baseline_limits_moving_window"),
    Target("sliding limit no slower than limits SlidingWindowCounter", "rl-sliding-counter",
           "rl_sliding_counter_crmcache_sliding", 1.0, "rl_sliding_counter_baseline_limits"),
    Target("gcra limit no slower than a bare GCRA script", "rl-gcra",
           "rl_gcra_crmcache", 1.0, "rl_gcra_baseline_script"),
    Target("gcra limit no slower than pyrate-limiter GCRA (Redis state store)",
           "rl-gcra-pyrate", "rl_gcra_pyrate_crmcache", 1.0,
           "rl_gcra_pyrate_baseline_state_store"),
    Target("set of three no slower than pyrate-limiter's Redis bucket with three rates",
           "rl-set-pyrate", "rl_set_pyrate_crmcache_three_limits", 1.0,
           "rl_set_pyrate_baseline_redis_bucket"),
    Target("cluster prefs hit (3 primaries) <= 1.10x single node", "cluster-prefs-hit",
           "cluster_prefs_hit[cluster_3_primaries]", 1.10,
           "cluster_prefs_hit[baseline_single_node]"),
    Target("cluster rate limit (3 primaries) <= 1.10x single node", "cluster-rate-limit",
           "cluster_rate_limit[cluster_3_primaries]", 1.10,
           "cluster_rate_limit[baseline_single_node]"),
    Target("cluster 50-template batch (3 primaries) <= 1.5x get_templates on one node",
           "cluster-templates-50", "cluster_templates_50_get_templates[cluster_3_primaries]",
           1.5, "cluster_templates_50_get_templates[single_node]"),
)  # fmt: skip


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def _us(value: float) -> str:
    """Microseconds: two decimals below 10 µs (near-cache hits are 1-3 µs), else one."""
    return f"{value:,.2f}" if value < 10 else f"{value:,.1f}"


def _times(ratio: float) -> str:
    """A ratio: three decimals below 0.1 (a 0.02 bound needs them), else two."""
    return f"{ratio:.3f}" if ratio < 0.1 else f"{ratio:.2f}"


def run_benchmarks(json_path: Path, junit_path: Path, extra_args: Sequence[str]) -> int:
    """Run the benchmark suite, writing pytest-benchmark's JSON to ``json_path`` and
    pytest's JUnit XML to ``junit_path``; return pytest's exit code (0, or 1 when tests
    failed).

    Raises:
        SystemExit: pytest could not run (usage error, interrupted ...) or ran no
            benchmark.
    """
    command = [
        sys.executable, "-m", "pytest", "benchmarks",
        "--benchmark-enable", f"--benchmark-json={json_path}", f"--junit-xml={junit_path}",
        "-q", *extra_args,
    ]  # fmt: skip
    completed = subprocess.run(command, cwd=REPO_ROOT, check=False)
    if completed.returncode not in (0, _TESTS_FAILED):
        raise SystemExit(f"benchmark run failed (pytest exit code {completed.returncode})")
    if not json_path.is_file():
        raise SystemExit("pytest ran no benchmark (were they all skipped?)")
    return completed.returncode


def failed_tests(junit_xml: str) -> list[str]:
    """The tests a JUnit XML report says failed or errored, as ``file::name``."""
    root = ET.fromstring(junit_xml)  # noqa: S314 - pytest's own report of this run
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            module = case.get("classname", "").rsplit(".", 1)[-1]
            failed.append(
                f"{module}.py::{case.get('name', '?')}" if module else case.get("name", "?")
            )
    return failed


def _name(benchmark: Mapping[str, Any]) -> str:
    return str(benchmark["name"]).removeprefix("test_")


def _table(benchmark: Mapping[str, Any]) -> str | None:
    extra = benchmark.get("extra_info") or {}
    table = extra.get(REPORT_TABLE_KEY)
    return None if table is None else str(table)


def _is_baseline(name: str) -> bool:
    return any(mark in name for mark in BASELINE_MARKS)


def build_rows(runs: Sequence[Sequence[Mapping[str, Any]]]) -> list[Row]:
    """Per-call benchmarks grouped in run order; in each group the baseline first, then by
    median. Benchmarks that belong to a table of their own are left out.

    Args:
        runs: the ``benchmarks`` list of each run's JSON; a benchmark's median is the
            lowest of its per-run medians.

    Raises:
        ValueError: a group has more than one benchmark named as its baseline.
    """
    best: dict[str, dict[str, float]] = {}
    for benchmarks in runs:
        for bench in benchmarks:
            if _table(bench) is not None:
                continue
            group = str(bench.get("group") or "(none)")
            median_us = float(bench["stats"]["median"]) * 1e6
            medians = best.setdefault(group, {})
            name = _name(bench)
            medians[name] = min(median_us, medians.get(name, median_us))
    rows: list[Row] = []
    for group, medians in best.items():
        entries = list(medians.items())
        baselines = [e for e in entries if _is_baseline(e[0])]
        if len(baselines) > 1:
            names = ", ".join(name for name, _ in baselines)
            raise ValueError(f"group {group!r} has several baselines: {names}")
        base = baselines[0][1] if baselines else None
        ordered = sorted(entries, key=lambda e: (not _is_baseline(e[0]), e[1]))
        rows.extend(
            Row(group, name, median, None if base is None else median / base)
            for name, median in ordered
        )
    return rows


def _extras(runs: Sequence[Sequence[Mapping[str, Any]]], table: str) -> list[dict[str, Any]]:
    """The ``extra_info`` of every benchmark of ``table``, over all runs (only those that
    got as far as recording their figures)."""
    found = []
    for benchmarks in runs:
        for bench in benchmarks:
            extra = bench.get("extra_info") or {}
            if extra.get(REPORT_TABLE_KEY) == table:
                found.append(dict(extra))
    return found


def _best(values: Iterable[float], *, highest: bool) -> float | None:
    collected = list(values)
    if not collected:
        return None
    return max(collected) if highest else min(collected)


def build_throughput_rows(runs: Sequence[Sequence[Mapping[str, Any]]]) -> list[ThroughputRow]:
    """One row per thread count, ascending: best ops/s and p99 of each side over the
    runs, and the most failed calls seen in any run."""
    extras = [e for e in _extras(runs, THROUGHPUT_TABLE) if "ops_per_s" in e]

    def pick(threads: int, implementation: str) -> list[dict[str, Any]]:
        return [
            e for e in extras if e["threads"] == threads and e["implementation"] == implementation
        ]

    rows = []
    for threads in sorted({int(e["threads"]) for e in extras}):
        crm, raw = pick(threads, "crmcache"), pick(threads, "raw")
        crm_failed = [int(e.get("failed_calls", 0)) for e in crm]
        raw_failed = [int(e.get("failed_calls", 0)) for e in raw]
        rows.append(
            ThroughputRow(
                threads=threads,
                crmcache_ops=_best((float(e["ops_per_s"]) for e in crm), highest=True),
                raw_ops=_best((float(e["ops_per_s"]) for e in raw), highest=True),
                crmcache_p99_us=_best((float(e["p99_us"]) for e in crm), highest=False),
                raw_p99_us=_best((float(e["p99_us"]) for e in raw), highest=False),
                crmcache_failed=max(crm_failed) if crm_failed else None,
                raw_failed=max(raw_failed) if raw_failed else None,
            )
        )
    return rows


def build_async_rows(runs: Sequence[Sequence[Mapping[str, Any]]]) -> list[AsyncRow]:
    """The sync baseline (test_bench_threads.py's crmcache manager at
    ASYNC_BASELINE_THREADS threads) and then each async implementation that ran: best
    ops/s and p99 over the runs, the most failed calls in any run. Empty when no async
    benchmark ran."""
    extras = [e for e in _extras(runs, ASYNC_TABLE) if "ops_per_s" in e]
    if not extras:
        return []
    sync = [
        e
        for e in _extras(runs, THROUGHPUT_TABLE)
        if "ops_per_s" in e
        and e.get("implementation") == "crmcache"
        and int(e.get("threads", 0)) == ASYNC_BASELINE_THREADS
    ]

    def failed(found: Sequence[Mapping[str, Any]]) -> int | None:
        counts = [
            max(int(e.get("failed_calls", 0)), int(e.get("reads_failed") or 0)) for e in found
        ]
        return max(counts) if counts else None

    base_ops = _best((float(e["ops_per_s"]) for e in sync), highest=True)
    base_p99 = _best((float(e["p99_us"]) for e in sync), highest=False)
    rows = [
        AsyncRow(
            label="sync (baseline)",
            callers=f"{ASYNC_BASELINE_THREADS} threads",
            ops=base_ops,
            p99_us=base_p99,
            failed=failed(sync),
            base_ops=base_ops,
            base_p99_us=base_p99,
            is_baseline=True,
        )
    ]
    for implementation, label in ASYNC_IMPLEMENTATIONS:
        found = [e for e in extras if e.get("implementation") == implementation]
        if not found:
            continue
        tasks = sorted({int(e.get("tasks", 0)) for e in found})
        rows.append(
            AsyncRow(
                label=label,
                callers=" / ".join(str(t) for t in tasks) + " tasks",
                ops=_best((float(e["ops_per_s"]) for e in found), highest=True),
                p99_us=_best((float(e["p99_us"]) for e in found), highest=False),
                failed=failed(found),
                base_ops=base_ops,
                base_p99_us=base_p99,
            )
        )
    return rows


def build_cluster_rows(runs: Sequence[Sequence[Mapping[str, Any]]]) -> list[AsyncRow]:
    """One row per CLUSTER_IMPLEMENTATIONS entry (those that ran, baseline always): best
    ops/s and p99 over the runs and their ratios to the 1-primary baseline's, the most
    failed calls in any run. Empty when no cluster throughput benchmark ran."""
    extras = [e for e in _extras(runs, CLUSTER_TABLE) if "ops_per_s" in e]
    if not extras:
        return []

    def best(implementation: str) -> tuple[float | None, float | None, int | None, str]:
        found = [e for e in extras if e.get("implementation") == implementation]
        counts = [
            max(int(e.get("failed_calls", 0)), int(e.get("reads_failed") or 0)) for e in found
        ]
        threads = sorted({int(e.get("threads", 0)) for e in found})
        return (
            _best((float(e["ops_per_s"]) for e in found), highest=True),
            _best((float(e["p99_us"]) for e in found), highest=False),
            max(counts) if counts else None,
            " / ".join(f"{t} threads" for t in threads) or "—",
        )

    base_name = CLUSTER_IMPLEMENTATIONS[0][0]
    base_ops, base_p99, _, _ = best(base_name)
    rows = []
    for implementation, label in CLUSTER_IMPLEMENTATIONS:
        ops, p99, failed, callers = best(implementation)
        is_baseline = implementation == base_name
        if ops is None and not is_baseline:
            continue
        rows.append(
            AsyncRow(
                label=label,
                callers=callers,
                ops=ops,
                p99_us=p99,
                failed=failed,
                base_ops=base_ops,
                base_p99_us=base_p99,
                is_baseline=is_baseline,
            )
        )
    return rows


def _failed_count(found: Sequence[Mapping[str, Any]]) -> int | None:
    """The most failed calls in any run (a manager's reads_failed counted too)."""
    counts = [
        max(
            int(e.get("failed_calls", 0)),
            int(e.get("reads_failed") or 0),
            int(e.get("rate_limit_degraded") or 0),
        )
        for e in found
    ]
    return max(counts) if counts else None


def _best_of(found: Sequence[Mapping[str, Any]], key: str, *, highest: bool) -> float | None:
    return _best((float(e[key]) for e in found if e.get(key) is not None), highest=highest)


def build_mux_rows(
    runs: Sequence[Sequence[Mapping[str, Any]]], glide_version: str | None = None
) -> dict[str, list[MuxRow]]:
    """For each MUX_WORKLOADS workload that ran: its sync baseline row, then each of its
    implementations (valkey-glide's always, "not installed" when ``glide_version`` says
    so); the ``single`` workload too (pool first, as the baseline). Best ops/s, p50 and
    p99 over the runs; the most failed calls in any run. Empty when nothing ran."""
    extras = [e for e in _extras(runs, MUX_TABLE) if "ops_per_s" in e]
    if not extras:
        return {}
    glide_note = "not installed" if glide_version == "not installed" else "not measured"

    def found(workload: str, implementation: str) -> list[dict[str, Any]]:
        return [
            e
            for e in extras
            if e.get("workload") == workload and e.get("implementation") == implementation
        ]

    def row(
        implementation: str,
        label: str,
        entries: Sequence[Mapping[str, Any]],
        base: tuple[float | None, float | None],
        *,
        is_baseline: bool = False,
        note: str = "not measured",
    ) -> MuxRow:
        callers = sorted({str(e.get("callers", "")) for e in entries})
        return MuxRow(
            implementation=implementation,
            label=label,
            callers=" / ".join(callers) or "—",
            ops=_best_of(entries, "ops_per_s", highest=True),
            p50_us=_best_of(entries, "p50_us", highest=False),
            p99_us=_best_of(entries, "p99_us", highest=False),
            failed=_failed_count(entries),
            base_ops=base[0],
            base_p99_us=base[1],
            is_baseline=is_baseline,
            note=note,
        )

    tables: dict[str, list[MuxRow]] = {}
    for workload, _title, implementations in MUX_WORKLOADS:
        if not any(e.get("workload") == workload for e in extras):
            continue
        if workload == "prefs":
            base_entries = [
                e
                for e in _extras(runs, THROUGHPUT_TABLE)
                if "ops_per_s" in e
                and e.get("implementation") == "crmcache"
                and int(e.get("threads", 0)) == ASYNC_BASELINE_THREADS
            ]
            base_entries = [{**e, "callers": f"{e.get('threads')} threads"} for e in base_entries]
        else:
            base_entries = found(workload, MUX_SYNC_BASELINE)
        base = (
            _best_of(base_entries, "ops_per_s", highest=True),
            _best_of(base_entries, "p99_us", highest=False),
        )
        rows = [
            row(
                MUX_SYNC_BASELINE,
                f"sync CRMCacheManager, {ASYNC_BASELINE_THREADS} threads (baseline)",
                base_entries,
                base,
                is_baseline=True,
            )
        ]
        for implementation, label in implementations:
            entries = found(workload, implementation)
            if not entries and implementation not in MUX_GLIDE:
                continue
            note = glide_note if implementation in MUX_GLIDE else "not measured"
            rows.append(row(implementation, label, entries, base, note=note))
        tables[workload] = rows
    single = {impl: found("single", impl) for impl in ("pool", "pipelined")}
    if any(single.values()):
        base = (
            _best_of(single["pool"], "ops_per_s", highest=True),
            _best_of(single["pool"], "p99_us", highest=False),
        )
        tables["single"] = [
            row("pool", "async, pipelining=False (lean pool; baseline)", single["pool"], base,
                is_baseline=True),
            row("pipelined", "async, pipelined (default)", single["pipelined"], base),
        ]  # fmt: skip
    return tables


def build_hol_rows(runs: Sequence[Sequence[Mapping[str, Any]]]) -> list[HolRow]:
    """Head-of-line rows, pipelined then pool (those that ran): the small calls' best
    p50/p99 without and with the concurrent 1 MiB reads, the big reads' figures."""
    extras = [e for e in _extras(runs, MUX_TABLE) if e.get("workload") == "hol" and "p99_us" in e]
    rows = []
    for implementation, label in (
        ("pipelined", "async, pipelined (default)"),
        ("pool", "async, pipelining=False (lean pool)"),
    ):
        without = [
            e
            for e in extras
            if e.get("implementation") == implementation and e.get("big_reads") == "without"
        ]
        with_big = [
            e
            for e in extras
            if e.get("implementation") == implementation and e.get("big_reads") == "with"
        ]
        if not without and not with_big:
            continue
        counts = [int(e.get("big_read_count", 0)) for e in with_big]
        rows.append(
            HolRow(
                label=label,
                without_p50_us=_best_of(without, "p50_us", highest=False),
                without_p99_us=_best_of(without, "p99_us", highest=False),
                with_p50_us=_best_of(with_big, "p50_us", highest=False),
                with_p99_us=_best_of(with_big, "p99_us", highest=False),
                big_reads=max(counts) if counts else None,
                big_p50_us=_best_of(with_big, "big_p50_us", highest=False),
                big_p99_us=_best_of(with_big, "big_p99_us", highest=False),
                failed=_failed_count([*without, *with_big]),
            )
        )
    return rows


def build_sync_mux_rows(runs: Sequence[Sequence[Mapping[str, Any]]]) -> list[SyncMuxRow]:
    """The sync facade pipelined beside its lean pool and raw redis-py, per thread count
    (ascending; 0: the main thread alone): best ops/s, p50, p99; the most failed calls in
    any run."""
    extras = [e for e in _extras(runs, SYNC_MUX_TABLE) if "ops_per_s" in e]
    rows = []
    for threads in sorted({int(e["threads"]) for e in extras}):

        def found(implementation: str, threads: int = threads) -> list[dict[str, Any]]:
            return [
                e
                for e in extras
                if int(e["threads"]) == threads and e.get("implementation") == implementation
            ]

        lean = _best_of(found("lean-pool"), "ops_per_s", highest=True)
        raw = _best_of(found("raw-redis-py"), "ops_per_s", highest=True)
        for implementation, label in SYNC_MUX_IMPLEMENTATIONS:
            entries = found(implementation)
            if not entries:
                continue
            rows.append(
                SyncMuxRow(
                    threads=threads,
                    implementation=implementation,
                    label=label,
                    ops=_best_of(entries, "ops_per_s", highest=True),
                    p50_us=_best_of(entries, "p50_us", highest=False),
                    p99_us=_best_of(entries, "p99_us", highest=False),
                    failed=_failed_count(entries),
                    lean_ops=lean,
                    raw_ops=raw,
                )
            )
    return rows


def build_cost_rows(runs: Sequence[Sequence[Mapping[str, Any]]]) -> list[CostRow]:
    """One row per operation, in run order: the lowest µs per call over the runs, and its
    ratio to GET's."""
    best: dict[str, dict[str, Any]] = {}
    for extra in _extras(runs, REDIS_COST_TABLE):
        if "usec_per_call" not in extra:
            continue
        seen = best.get(str(extra["operation"]))
        if seen is None or float(extra["usec_per_call"]) < float(seen["usec_per_call"]):
            best[str(extra["operation"])] = extra
    client_best: dict[str, float] = {}
    for extra in _extras(runs, REDIS_COST_TABLE):
        if "client_us_per_call" in extra:
            operation, value = str(extra["operation"]), float(extra["client_us_per_call"])
            client_best[operation] = min(value, client_best.get(operation, value))
    reference = best.get(REDIS_COST_REFERENCE)
    base = None if reference is None else float(reference["usec_per_call"])
    return [
        CostRow(
            operation=operation,
            command=str(extra.get("command", "?")),
            description=str(extra.get("description", "")),
            calls=int(extra.get("calls", 0)),
            usec_per_call=float(extra["usec_per_call"]),
            client_us_per_call=client_best.get(operation),
            ratio=_ratio(float(extra["usec_per_call"]), base),
        )
        for operation, extra in best.items()
    ]


@dataclass(frozen=True)
class MetricsCostRow:
    """One facade's guarded call, ns per call: before metrics, histograms off and on
    (each the best over the runs of its least disturbed round)."""

    facade: str
    baseline_ns: float
    off_ns: float
    on_ns: float

    @property
    def off_added_ns(self) -> float:
        return self.off_ns - self.baseline_ns

    @property
    def on_added_ns(self) -> float:
        return self.on_ns - self.baseline_ns


def build_metrics_cost_rows(runs: Sequence[Sequence[Mapping[str, Any]]]) -> list[MetricsCostRow]:
    """One row per facade that reported, each figure the lowest over the runs."""
    extras = _extras(runs, METRICS_TABLE)
    rows = []
    for facade in METRICS_FACADES:
        found = [e for e in extras if e.get("facade") == facade and "on_best_ns" in e]
        if not found:
            continue
        baseline, off, on = (
            min(float(e[f"{name}_best_ns"]) for e in found) for name in ("baseline", "off", "on")
        )
        rows.append(MetricsCostRow(facade, baseline, off, on))
    return rows


def metrics_cost_lines(rows: Sequence[MetricsCostRow], runs: int) -> list[str]:
    """The latency-histogram cost table (empty when test_bench_metrics.py did not run)."""
    if not rows:
        return []
    how = "one run" if runs == 1 else f"lowest of {runs} runs"
    lines = [
        "## Metrics: what latency histograms cost per Redis call",
        "",
        "The guarded call every Redis call goes through (`_call`, with a no-I/O function), "
        "on three managers taking turns in one run: as it was before metrics (baseline), "
        "histograms off (the default) and on (`metrics_latency=True`). ns per call of the "
        f"least disturbed round of 500 calls; {how}.",
        "",
        "| facade | baseline ns | off ns | off added | on ns | on added | on / baseline |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.facade} | {row.baseline_ns:,.0f} | {row.off_ns:,.0f} "
            f"| {row.off_added_ns:+,.0f} | {row.on_ns:,.0f} | {row.on_added_ns:+,.0f} "
            f"| {_times(row.on_ns / row.baseline_ns)} |"
        )
    return [*lines, ""]


def metrics_target_lines(rows: Sequence[MetricsCostRow]) -> list[str]:
    """Histograms on add at most 0.3 µs per call, off nothing measurable (per facade)."""
    lines = []
    measured = {row.facade: row for row in rows}
    for facade in METRICS_FACADES:
        for state, bound in (("on", METRICS_ON_MAX_ADDED_NS), ("off", METRICS_OFF_MAX_ADDED_NS)):
            description = (
                f"latency histograms {state} add <= {bound / 1000:.2f} µs per call ({facade})"
            )
            row = measured.get(facade)
            if row is None:
                lines.append(f"- not measured: {description}")
                continue
            added = row.on_added_ns if state == "on" else row.off_added_ns
            verdict = "met" if added <= bound else "MISSED"
            lines.append(f"- {verdict}: {description} ({added:+,.0f} ns)")
    return lines


def machine_line(info: Mapping[str, Any]) -> str:
    """One line naming what the numbers depend on."""
    cpu = info.get("cpu")
    brand = cpu.get("brand_raw") if isinstance(cpu, Mapping) else None
    cpus = f"{info.get('cpu_count', '?')} CPUs" + (f" ({brand})" if brand else "")
    return (
        f"Machine: {info.get('platform', info.get('system', '?'))}, {cpus}, "
        f"Python {info.get('python_version', '?')}, "
        f"redis-py {info.get('redis_py', '?')} (hiredis {info.get('hiredis', '?')}), "
        f"Redis server {info.get('redis_server', '?')}, limits {info.get('limits', '?')}; "
        f"CPU pinning: {info.get('cpu_pinning', '?')}"
    )


def target_lines(
    rows: Sequence[Row],
    costs: Sequence[CostRow] = (),
    throughput: Sequence[ThroughputRow] = (),
    async_rows: Sequence[AsyncRow] = (),
    cluster_rows: Sequence[AsyncRow] = (),
) -> list[str]:
    """One line per target: met, missed, or not measured in this run."""
    figures = {(row.group, row.name): row.median_us for row in rows}
    figures.update({(REDIS_COST_GROUP, cost.operation): cost.usec_per_call for cost in costs})
    lines = []
    for target in TARGETS:
        value = figures.get((target.group, target.name))
        against = None if target.against is None else figures.get((target.group, target.against))
        if value is None or (target.against is not None and against is None):
            lines.append(f"- not measured: {target.description}")
            continue
        if target.against is None:
            verdict = "met" if value <= target.bound else "MISSED"
            lines.append(
                f"- {verdict}: {target.description} "
                f"({target.name} = {value:,.2f} µs, bound {target.bound:,.2f} µs)"
            )
            continue
        assert against is not None
        ratio = value / against
        verdict = "met" if ratio <= target.bound else "MISSED"
        lines.append(
            f"- {verdict}: {target.description} ({target.name} / {target.against} = "
            f"{_times(ratio)}, bound {_times(target.bound)})"
        )
    for row in throughput:
        description = f"{row.threads} thread(s) on one manager: no failed call"
        if row.crmcache_failed is None:
            lines.append(f"- not measured: {description}")
            continue
        verdict = "met" if row.crmcache_failed == 0 else "MISSED"
        raw = "not measured" if row.raw_failed is None else str(row.raw_failed)
        lines.append(
            f"- {verdict}: {description} (crmcache {row.crmcache_failed} failed, "
            f"raw redis-py {raw}; most in any run)"
        )
    for arow in async_rows:
        if arow.is_baseline:
            continue
        description = f"{arow.label}, {arow.callers} on one manager: no failed call"
        if arow.failed is None:
            lines.append(f"- not measured: {description}")
            continue
        verdict = "met" if arow.failed == 0 else "MISSED"
        lines.append(
            f"- {verdict}: {description} ({arow.failed} failed calls or reads_failed; "
            "most in any run)"
        )
    if cluster_rows:
        lines += _cluster_target_lines(cluster_rows)
    return lines


def _cluster_target_lines(rows: Sequence[AsyncRow]) -> list[str]:
    """The cluster throughput targets: the ops/s ratio of 3 primaries, and no failed call
    on any deployment that ran."""
    labels = dict(CLUSTER_IMPLEMENTATIONS)
    measured = next((row for row in rows if row.label == labels[CLUSTER_MEASURED]), None)
    description = (
        f"cluster throughput: {labels[CLUSTER_MEASURED]} >= "
        f"{CLUSTER_MIN_OPS_RATIO:.2f}x the ops/s of {rows[0].label}"
    )
    ratio = None if measured is None else measured.ops_ratio
    if ratio is None:
        lines = [f"- not measured: {description}"]
    else:
        verdict = "met" if ratio >= CLUSTER_MIN_OPS_RATIO else "MISSED"
        lines = [f"- {verdict}: {description} (ratio {_times(ratio)})"]
    for row in rows:
        what = f"cluster throughput, {row.label}, {row.callers} on one manager: no failed call"
        if row.failed is None:
            lines.append(f"- not measured: {what}")
            continue
        verdict = "met" if row.failed == 0 else "MISSED"
        lines.append(
            f"- {verdict}: {what} ({row.failed} failed calls or reads_failed; most in any run)"
        )
    return lines


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def throughput_lines(rows: Sequence[ThroughputRow], runs: int) -> list[str]:
    """The throughput table (empty when no throughput benchmark ran)."""
    if not rows:
        return []
    how = "one run" if runs == 1 else f"best of {runs} runs (highest ops/s, lowest p99)"
    lines = [
        "## Throughput: threads sharing one manager (max_connections=10)",
        "",
        "Preferences hits (`get_client_preferences`) from every thread at once, beside raw "
        "redis-py (`GET` + decode on a `BlockingConnectionPool(max_connections=10)`); "
        f"{how}. Ratio: crmcache over raw (ops/s: above 1 is faster; p99: above 1 is slower). "
        "Failed calls: the most in any run.",
        "",
        "| threads | crmcache ops/s | raw ops/s | ops/s ratio | crmcache p99 µs | raw p99 µs "
        "| p99 ratio | failed calls (crmcache / raw) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        failed = (
            f"{_fmt(row.crmcache_failed, 'd')} / {_fmt(row.raw_failed, 'd')}"
            if row.crmcache_failed is not None or row.raw_failed is not None
            else "—"
        )
        lines.append(
            f"| {row.threads} | {_fmt(row.crmcache_ops, ',.0f')} | {_fmt(row.raw_ops, ',.0f')} "
            f"| {_fmt(row.ops_ratio, '.2f')} | {_fmt(row.crmcache_p99_us, ',.1f')} "
            f"| {_fmt(row.raw_p99_us, ',.1f')} | {_fmt(row.p99_ratio, '.2f')} | {failed} |"
        )
    return [*lines, ""]


def async_lines(rows: Sequence[AsyncRow], runs: int) -> list[str]:
    """The async table (empty when no async benchmark ran)."""
    if not rows:
        return []
    how = "one run" if runs == 1 else f"best of {runs} runs (highest ops/s, lowest p99)"
    lines = [
        f"## Throughput: async 100 tasks vs sync {ASYNC_BASELINE_THREADS} threads "
        "(one manager, max_connections=10)",
        "",
        "Preferences hits (`get_client_preferences`): asyncio tasks on one event loop "
        "sharing one `AsyncCRMCacheManager`, beside the sync `CRMCacheManager` shared by "
        f"{ASYNC_BASELINE_THREADS} threads (the figure of the threads table above, same "
        f"run); {how}. p99 is per call, wait for a pooled connection and for the event "
        "loop included. Ratio: to the sync figure (ops/s: above 1 is faster; p99: above 1 "
        "is slower). The near-cached row is for reference: its hits never await, so its "
        "tasks run one after another. Failed calls: the most in any run.",
        "",
        "| manager | callers | ops/s | p99 µs | ops/s ratio | p99 ratio | failed calls |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        p99 = "—" if row.p99_us is None else _us(row.p99_us)
        ops_ratio = "—" if row.ops_ratio is None else _times(row.ops_ratio)
        p99_ratio = "—" if row.p99_ratio is None else _times(row.p99_ratio)
        lines.append(
            f"| {row.label} | {row.callers} | {_fmt(row.ops, ',.0f')} | {p99} | {ops_ratio} "
            f"| {p99_ratio} | {_fmt(row.failed, 'd')} |"
        )
    if rows[0].ops is None:
        lines += [
            "",
            f"(The sync baseline was not measured in this run: run test_bench_threads.py's "
            f"test_throughput_crmcache[{ASYNC_BASELINE_THREADS}] too.)",
        ]
    return [*lines, ""]


def cluster_lines(rows: Sequence[AsyncRow], runs: int) -> list[str]:
    """The cluster throughput table (empty when no cluster throughput benchmark ran)."""
    if not rows:
        return []
    how = "one run" if runs == 1 else f"best of {runs} runs (highest ops/s, lowest p99)"
    lines = [
        "## Throughput: Redis Cluster, 3 primaries vs 1 primary (one manager, "
        "max_connections=10 per node)",
        "",
        "Preferences hits (`get_client_preferences`, 100 clients' keys over every primary) "
        "from every thread at once through one `CRMCacheManager` on a `redis+cluster://` "
        "URL; the single node (`redis://`) for reference; no CPU pinning on either side; "
        f"{how}. Ratio: to the 1-primary figure (ops/s: above 1 is faster; p99: above 1 "
        "is slower). Failed calls: the most in any run.",
        "",
        "| deployment | callers | ops/s | p99 µs | ops/s ratio | p99 ratio | failed calls |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        p99 = "—" if row.p99_us is None else _us(row.p99_us)
        ops_ratio = "—" if row.ops_ratio is None else _times(row.ops_ratio)
        p99_ratio = "—" if row.p99_ratio is None else _times(row.p99_ratio)
        lines.append(
            f"| {row.label} | {row.callers} | {_fmt(row.ops, ',.0f')} | {p99} | {ops_ratio} "
            f"| {p99_ratio} | {_fmt(row.failed, 'd')} |"
        )
    return [*lines, ""]


def _cell(value: float | None, fmt: Callable[[float], str], note: str = "—") -> str:
    return note if value is None else fmt(value)


def mux_lines(
    tables: Mapping[str, Sequence[MuxRow]], hol: Sequence[HolRow], runs: int
) -> list[str]:
    """The auto-pipelining tables (empty when none of their benchmarks ran)."""
    if not tables and not hol:
        return []
    how = "one run" if runs == 1 else f"best of {runs} runs (highest ops/s, lowest p50/p99)"
    lines: list[str] = []
    titles = {workload: title for workload, title, _ in MUX_WORKLOADS}
    for workload in (w for w, _, _ in MUX_WORKLOADS if w in tables):
        lines += [
            f"## Auto-pipelining: 100 tasks, {titles[workload]}",
            "",
            "100 asyncio tasks on one event loop sharing one client, beside the sync "
            f"`CRMCacheManager` shared by {ASYNC_BASELINE_THREADS} threads (same run); "
            f"{how}. p50/p99 per call. Ratios: to the sync baseline (ops/s: above 1 is "
            f"faster; p99: above 1 is slower). Targets for the pipelined row: ops/s ratio "
            f">= {MUX_MIN_OPS_RATIO:g}, p99 ratio <= {MUX_MAX_P99_RATIO:g}. With every "
            "caller always in flight, the mean latency is callers / ops/s (Little's law): "
            f"100 tasks match the p99 of {ASYNC_BASELINE_THREADS} threads only at about "
            f"100/{ASYNC_BASELINE_THREADS} times their ops/s or more. Failed calls: "
            "the most in any run.",
            "",
            "| client | callers | ops/s | p50 µs | p99 µs | ops/s ratio | p99 ratio "
            "| failed calls |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in tables[workload]:
            if row.ops is None:
                lines.append(f"| {row.label} | — | {row.note} | — | — | — | — | — |")
                continue
            lines.append(
                f"| {row.label} | {row.callers} | {row.ops:,.0f} "
                f"| {_cell(row.p50_us, _us)} | {_cell(row.p99_us, _us)} "
                f"| {_cell(row.ops_ratio, _times)} | {_cell(row.p99_ratio, _times)} "
                f"| {_fmt(row.failed, 'd')} |"
            )
        if tables[workload][0].ops is None:
            lines += [
                "",
                "(The sync baseline was not measured in this run: run "
                + (
                    f"test_bench_threads.py's test_throughput_crmcache[{ASYNC_BASELINE_THREADS}]"
                    if workload == "prefs"
                    else "test_bench_mux.py's test_mux_ratelimit_sync_16_threads"
                )
                + " too.)",
            ]
        lines.append("")
    if "single" in tables:
        lines += [
            "## Auto-pipelining: one sequential caller",
            "",
            "One task calling `get_client_preferences` one call after another; "
            f"{how}. Time ratio: pipelined time over pool time for the same calls (target "
            f"<= {MUX_SINGLE_MAX_TIME_RATIO:.2f}).",
            "",
            "| client | ops/s | p50 µs | p99 µs | time ratio | failed calls |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in tables["single"]:
            lines.append(
                f"| {row.label} | {_fmt(row.ops, ',.0f')} | {_cell(row.p50_us, _us)} "
                f"| {_cell(row.p99_us, _us)} | {_cell(row.time_ratio, _times)} "
                f"| {_fmt(row.failed, 'd')} |"
            )
        lines.append("")
    if hol:
        lines += [
            "## Auto-pipelining: head-of-line blocking behind 1 MiB reads",
            "",
            "100 tasks doing preference hits on one async manager, without and with one "
            "more task reading a 1 MiB template (`get_template`) in a loop meanwhile; p50 "
            "and p99 are the small calls' only; added: with minus without. No target: how "
            f"much the big transfers add to the small calls queued behind them; {how}.",
            "",
            "| manager | small p50 µs (without / with / added) "
            "| small p99 µs (without / with / added) | 1 MiB reads | 1 MiB p50 / p99 µs "
            "| failed calls |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for h in hol:
            lines.append(
                f"| {h.label} | {_cell(h.without_p50_us, _us)} / {_cell(h.with_p50_us, _us)} "
                f"/ {_cell(h.added_p50_us, _us)} | {_cell(h.without_p99_us, _us)} / "
                f"{_cell(h.with_p99_us, _us)} / {_cell(h.added_p99_us, _us)} "
                f"| {_fmt(h.big_reads, ',d')} | {_cell(h.big_p50_us, _us)} / "
                f"{_cell(h.big_p99_us, _us)} | {_fmt(h.failed, 'd')} |"
            )
        lines.append("")
    return lines


def sync_mux_lines(rows: Sequence[SyncMuxRow], runs: int) -> list[str]:
    """The sync auto-pipelining table (empty when it did not run)."""
    if not rows:
        return []
    how = "one run" if runs == 1 else f"best of {runs} runs (highest ops/s, lowest p50/p99)"
    lines = [
        "## Sync auto-pipelining (pipelining=True, crmcache._mux_sync)",
        "",
        "Threads reading preferences through the sync manager's shared, auto-pipelined "
        "connections, beside its lean pool and raw redis-py's pooled client; threads 0 is "
        f"the main thread alone (its calls go through a writer thread); {how}. Ratios: "
        "ops/s over the lean pool's and over raw redis-py's (above 1: faster).",
        "",
        "| threads | client | ops/s | p50 µs | p99 µs | vs lean pool | vs raw redis-py "
        "| failed calls |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.threads} | {row.label} | {_fmt(row.ops, ',.0f')} "
            f"| {_cell(row.p50_us, _us)} | {_cell(row.p99_us, _us)} "
            f"| {_cell(row.lean_ratio, _times)} | {_cell(row.raw_ratio, _times)} "
            f"| {_fmt(row.failed, 'd')} |"
        )
    return [*lines, ""]


def mux_target_lines(tables: Mapping[str, Sequence[MuxRow]], hol: Sequence[HolRow]) -> list[str]:
    """The auto-pipelining targets: ops/s and p99 of the pipelined rows against the sync
    baseline, one caller's time against the pool's, and no failed crmcache call."""
    lines = []
    for workload, _title, _rows in MUX_WORKLOADS:
        rows = tables.get(workload)
        if rows is None:
            continue
        pipelined = next((r for r in rows if r.implementation == "pipelined"), None)
        glide = next((r for r in rows if r.implementation == "glide-async"), None)
        what = f"pipelined {workload}, 100 tasks"
        over_glide = (
            None if pipelined is None or glide is None else _ratio(pipelined.ops, glide.ops)
        )
        checks = (
            (f"ops/s >= {MUX_MIN_OPS_RATIO:g}x sync at {ASYNC_BASELINE_THREADS} threads",
             None if pipelined is None else pipelined.ops_ratio,
             lambda r: r >= MUX_MIN_OPS_RATIO, MUX_MIN_OPS_RATIO),
            (f"p99 <= sync's at {ASYNC_BASELINE_THREADS} threads",
             None if pipelined is None else pipelined.p99_ratio,
             lambda r: r <= MUX_MAX_P99_RATIO, MUX_MAX_P99_RATIO),
            (f"ops/s >= {MUX_MIN_GLIDE_RATIO:g}x valkey-glide async", over_glide,
             lambda r: r >= MUX_MIN_GLIDE_RATIO, MUX_MIN_GLIDE_RATIO),
        )  # fmt: skip
        for description, ratio, ok, bound in checks:
            if ratio is None:
                lines.append(f"- not measured: {what}: {description}")
                continue
            verdict = "met" if ok(ratio) else "MISSED"
            lines.append(
                f"- {verdict}: {what}: {description} (ratio {_times(ratio)}, "
                f"bound {_times(bound)})"
            )
    single = tables.get("single")
    description = f"one caller: pipelined time <= {MUX_SINGLE_MAX_TIME_RATIO:.2f}x pool time"
    ratio = None if single is None else single[-1].time_ratio
    if ratio is None:
        lines.append(f"- not measured: {description}")
    else:
        verdict = "met" if ratio <= MUX_SINGLE_MAX_TIME_RATIO else "MISSED"
        lines.append(f"- {verdict}: {description} (ratio {_times(ratio)})")
    measured: list[tuple[str, int | None]] = [
        (f"{workload}: {row.label}", row.failed)
        for workload, rows in tables.items()
        for row in rows
        if row.implementation in ("pipelined", "pool") and row.ops is not None
    ]
    measured += [(f"head-of-line: {h.label}", h.failed) for h in hol]
    for what, failed in measured:
        verdict = "met" if failed == 0 else "MISSED"
        lines.append(
            f"- {verdict}: auto-pipelining, {what}: no failed call ({failed} failed calls or "
            "reads_failed; most in any run)"
        )
    return lines


def cost_lines(rows: Sequence[CostRow], runs: int) -> list[str]:
    """The Redis-side cost table (empty when no cost benchmark ran)."""
    if not rows:
        return []
    how = "one run" if runs == 1 else f"lowest of {runs} runs"
    lines = [
        "## Redis-side cost per call (INFO commandstats)",
        "",
        "Time the server spent executing each command (`usec` / `calls` of "
        f"`cmdstat_<command>` after `CONFIG RESETSTAT`; {how}), beside the client's whole "
        f"round trip. Ratio: to `{REDIS_COST_REFERENCE}`.",
        "",
        "| operation | command | calls | Redis µs/call | ratio to GET | client µs/call |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        what = f"{row.operation}: {row.description}" if row.description else row.operation
        lines.append(
            f"| {what} | {row.command} | {row.calls:,} | {row.usec_per_call:,.2f} "
            f"| {_fmt(row.ratio, '.1f')} | {_fmt(row.client_us_per_call, ',.1f')} |"
        )
    return [*lines, ""]


def render(
    runs: Sequence[Mapping[str, Any]],
    *,
    failed: Sequence[str] = (),
    chart_note: str | None = None,
) -> str:
    """The Markdown report of one or more pytest-benchmark JSON documents (one per run).

    Args:
        runs: the JSON documents.
        failed: the tests that failed, one entry per failure (repeats count runs).
        chart_note: a line about the chart, if one was attempted.
    """
    benchmark_lists = [data["benchmarks"] for data in runs]
    rows = build_rows(benchmark_lists)
    throughput = build_throughput_rows(benchmark_lists)
    costs = build_cost_rows(benchmark_lists)
    async_rows = build_async_rows(benchmark_lists)
    cluster_rows = build_cluster_rows(benchmark_lists)
    data = runs[-1]
    glide = data.get("machine_info", {}).get("valkey_glide")
    mux_tables = build_mux_rows(benchmark_lists, None if glide is None else str(glide))
    hol_rows = build_hol_rows(benchmark_lists)
    sync_mux = build_sync_mux_rows(benchmark_lists)
    metrics_cost = build_metrics_cost_rows(benchmark_lists)
    how = "median" if len(runs) == 1 else f"lowest median of {len(runs)} runs"
    lines = [
        "# crmcache benchmarks",
        "",
        f"Run {data.get('datetime', '?')}; {how} of each benchmark, ratio to the group's "
        "baseline (`raw`: hand-written redis-py; `baseline`: the named crmcache call).",
        "",
        "## Latency: median per call",
        "",
        "| group | benchmark | median µs | ratio to baseline |",
        "|---|---|---:|---:|",
    ]
    for row in rows:
        ratio = "—" if row.ratio is None else _times(row.ratio)
        lines.append(f"| {row.group} | {row.name} | {_us(row.median_us)} | {ratio} |")
    lines.append("")
    lines += throughput_lines(throughput, len(runs))
    lines += async_lines(async_rows, len(runs))
    lines += cluster_lines(cluster_rows, len(runs))
    lines += mux_lines(mux_tables, hol_rows, len(runs))
    lines += sync_mux_lines(sync_mux, len(runs))
    lines += cost_lines(costs, len(runs))
    lines += metrics_cost_lines(metrics_cost, len(runs))
    lines += [machine_line(data.get("machine_info", {})), "", "Targets:", ""]
    lines += target_lines(rows, costs, throughput, async_rows, cluster_rows)
    lines += mux_target_lines(mux_tables, hol_rows)
    lines += metrics_target_lines(metrics_cost)
    if chart_note:
        lines += ["", chart_note]
    if failed:
        counts: dict[str, int] = {}
        for test in failed:
            counts[test] = counts.get(test, 0) + 1
        lines += ["", f"**Failed tests** (of {len(runs)} run(s); their figures are above):", ""]
        lines += [f"- {test} (failed in {n} run(s))" for test, n in counts.items()]
    return "\n".join(lines) + "\n"


def write_chart(rows: Sequence[Row], path: Path) -> bool:
    """Draw the medians per group as horizontal bars, each labelled with its median and
    ratio, and save the PNG to ``path``.

    Returns:
        True if written; False if matplotlib is not installed (or there is nothing to
        draw).
    """
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]  # noqa: PLC0415
    except ImportError:
        return False
    if not rows:
        return False
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # noqa: PLC0415

    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.group, []).append(row)
    heights = [0.9 + 0.42 * len(members) for members in groups.values()]
    fig, axes = plt.subplots(
        len(groups),
        1,
        figsize=(10, sum(heights) + 0.6),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for ax, (group, members) in zip(axes[:, 0], groups.items(), strict=True):
        names = [row.name for row in members]
        medians = [row.median_us for row in members]
        colors = ["#9e9e9e" if _is_baseline(row.name) else "#1f77b4" for row in members]
        bars = ax.barh(names, medians, color=colors)
        ax.invert_yaxis()
        labels = [
            f"{_us(row.median_us)} µs" + ("" if row.ratio is None else f"  ({_times(row.ratio)}x)")
            for row in members
        ]
        ax.bar_label(bars, labels=labels, padding=3, fontsize=8)
        ax.set_xlim(0, max(medians) * 1.35)
        ax.set_title(group, loc="left", fontsize=10, fontweight="bold")
        ax.tick_params(axis="y", labelsize=8)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_xlabel("median µs per call (ratio to the group's baseline, grey)", fontsize=8)
    fig.suptitle("crmcache benchmarks: median per call", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: Sequence[str]) -> int:
    """Run, print and save the report; arguments other than ``--runs`` go to pytest."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None, allow_abbrev=False
    )
    parser.add_argument(
        "--runs", type=int, default=DEFAULT_RUNS, help=f"benchmark runs (default {DEFAULT_RUNS})"
    )
    options, pytest_args = parser.parse_known_args(argv)
    if options.runs < 1:
        parser.error("--runs must be at least 1")
    runs: list[dict[str, Any]] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="crmcache-bench-") as tmp:
        for number in range(options.runs):
            json_path = Path(tmp) / f"run-{number}.json"
            junit_path = Path(tmp) / f"run-{number}.xml"
            code = run_benchmarks(json_path, junit_path, pytest_args)
            runs.append(json.loads(json_path.read_text(encoding="utf-8")))
            if code != 0 and junit_path.is_file():
                failed += failed_tests(junit_path.read_text(encoding="utf-8"))
            elif code != 0:
                failed.append(f"(run {number + 1}: pytest exit code {code})")
    rows = build_rows([data["benchmarks"] for data in runs])
    if write_chart(rows, CHART):
        chart_note = f"Chart: `{CHART.relative_to(REPO_ROOT)}` (median per group, ratio on bars)."
    else:
        chart_note = "Chart: not drawn (matplotlib is not installed; `pip install -e '.[bench]'`)."
    report = render(runs, failed=failed, chart_note=chart_note)
    print()
    print(report, end="")
    RESULTS.write_text(report, encoding="utf-8")
    print(f"\n(written to {RESULTS.relative_to(REPO_ROOT)})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
