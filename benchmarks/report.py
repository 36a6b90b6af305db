"""Run the benchmarks and summarise them as a Markdown table.

Usage (from anywhere)::

    python benchmarks/report.py [--runs N] [extra pytest arguments, e.g. -k prefs]

Runs ``pytest benchmarks --benchmark-enable`` with this interpreter ``N`` times (default 3),
then prints the median of every benchmark, its ratio to its group's baseline (the
benchmark whose name contains ``raw``), the machine it ran on, and the performance targets
met or missed. The same text is written to ``benchmarks/results.md`` (not versioned: the
numbers belong to a machine).

With several runs each benchmark reports the lowest of its per-run medians. Other load on
the machine only ever adds time, and it comes in bursts that can hit one side of a pair and
not the other; the least disturbed run is the best estimate of what the code costs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results.md"
BASELINE_MARK = "raw"
DEFAULT_RUNS = 3


@dataclass(frozen=True)
class Row:
    """One benchmark's summary."""

    group: str
    name: str
    median_us: float
    ratio: float | None  # to the group's baseline; None when the group has none


@dataclass(frozen=True)
class Target:
    """``name``'s median must be at most ``max_ratio`` times ``against``'s (same group)."""

    description: str
    group: str
    name: str
    against: str
    max_ratio: float


TARGETS = (
    Target("prefs hit <= 1.10x raw GET+decode", "prefs-hit",
           "prefs_hit_crmcache", "prefs_hit_raw_get_decode", 1.10),
    Target("rate limit <= 1.15x raw EVALSHA", "rate-limit",
           "rate_limit_crmcache", "rate_limit_raw_evalsha", 1.15),
    Target("rate limit no slower than limits FixedWindow", "rate-limit",
           "rate_limit_crmcache", "rate_limit_limits_fixed_window", 1.0),
    Target("50-template batch <= 1.2x raw MGET", "templates-50",
           "templates_50_crmcache_get_templates", "templates_50_raw_mget_decode", 1.2),
    Target("50-template batch >= 10x faster than sequential", "templates-50",
           "templates_50_crmcache_get_templates",
           "templates_50_crmcache_sequential_get_template", 0.1),
)  # fmt: skip


def run_benchmarks(json_path: Path, extra_args: Sequence[str]) -> None:
    """Run the benchmark suite, writing pytest-benchmark's JSON to ``json_path``.

    Raises:
        SystemExit: pytest failed or ran no benchmark.
    """
    command = [
        sys.executable, "-m", "pytest", "benchmarks",
        "--benchmark-enable", f"--benchmark-json={json_path}", "-q", *extra_args,
    ]  # fmt: skip
    completed = subprocess.run(command, cwd=REPO_ROOT, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"benchmark run failed (pytest exit code {completed.returncode})")
    if not json_path.is_file():
        raise SystemExit("pytest ran no benchmark (were they all skipped?)")


def _name(benchmark: Mapping[str, Any]) -> str:
    return str(benchmark["name"]).removeprefix("test_")


def build_rows(runs: Sequence[Sequence[Mapping[str, Any]]]) -> list[Row]:
    """Rows grouped in run order; in each group the baseline first, then by median.

    Args:
        runs: the ``benchmarks`` list of each run's JSON; a benchmark's median is the
            lowest of its per-run medians.

    Raises:
        ValueError: a group has more than one benchmark named as its baseline.
    """
    best: dict[str, dict[str, float]] = {}
    for benchmarks in runs:
        for bench in benchmarks:
            group = str(bench.get("group") or "(none)")
            median_us = float(bench["stats"]["median"]) * 1e6
            medians = best.setdefault(group, {})
            name = _name(bench)
            medians[name] = min(median_us, medians.get(name, median_us))
    rows: list[Row] = []
    for group, medians in best.items():
        entries = list(medians.items())
        baselines = [e for e in entries if BASELINE_MARK in e[0]]
        if len(baselines) > 1:
            names = ", ".join(name for name, _ in baselines)
            raise ValueError(f"group {group!r} has several baselines: {names}")
        base = baselines[0][1] if baselines else None
        ordered = sorted(entries, key=lambda e: (BASELINE_MARK not in e[0], e[1]))
        rows.extend(
            Row(group, name, median, None if base is None else median / base)
            for name, median in ordered
        )
    return rows


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


def target_lines(rows: Sequence[Row]) -> list[str]:
    """One line per target: met, missed, or not measured in this run."""
    medians = {(row.group, row.name): row.median_us for row in rows}
    lines = []
    for target in TARGETS:
        value = medians.get((target.group, target.name))
        against = medians.get((target.group, target.against))
        if value is None or against is None:
            lines.append(f"- not measured: {target.description}")
            continue
        ratio = value / against
        verdict = "met" if ratio <= target.max_ratio else "MISSED"
        lines.append(
            f"- {verdict}: {target.description} "
            f"({target.name} / {target.against} = {ratio:.2f}, bound {target.max_ratio:.2f})"
        )
    return lines


def render(runs: Sequence[Mapping[str, Any]]) -> str:
    """The Markdown report of one or more pytest-benchmark JSON documents (one per run)."""
    rows = build_rows([data["benchmarks"] for data in runs])
    data = runs[-1]
    how = "median" if len(runs) == 1 else f"lowest median of {len(runs)} runs"
    lines = [
        "# crmcache benchmarks",
        "",
        f"Run {data.get('datetime', '?')}; {how} of each benchmark, ratio to the group's "
        f"baseline (`{BASELINE_MARK}`: hand-written redis-py).",
        "",
        "| group | benchmark | median µs | ratio to raw |",
        "|---|---|---:|---:|",
    ]
    for row in rows:
        ratio = "—" if row.ratio is None else f"{row.ratio:.2f}"
        lines.append(f"| {row.group} | {row.name} | {row.median_us:,.1f} | {ratio} |")
    lines += ["", machine_line(data.get("machine_info", {})), "", "Targets:", ""]
    lines += target_lines(rows)
    return "\n".join(lines) + "\n"


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
    with tempfile.TemporaryDirectory(prefix="crmcache-bench-") as tmp:
        for number in range(options.runs):
            json_path = Path(tmp) / f"run-{number}.json"
            run_benchmarks(json_path, pytest_args)
            runs.append(json.loads(json_path.read_text(encoding="utf-8")))
    report = render(runs)
    print()
    print(report, end="")
    RESULTS.write_text(report, encoding="utf-8")
    print(f"\n(written to {RESULTS.relative_to(REPO_ROOT)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
