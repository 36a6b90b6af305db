"""report.py on made-up pytest-benchmark JSON: the three tables, the targets, the failures
and the chart. No Redis needed; matplotlib only for the chart test (skipped without it)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

import report


def _bench(
    name: str, group: str, median_us: float, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "name": f"test_{name}",
        "group": group,
        "stats": {"median": median_us / 1e6},
        "extra_info": extra or {},
    }


def _throughput(
    impl: str, threads: int, ops: float, p99: float, failed: int = 0
) -> dict[str, Any]:
    return _bench(
        f"throughput_{impl}[{threads}]",
        f"throughput-{threads}t",
        1e6,
        {
            "report_table": "throughput",
            "implementation": impl,
            "threads": threads,
            "ops_per_s": ops,
            "p99_us": p99,
            "failed_calls": failed,
        },
    )


def _cost(operation: str, command: str, usec_per_call: float) -> dict[str, Any]:
    return _bench(
        f"redis_cost[{operation}]",
        "redis-cost",
        400_000.0,
        {
            "report_table": "redis-cost",
            "operation": operation,
            "command": command,
            "description": f"{operation} call",
            "calls": 10_000,
            "usec_per_call": usec_per_call,
            "client_us_per_call": 40.0,
        },
    )


def _run(*, rate_limit_us: float = 4.8, breaker_us: float = 3.0, failed16: int = 0) -> Any:
    return {
        "datetime": "2026-01-01T00:00:00",
        "machine_info": {"platform": "Linux", "cpu_count": 2, "cpu_pinning": "off"},
        "benchmarks": [
            _bench("prefs_hit_crmcache", "prefs-hit", 50.0),
            _bench("prefs_hit_raw_get_decode", "prefs-hit", 46.0),
            _bench("breaker_open_crmcache_read", "breaker-open", breaker_us),
            _bench("breaker_open_baseline_live_hit", "breaker-open", 40.0),
            _throughput("crmcache", 1, 21_000.0, 100.0),
            _throughput("raw", 1, 20_000.0, 120.0),
            _throughput("crmcache", 16, 15_000.0, 2_000.0, failed16),
            _throughput("raw", 16, 14_000.0, 2_500.0, failed16),
            _cost("rate_limit", "EVALSHA", rate_limit_us),
            _cost("get", "GET", 0.25),
        ],
    }


def test_median_table_leaves_the_special_tables_out() -> None:
    rows = report.build_rows([_run()["benchmarks"]])
    assert [(r.group, r.name) for r in rows] == [
        ("prefs-hit", "prefs_hit_raw_get_decode"),
        ("prefs-hit", "prefs_hit_crmcache"),
        ("breaker-open", "breaker_open_baseline_live_hit"),
        ("breaker-open", "breaker_open_crmcache_read"),
    ]
    assert rows[3].ratio == pytest.approx(3.0 / 40.0)


def test_throughput_rows_take_the_best_run_and_the_worst_failures() -> None:
    runs = [_run()["benchmarks"], _run(failed16=3)["benchmarks"]]
    runs[1][4]["extra_info"]["ops_per_s"] = 25_000.0  # crmcache, 1 thread, better run
    rows = report.build_throughput_rows(runs)
    assert [r.threads for r in rows] == [1, 16]
    assert rows[0].crmcache_ops == 25_000.0
    assert rows[0].ops_ratio == pytest.approx(25_000 / 20_000)
    assert rows[1].p99_ratio == pytest.approx(2_000 / 2_500)
    assert (rows[1].crmcache_failed, rows[1].raw_failed) == (3, 3)


def test_cost_rows_compare_with_get() -> None:
    rows = report.build_cost_rows([_run(rate_limit_us=6.0)["benchmarks"], _run()["benchmarks"]])
    by_op = {r.operation: r for r in rows}
    assert by_op["rate_limit"].usec_per_call == pytest.approx(4.8)
    assert by_op["rate_limit"].ratio == pytest.approx(4.8 / 0.25)


def test_render_shows_three_tables_and_the_targets() -> None:
    text = report.render([_run()], chart_note="Chart: here.")
    assert "| prefs-hit | prefs_hit_crmcache | 50.0 | 1.09 |" in text
    assert "## Throughput" in text
    assert "| 1 | 21,000 | 20,000 | 1.05 | 100.0 | 120.0 | 0.83 | 0 / 0 |" in text
    assert "## Redis-side cost per call" in text
    assert "| rate_limit: rate_limit call | EVALSHA | 10,000 | 4.80 | 19.2 | 40.0 |" in text
    assert "- met: prefs hit <= 1.10x raw GET+decode" in text
    assert "- met: breaker-open read <= 50 µs median (breaker_open_crmcache_read = 3.00 µs" in text
    assert "- met: rate-limit script <= 10 µs per call" in text
    assert "- met: 16 thread(s) on one manager: no failed call" in text
    assert "- not measured: rate limit <= 1.15x raw EVALSHA" in text
    assert "Chart: here." in text
    assert "Failed tests" not in text


def test_render_flags_missed_targets_and_failed_tests() -> None:
    text = report.render(
        [_run(rate_limit_us=12.0, breaker_us=80.0, failed16=6)],
        failed=["test_bench_threads.py::test_throughput_crmcache[16]"],
    )
    assert "- MISSED: breaker-open read <= 50 µs median" in text
    assert "- MISSED: rate-limit script <= 10 µs per call" in text
    assert "- MISSED: 16 thread(s) on one manager: no failed call (crmcache 6 failed" in text
    assert "- test_bench_threads.py::test_throughput_crmcache[16] (failed in 1 run(s))" in text


def test_failed_tests_read_from_junit_xml() -> None:
    xml = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite>
      <testcase classname="benchmarks.test_bench_threads" name="test_throughput_raw[16]">
        <failure message="boom"/></testcase>
      <testcase classname="benchmarks.test_bench_threads" name="test_throughput_raw[1]"/>
    </testsuite></testsuites>"""
    assert report.failed_tests(xml) == ["test_bench_threads.py::test_throughput_raw[16]"]


def test_chart_is_written_when_matplotlib_is_installed(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "chart.png"
    assert report.write_chart(report.build_rows([_run()["benchmarks"]]), path)
    assert path.read_bytes().startswith(b"\x89PNG")


def test_chart_is_skipped_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    path = tmp_path / "chart.png"
    assert not report.write_chart(report.build_rows([_run()["benchmarks"]]), path)
    assert not path.exists()


def _async(impl: str, ops: float, p99: float, failed: int = 0, reads_failed: int = 0) -> Any:
    return _bench(
        f"async_throughput[{impl}]",
        "async-100tasks",
        1e6,
        {
            "report_table": "async-throughput",
            "implementation": impl,
            "tasks": 100,
            "ops_per_s": ops,
            "p99_us": p99,
            "failed_calls": failed,
            "reads_failed": reads_failed,
        },
    )


def _near_run(*, near_us: float = 1.5, template_us: float = 0.9) -> Any:
    data = _run()
    data["benchmarks"] += [
        _bench("near_hit_raw_get_decode", "near-hit", 50.0),
        _bench("near_hit_crmcache_remote", "near-hit", 40.0),
        _bench("near_hit_crmcache_near_cache", "near-hit", near_us),
        _bench("near_hit_template_raw_get_decode", "near-hit-template", 50.0),
        _bench("near_hit_template_crmcache_near_cache", "near-hit-template", template_us),
        _async("async", 12_000.0, 8_000.0),
        _async("async-near", 300_000.0, 4.0),
    ]
    return data


def test_async_rows_compare_with_sync_16_threads() -> None:
    runs = [_near_run()["benchmarks"], _near_run()["benchmarks"]]
    runs[1][-2]["extra_info"].update(ops_per_s=13_000.0, failed_calls=2)
    rows = report.build_async_rows(runs)
    assert [(r.label, r.callers) for r in rows] == [
        ("sync (baseline)", "16 threads"),
        ("async", "100 tasks"),
        ("async + near cache", "100 tasks"),
    ]
    assert rows[0].ops_ratio == pytest.approx(1.0)
    assert rows[1].ops == 13_000.0
    assert rows[1].ops_ratio == pytest.approx(13_000 / 15_000)
    assert rows[1].p99_ratio == pytest.approx(8_000 / 2_000)
    assert rows[1].failed == 2


def test_async_rows_without_the_sync_run_or_any_async_run() -> None:
    only_async = [
        b for b in _near_run()["benchmarks"] if b["extra_info"].get("report_table") != "throughput"
    ]
    rows = report.build_async_rows([only_async])
    assert rows[0].ops is None
    assert rows[1].ops_ratio is None
    assert "not measured in this run" in "\n".join(report.async_lines(rows, 1))
    assert report.build_async_rows([_run()["benchmarks"]]) == []


def test_render_shows_the_near_cache_targets_and_the_async_table() -> None:
    text = report.render([_near_run()])
    assert "| near-hit | near_hit_crmcache_near_cache | 1.50 | 0.030 |" in text
    assert "## Throughput: async 100 tasks vs sync 16 threads" in text
    assert "| sync (baseline) | 16 threads | 15,000 | 2,000.0 | 1.00 | 1.00 | 0 |" in text
    assert "| async | 100 tasks | 12,000 | 8,000.0 | 0.80 | 4.00 | 0 |" in text
    assert "- met: near-cache prefs hit <= 2 µs median" in text
    assert "- MISSED: near-cache prefs hit >= 50x faster than raw GET+decode" in text
    assert "= 0.030, bound 0.020)" in text
    assert "- met: near-cache template hit >= 50x faster than raw GET+decode" in text
    assert "| async + near cache | 100 tasks | 300,000 | 4.00 | 20.00 | 0.002 | 0 |" in text
    assert "- met: async, 100 tasks on one manager: no failed call" in text


def test_render_flags_failed_async_calls_and_slow_near_hits() -> None:
    data = _near_run(near_us=3.0)
    data["benchmarks"][-1] = _async("async-near", 300_000.0, 4.0, reads_failed=1)
    text = report.render([data])
    assert "- MISSED: near-cache prefs hit <= 2 µs median" in text
    assert "- MISSED: async + near cache, 100 tasks on one manager: no failed call" in text


def _cluster_tp(impl: str, ops: float, p99: float, failed: int = 0) -> Any:
    return _bench(
        f"cluster_throughput[{impl}]",
        "cluster-throughput-16t",
        1e6,
        {
            "report_table": "cluster-throughput",
            "implementation": impl,
            "threads": 16,
            "ops_per_s": ops,
            "p99_us": p99,
            "failed_calls": failed,
            "reads_failed": 0,
        },
    )


def _cluster_run(*, prefs_3: float = 52.0, ops_3: float = 14_000.0) -> Any:
    data = _run()
    data["benchmarks"] += [
        _bench("cluster_prefs_hit[baseline_single_node]", "cluster-prefs-hit", 50.0),
        _bench("cluster_prefs_hit[cluster_3_primaries]", "cluster-prefs-hit", prefs_3),
        _bench("cluster_templates_50_raw_mget_single_node", "cluster-templates-50", 100.0),
        _bench("cluster_templates_50_get_templates[single_node]", "cluster-templates-50", 110.0),
        _bench(
            "cluster_templates_50_get_templates[cluster_3_primaries]",
            "cluster-templates-50",
            180.0,
        ),
        _cluster_tp("cluster_1_primary", 15_000.0, 2_000.0),
        _cluster_tp("cluster_3_primaries", ops_3, 1_000.0),
    ]
    return data


def test_cluster_rows_compare_with_one_primary() -> None:
    runs = [_cluster_run()["benchmarks"], _cluster_run(ops_3=16_500.0)["benchmarks"]]
    runs[0][-1]["extra_info"]["failed_calls"] = 4
    rows = report.build_cluster_rows(runs)
    assert [(r.label, r.is_baseline) for r in rows] == [
        ("1 primary (baseline)", True),
        ("3 primaries", False),
    ]
    assert rows[1].ops == 16_500.0
    assert rows[1].ops_ratio == pytest.approx(16_500 / 15_000)
    assert rows[1].p99_ratio == pytest.approx(0.5)
    assert rows[1].failed == 4
    assert report.build_cluster_rows([_run()["benchmarks"]]) == []


def test_render_shows_the_cluster_ratios_and_targets() -> None:
    text = report.render([_cluster_run()])
    assert "| cluster-prefs-hit | cluster_prefs_hit[cluster_3_primaries] | 52.0 | 1.04 |" in text
    assert "## Throughput: Redis Cluster, 3 primaries vs 1 primary" in text
    assert "| 3 primaries | 16 threads | 14,000 | 1,000.0 | 0.93 | 0.50 | 0 |" in text
    assert "- met: cluster prefs hit (3 primaries) <= 1.10x single node" in text
    assert "- not measured: cluster rate limit (3 primaries) <= 1.10x single node" in text
    assert "<= 2.0x raw MGET" not in text  # reported in the medians, no target
    assert "- MISSED: cluster 50-template batch (3 primaries) <= 1.5x get_templates" in text
    assert "- met: cluster throughput: 3 primaries >= 0.90x the ops/s of 1 primary" in text
    assert "- met: cluster throughput, 3 primaries, 16 threads on one manager: no failed" in text


def test_render_flags_a_slow_cluster() -> None:
    text = report.render([_cluster_run(prefs_3=60.0, ops_3=12_000.0)])
    assert "- MISSED: cluster prefs hit (3 primaries) <= 1.10x single node" in text
    assert "- MISSED: cluster throughput: 3 primaries >= 0.90x the ops/s of 1 primary" in text
    assert "(ratio 0.80)" in text


def _mux(
    workload: str,
    impl: str,
    ops: float,
    p99: float,
    *,
    p50: float = 100.0,
    callers: str = "100 tasks",
    failed: int = 0,
    **extra: Any,
) -> Any:
    return _bench(
        f"mux[{workload}-{impl}]",
        f"mux-{workload}",
        1e6,
        {
            "report_table": "mux",
            "workload": workload,
            "implementation": impl,
            "callers": callers,
            "ops_per_s": ops,
            "p50_us": p50,
            "p99_us": p99,
            "failed_calls": failed,
            "reads_failed": 0,
            **extra,
        },
    )


def _sync_mux(impl: str, threads: int, ops: float) -> Any:
    return _bench(
        f"sync_mux[{impl}-{threads}]",
        f"sync-mux-{threads}t",
        1e6,
        {
            "report_table": "sync-mux",
            "implementation": impl,
            "threads": threads,
            "ops_per_s": ops,
            "p50_us": 50.0,
            "p99_us": 200.0,
            "failed_calls": 0,
        },
    )


def _mux_run(*, pipelined_ops: float = 80_000.0, glide: str = "not installed") -> Any:
    data = _run()  # sync crmcache at 16 threads: 15,000 ops/s, p99 2,000 µs
    data["machine_info"]["valkey_glide"] = glide
    data["benchmarks"] += [
        _mux("prefs", "pipelined", pipelined_ops, 1_500.0),
        _mux("prefs", "pool", 16_000.0, 9_000.0),
        _mux("prefs", "raw-redis-py", 10_000.0, 1_600.0, failed=60),
        _mux("ratelimit", "sync-16t", 20_000.0, 1_400.0, callers="16 threads"),
        _mux("ratelimit", "pipelined", 42_000.0, 4_200.0),
        _mux("single", "pool", 15_000.0, 120.0, callers="1 tasks"),
        _mux("single", "pipelined", 15_300.0, 110.0, callers="1 tasks"),
        _mux("hol", "pipelined", 52_000.0, 3_000.0, p50=1_900.0, big_reads="without",
             big_read_count=0),
        _mux("hol", "pipelined", 31_000.0, 6_300.0, p50=2_600.0, big_reads="with",
             big_read_count=150, big_p50_us=5_400.0, big_p99_us=7_700.0),
        _sync_mux("lean-pool", 16, 20_000.0),
        _sync_mux("raw-redis-py", 16, 16_000.0),
        _sync_mux("pipelined", 16, 80_000.0),
    ]  # fmt: skip
    return data


def test_mux_rows_compare_with_the_sync_baselines() -> None:
    runs = [_mux_run()["benchmarks"], _mux_run(pipelined_ops=90_000.0)["benchmarks"]]
    tables = report.build_mux_rows(runs, "not installed")
    prefs = tables["prefs"]
    assert [r.implementation for r in prefs] == [
        "sync-16t",
        "pipelined",
        "pool",
        "raw-redis-py",
        "glide-async",
        "glide-sync",
    ]
    assert prefs[0].ops == 15_000.0  # test_bench_threads.py's crmcache[16]
    assert prefs[1].ops == 90_000.0
    assert prefs[1].ops_ratio == pytest.approx(6.0)
    assert prefs[1].p99_ratio == pytest.approx(0.75)
    assert prefs[3].failed == 60
    assert prefs[4].ops is None
    assert prefs[4].note == "not installed"
    assert [r.implementation for r in tables["ratelimit"]] == [
        "sync-16t",
        "pipelined",
        "glide-async",
    ]
    assert tables["ratelimit"][2].note == "not installed"  # valkey-glide: always a row
    assert tables["ratelimit"][1].ops_ratio == pytest.approx(2.1)
    assert tables["single"][1].time_ratio == pytest.approx(15_000 / 15_300)
    assert report.build_mux_rows([_run()["benchmarks"]]) == {}
    assert report.build_mux_rows(runs, "1.3.0")["prefs"][4].note == "not measured"


def test_hol_and_sync_mux_rows() -> None:
    benchmarks = _mux_run()["benchmarks"]
    (hol,) = report.build_hol_rows([benchmarks])
    assert (hol.without_p50_us, hol.with_p50_us) == (1_900.0, 2_600.0)
    assert hol.added_p50_us == pytest.approx(700.0)
    assert hol.added_p99_us == pytest.approx(3_300.0)
    assert (hol.big_reads, hol.big_p50_us) == (150, 5_400.0)
    rows = report.build_sync_mux_rows([benchmarks])
    by_impl = {r.implementation: r for r in rows}
    assert by_impl["pipelined"].lean_ratio == pytest.approx(4.0)
    assert by_impl["pipelined"].raw_ratio == pytest.approx(5.0)


def test_render_shows_the_mux_tables_and_targets() -> None:
    text = report.render([_mux_run()])
    assert "## Auto-pipelining: 100 tasks, preferences hits" in text
    assert (
        "| async, pipelined (default) | 100 tasks | 80,000 | 100.0 | 1,500.0 | 5.33 | 0.75 | 0 |"
        in text
    )
    assert "| valkey-glide async (GET + orjson) | — | not installed |" in text
    assert "## Auto-pipelining: one sequential caller" in text
    assert "## Auto-pipelining: head-of-line blocking behind 1 MiB reads" in text
    assert "| 1,900.0 / 2,600.0 / 700.0 | 3,000.0 / 6,300.0 / 3,300.0 | 150 |" in text
    assert "## Sync auto-pipelining" in text
    assert "| 16 | CRMCacheManager, pipelining=True | 80,000 |" in text
    assert "- met: pipelined prefs, 100 tasks: ops/s >= 5x sync at 16 threads" in text
    assert "- met: pipelined prefs, 100 tasks: p99 <= sync's at 16 threads" in text
    assert "- MISSED: pipelined ratelimit, 100 tasks: ops/s >= 5x sync at 16 threads" in text
    assert "- MISSED: pipelined ratelimit, 100 tasks: p99 <= sync's at 16 threads" in text
    assert "- met: one caller: pipelined time <= 1.05x pool time (ratio 0.98)" in text
    assert "- met: auto-pipelining, head-of-line: async, pipelined (default): no failed" in text
    assert "raw redis.asyncio" not in "\n".join(
        line for line in text.splitlines() if line.startswith("- ")
    )


def test_render_flags_a_slow_pipelined_manager() -> None:
    text = report.render([_mux_run(pipelined_ops=50_000.0)])
    assert "- MISSED: pipelined prefs, 100 tasks: ops/s >= 5x sync at 16 threads" in text
    assert "(ratio 3.33, bound 5.00)" in text


def _metrics_cost(facade: str, baseline: float, off: float, on: float) -> dict[str, Any]:
    return _bench(
        f"metrics_call_cost_{facade}",
        "metrics-cost",
        2e6,
        {
            "report_table": "metrics-cost",
            "facade": facade,
            "calls_per_round": 500,
            "baseline_best_ns": baseline,
            "off_best_ns": off,
            "on_best_ns": on,
        },
    )


def test_metrics_cost_rows_take_the_lowest_of_the_runs() -> None:
    runs = [
        [_metrics_cost("sync", 300.0, 305.0, 480.0)],
        [_metrics_cost("sync", 290.0, 310.0, 470.0), _metrics_cost("async", 400.0, 400.0, 900.0)],
    ]
    rows = report.build_metrics_cost_rows(runs)
    assert [(r.facade, r.baseline_ns, r.off_ns, r.on_ns) for r in rows] == [
        ("sync", 290.0, 305.0, 470.0),
        ("async", 400.0, 400.0, 900.0),
    ]
    assert rows[0].on_added_ns == 180.0
    assert rows[0].off_added_ns == 15.0
    assert report.build_metrics_cost_rows([_run()["benchmarks"]]) == []


def test_render_shows_the_metrics_cost_and_its_targets() -> None:
    run = _run()
    run["benchmarks"] += [
        _metrics_cost("sync", 300.0, 305.0, 480.0),
        _metrics_cost("async", 400.0, 450.0, 900.0),
    ]
    text = report.render([run])
    assert "## Metrics: what latency histograms cost per Redis call" in text
    assert "| sync | 300 | 305 | +5 | 480 | +180 | 1.60 |" in text
    assert "- met: latency histograms on add <= 0.30 µs per call (sync) (+180 ns)" in text
    assert "- met: latency histograms off add <= 0.02 µs per call (sync) (+5 ns)" in text
    assert "- MISSED: latency histograms on add <= 0.30 µs per call (async) (+500 ns)" in text
    assert "- MISSED: latency histograms off add <= 0.02 µs per call (async) (+50 ns)" in text
    assert "metrics_call_cost" not in text  # a table of its own, not in the medians
    plain = report.render([_run()])
    assert "- not measured: latency histograms on add <= 0.30 µs per call (sync)" in plain
