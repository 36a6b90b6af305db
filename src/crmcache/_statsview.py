"""``crmcache stats`` and ``crmcache stats --watch``: the server's figures as Rich tables
(or JSON), once or refreshed every interval.

One function makes the figures (:func:`crmcache._serverstats.server_figures`) for both:

- **once** (``stats``): one sample, no pause. Rates need two samples, so the one-shot
  view shows Redis's own ``instantaneous_ops_per_sec``, evictions and the hit ratio over
  the server's counters' lifetime (since it started or ``CONFIG RESETSTAT``).
- **watch** (``stats --watch``): a sample every ``interval`` seconds; from the second on,
  ops/s is the delta of ``total_commands_processed``, evictions and the hit ratio are
  shown over the last interval and since the watch began. ``--count N`` stops after N
  refreshes; Ctrl-C stops it with exit code 0. With ``--json`` each refresh is one JSON
  line. A node that does not answer is shown as "unreachable since <time>" and the
  watch goes on: it recovers by itself when the node is back.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import orjson
from rich.console import Console, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ._serverstats import KeyKind, NodeFigures, NodeSample, ServerFigures, ServerSample
from ._serverstats import server_figures as make_figures

__all__ = ["StatsView", "figures_dict", "render"]

#: Shown under the tables: where the per-process counters live.
COUNTERS_NOTE = (
    "Redis's own figures. Hit/miss counters per kind are per service process: "
    "get_cache_stats() or crmcache.metrics in the service."
)


def _clock(wall: float) -> str:
    return datetime.fromtimestamp(wall).strftime("%H:%M:%S")


def _iso(wall: float | None) -> str | None:
    return datetime.fromtimestamp(wall, UTC).isoformat() if wall is not None else None


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{size:,.1f} GiB"  # pragma: no cover - the loop returns


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def _memory(node: NodeFigures) -> str:
    used = _bytes(node.used_memory)
    if not node.maxmemory:
        return f"{used} / no limit"
    return f"{used} / {_bytes(node.maxmemory)} ({_pct(node.memory_used_ratio)})"


def _evictions(node: NodeFigures) -> str:
    total = "-" if node.evicted_keys is None else f"{node.evicted_keys:,}"
    if node.evicted_keys_delta is None:
        return total
    return f"+{node.evicted_keys_delta:,} / {total}"


def _hits(node: NodeFigures, watching: bool) -> str:
    if not watching:
        return _pct(node.hit_ratio_lifetime)
    return " / ".join(
        _pct(v)
        for v in (node.hit_ratio_interval, node.hit_ratio_since_start, node.hit_ratio_lifetime)
    )


def render(
    figures: ServerFigures,
    url: str,
    *,
    watching: bool = False,
    interval: float = 1.0,
    down_since: dict[str, float] | None = None,
    refreshed: float | None = None,
    scan_budget: float = 0.5,
) -> RenderableType:
    """The figures as one table: a column per node (and a total on a cluster), the
    server's figures, then the cache's keys per kind."""
    down_since = down_since or {}
    when = f" — {_clock(refreshed)}" if refreshed is not None else ""
    every = f", every {interval:g} s (Ctrl-C to stop)" if watching else ""
    topology = f" ({figures.topology})" if figures.topology not in (None, "unknown") else ""
    if watching:
        how = (
            "evictions and hit % over the last interval (ivl), since the watch began "
            "(start) and over the server's counters' lifetime (all); * ops/s is Redis's own "
            "instantaneous_ops_per_sec until there is an earlier sample."
        )
    else:
        how = (
            "ops/s is Redis's instantaneous_ops_per_sec, evictions and hit % over the "
            "server's counters' lifetime (stats --watch for intervals)."
        )
    if figures.keys_exact:
        scanned = "Keys: SCAN went through every key under the prefix."
    else:
        scanned = (
            f"Keys: a sample, SCAN stopped at its {scan_budget:g} s budget (or a node did "
            "not answer): the counts are lower bounds."
        )
    table = Table(
        title=f"crmcache stats — {url}{topology}{when}{every}",
        caption=f"{COUNTERS_NOTE} {how} {scanned}",
    )
    table.add_column("")
    columns = list(figures.nodes)
    if len(columns) > 1:
        columns.append(figures.total)
    for node in columns:
        table.add_column(node.address, justify="right")
    up = [node.used_memory is not None for node in columns]

    def row(label: str, cell: Callable[[NodeFigures], str]) -> None:
        table.add_row(label, *[cell(n) if ok else "" for n, ok in zip(columns, up, strict=True)])

    table.add_row(
        "status",
        *[
            Text("up", style="green")
            if ok
            else Text(_down(node, down_since.get(node.address)), style="red")
            for node, ok in zip(columns, up, strict=True)
        ],
    )
    row("role", lambda n: n.role or "")
    row("ops/s", lambda n: _ops(n, watching))
    row("memory used / max", _memory)
    row("maxmemory-policy", lambda n: n.maxmemory_policy or "")
    row("evicted (+ivl / all)" if watching else "evicted", _evictions)
    row("hit % (ivl / start / all)" if watching else "hit %", lambda n: _hits(n, watching))
    row("clients", lambda n: "-" if n.connected_clients is None else f"{n.connected_clients:,}")
    table.add_section()
    for kind in KeyKind:
        row(f"keys: {kind.value}", functools.partial(_kind_count, kind.value))
    row("keys: all", lambda n: "-" if n.total_keys is None else f"{n.total_keys:,}")
    return table


def _kind_count(kind: str, node: NodeFigures) -> str:
    return f"{node.keys.get(kind, 0):,}"


def _down(node: NodeFigures, since: float | None) -> str:
    when = f"unreachable since {_clock(since)}" if since is not None else "unreachable"
    return f"{when}: {node.error or 'no answer'}"


def _ops(node: NodeFigures, watching: bool) -> str:
    if node.ops_per_sec is None:
        return "-"
    mark = "*" if watching and node.ops_per_sec_source == "redis" else ""
    return f"{node.ops_per_sec:,.1f}{mark}"


def figures_dict(
    figures: ServerFigures,
    url: str,
    *,
    at: float,
    down_since: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The figures as JSON-ready data (``stats --json``, a line per refresh with
    ``--watch``)."""
    down_since = down_since or {}

    def node(figure: NodeFigures) -> dict[str, Any]:
        data = figure.as_dict()
        data["unreachable_since"] = _iso(down_since.get(figure.address))
        return data

    return {
        "redis_url": url,
        "at": _iso(at),
        "topology": figures.topology,
        "total_keys": figures.total.total_keys,
        "keys_exact": figures.keys_exact,
        "total": figures.total.as_dict(),
        "nodes": [node(figure) for figure in figures.nodes],
    }


@dataclass
class StatsView:
    """Samples the server through ``sample`` and shows its figures once or live.

    ``clock`` and ``sleep`` are the loop's time (a test may pass its own); ``out`` is
    where JSON lines go.
    """

    sample: Callable[[], ServerSample]
    url: str
    console: Console
    as_json: bool = False
    interval: float = 1.0
    scan_budget: float = 0.5
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    #: When each node that is not answering stopped answering (wall clock).
    down_since: dict[str, float] = field(default_factory=dict)
    _first: dict[str, NodeSample] = field(default_factory=dict)
    #: Per node, the lookups this view's samples made so far (hits, misses).
    _own: dict[str, tuple[int, int]] = field(default_factory=dict)
    _previous: ServerSample | None = None

    def once(self) -> tuple[ServerFigures, ServerSample]:
        """One refresh: a sample and its figures against the earlier ones."""
        sample = self._without_own_reads(self.sample())
        for node in sample.nodes:
            if node.info is None:
                self.down_since.setdefault(node.address, sample.wall)
                continue
            self.down_since.pop(node.address, None)
            if node.address not in self._first:
                self._first[node.address] = node
        first_sample = replace(sample, nodes=tuple(self._first.values()))
        figures = make_figures(sample, self._previous, first_sample)
        self._previous = sample
        return figures, sample

    def _without_own_reads(self, sample: ServerSample) -> ServerSample:
        """``sample`` with the lookups of this view's earlier samples taken out of each
        node's ``keyspace_hits`` / ``keyspace_misses`` (they are not the service's); a
        node that restarted starts afresh (its first sample, its own reads)."""
        nodes = []
        for node in sample.nodes:
            if node.info is None:
                nodes.append(node)
                continue
            first = self._first.get(node.address)
            if (
                first is not None
                and first.info is not None
                and (int(node.info["uptime_in_seconds"]) < int(first.info["uptime_in_seconds"]))
            ):
                del self._first[node.address]  # restarted: its counters began again
                self._own.pop(node.address, None)
            hits, misses = self._own.get(node.address, (0, 0))
            info = dict(node.info)
            info["keyspace_hits"] = max(0, int(info["keyspace_hits"]) - hits)
            info["keyspace_misses"] = max(0, int(info["keyspace_misses"]) - misses)
            self._own[node.address] = (hits + node.own_hits, misses + node.own_misses)
            nodes.append(replace(node, info=info))
        return replace(sample, nodes=tuple(nodes))

    def show_once(self) -> tuple[ServerFigures, ServerSample]:
        """``stats``: one sample, printed (tables or JSON)."""
        figures, sample = self.once()
        if sample.reachable:
            self._emit(figures, sample, watching=False, live=None)
        return figures, sample

    def watch(self, count: int | None = None) -> int:
        """``stats --watch``: refresh every ``interval`` until Ctrl-C (or ``count``
        refreshes); returns 0 either way."""
        done = 0
        with contextlib.suppress(KeyboardInterrupt), self._live() as live:
            next_at = self.clock()
            while True:
                figures, sample = self.once()
                self._emit(figures, sample, watching=True, live=live)
                done += 1
                if count is not None and done >= count:
                    break
                next_at += self.interval
                self.sleep(max(0.0, next_at - self.clock()))
                next_at = max(next_at, self.clock() - self.interval)  # no burst to catch up
        return 0

    @contextlib.contextmanager
    def _live(self) -> Iterator[Live | None]:
        if self.as_json:
            yield None
            return
        with Live(console=self.console, auto_refresh=False, redirect_stderr=False) as live:
            yield live

    def _emit(
        self, figures: ServerFigures, sample: ServerSample, *, watching: bool, live: Live | None
    ) -> None:
        if self.as_json:
            data = figures_dict(figures, self.url, at=sample.wall, down_since=self.down_since)
            if not sample.reachable:
                data["error"] = sample.error
            option = 0 if watching else orjson.OPT_INDENT_2  # a watch: one line per refresh
            sys.stdout.write(orjson.dumps(data, option=option).decode() + "\n")
            sys.stdout.flush()
            return
        view: RenderableType = render(
            figures,
            self.url,
            watching=watching,
            interval=self.interval,
            down_since=self.down_since,
            refreshed=sample.wall if watching else None,
            scan_budget=self.scan_budget,
        )
        if live is None:
            self.console.print(view)
        else:
            live.update(view, refresh=True)
