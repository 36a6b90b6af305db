"""The demo workload: a CRM sending messages through crmcache, measured.

Thousands of clients with skewed (Zipf-like) popularity; each message reads the client's
preferences through the repository, fetches its templates in one batch, and checks the
provider's rate limit, with a stream of preference updates in between. Every read is
checked against the versions already committed: a read that returns an older version
than one saved before the read began is a stale read (there must be none).
"""

from __future__ import annotations

import random
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any

from ._errors import StaleVersionError
from ._stats import Kind
from .cache_manager import CRMCacheManager
from .models import ClientPreferences, MessageChannel
from .repository import CommunicationRepository
from .store import SQLPreferenceStore
from .templates import FileTemplateSource

__all__ = ["DemoConfig", "DemoReport", "run_demo"]

_TIMEZONES = ("UTC", "Europe/Berlin", "America/New_York", "America/Los_Angeles", "Asia/Tokyo")
_LANGUAGES = ("en", "de", "fr", "es", "ja")
_TEMPLATES = ("welcome", "reminder", "receipt", "promo", "survey")
_OPERATIONS = ("preferences", "templates", "rate_limit", "update", "message")


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoConfig:
    """Size and shape of a demo run."""

    clients: int = 5000
    messages: int = 20000
    threads: int = 4
    update_every: int = 50
    duration: float = 50.0
    seed: int = 42
    zipf_s: float = 1.1

    def __post_init__(self) -> None:
        for name in ("clients", "messages", "threads", "update_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.duration > 0:
            raise ValueError(f"duration must be > 0 seconds, got {self.duration}")


@dataclass(slots=True)
class DemoReport:
    """What a demo run measured."""

    config: DemoConfig
    elapsed: float = 0.0
    messages_sent: int = 0
    suppressed_opt_out: int = 0
    latencies_us: dict[str, list[float]] = field(default_factory=dict)
    preference_hit_rate: float = 0.0
    template_hit_rate: float = 0.0
    db_reads: int = 0
    db_reads_avoided: int = 0
    template_file_reads: int = 0
    rate_limit_allowed: int = 0
    rate_limit_rejected: int = 0
    updates: int = 0
    update_conflicts: int = 0
    stale_reads: int = 0
    redis_memory: str = ""
    redis_url: str = ""
    stopped_early: bool = False
    #: Keys on each primary (``"host:port"``) of a Redis Cluster; ``None`` for one node.
    node_keys: dict[str, int] | None = None

    @property
    def ops_per_second(self) -> float:
        """Messages handled per second."""
        return self.messages_sent / self.elapsed if self.elapsed else 0.0

    def percentiles(self) -> dict[str, dict[str, float]]:
        """Count, p50 and p99 (microseconds) per operation."""
        out: dict[str, dict[str, float]] = {}
        for op in _OPERATIONS:
            samples = sorted(self.latencies_us.get(op, ()))
            if not samples:
                continue
            out[op] = {
                "count": len(samples),
                "p50_us": round(samples[len(samples) // 2], 1),
                "p99_us": round(samples[min(len(samples) - 1, int(len(samples) * 0.99))], 1),
            }
        return out

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        c = self.config
        return {
            "config": {
                "clients": c.clients,
                "messages": c.messages,
                "threads": c.threads,
                "update_every": c.update_every,
                "seed": c.seed,
            },
            "elapsed_s": round(self.elapsed, 3),
            "messages_sent": self.messages_sent,
            "ops_per_s": round(self.ops_per_second, 1),
            "operations": self.percentiles(),
            "hit_rate": {
                "preferences": self.preference_hit_rate,
                "templates": self.template_hit_rate,
            },
            "db_reads": self.db_reads,
            "db_reads_avoided": self.db_reads_avoided,
            "template_file_reads": self.template_file_reads,
            "rate_limit": {
                "allowed": self.rate_limit_allowed,
                "rejected": self.rate_limit_rejected,
            },
            "suppressed_opt_out": self.suppressed_opt_out,
            "preference_updates": self.updates,
            "update_conflicts": self.update_conflicts,
            "stale_reads": self.stale_reads,
            "redis_memory": self.redis_memory,
            "redis_url": self.redis_url,
            "stopped_early": self.stopped_early,
            "node_keys": self.node_keys,
        }


def _client_id(i: int) -> str:
    return f"client-{i:06d}"


def _initial_preferences(rng: random.Random, i: int) -> ClientPreferences:
    channels = list(MessageChannel)
    rng.shuffle(channels)
    return ClientPreferences(
        client_id=_client_id(i),
        preferred_channels=channels[: rng.randint(1, 3)],
        timezone=rng.choice(_TIMEZONES),
        language=rng.choice(_LANGUAGES),
        opt_out=rng.random() < 0.02,
        version=1,
    )


def write_demo_templates(root: Path) -> Path:
    """Write a realistic template tree: HTML emails of a few KB, short SMS and WhatsApp."""
    for name in (*_TEMPLATES, "footer"):
        email = root / "email"
        email.mkdir(parents=True, exist_ok=True)
        body = "".join(
            f"<p>{name.title()} paragraph {i}: {{{{ client.name }}}}, your account.</p>\n"
            for i in range(60)
        )
        (email / f"{name}.html").write_text(
            f"<html><body><h1>{name.title()}</h1>\n{body}</body></html>\n", encoding="utf-8"
        )
        for channel in ("sms", "whatsapp"):
            folder = root / channel
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.txt").write_text(
                f"{name.title()}: hi {{{{ client.name }}}}, see {{{{ link }}}}", encoding="utf-8"
            )
    return root


class _Committed:
    """Versions committed so far, per client: the floor a later read must not go below."""

    def __init__(self) -> None:
        self._versions: dict[str, int] = {}
        self._lock = threading.Lock()

    def floor(self, client_id: str) -> int:
        return self._versions.get(client_id, 1)

    def committed(self, client_id: str, version: int) -> None:
        with self._lock:
            if version > self._versions.get(client_id, 1):
                self._versions[client_id] = version


def run_demo(
    config: DemoConfig,
    cache: CRMCacheManager,
    *,
    db_url: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> DemoReport:
    """Run the workload against ``cache`` and a SQL database; return what it measured.

    Args:
        config: size, threads, seed.
        cache: the cache manager (on a real Redis).
        db_url: SQLAlchemy URL of the database; default a SQLite file in a temp folder.
        progress: called with the number of messages done so far, from worker threads.
    """
    with tempfile.TemporaryDirectory(prefix="crmcache-demo-") as tmp:
        tmp_path = Path(tmp)
        store = SQLPreferenceStore(
            db_url or f"sqlite:///{tmp_path / 'crm.db'}",
            table_name=f"crm_demo_prefs_{config.seed}_{int(time.time() * 1000) % 10**9}",
        )
        try:
            root = write_demo_templates(tmp_path / "templates")
            return _Workload(config, cache, store, root, progress).run()
        finally:
            store.drop_table()
            store.close()


@dataclass(slots=True)
class _Tally:
    """One worker's counts and latencies, merged into the report when it finishes."""

    latencies: dict[str, list[float]] = field(
        default_factory=lambda: {op: [] for op in _OPERATIONS}
    )
    sent: int = 0
    opt_out: int = 0
    allowed: int = 0
    rejected: int = 0
    updates: int = 0
    conflicts: int = 0
    stale: int = 0


class _Workload:
    """The shared state of one run: the repository, templates, quotas and the checks."""

    def __init__(
        self,
        config: DemoConfig,
        cache: CRMCacheManager,
        store: SQLPreferenceStore,
        templates_root: Path,
        progress: Callable[[int], None] | None,
    ) -> None:
        self.config = config
        self.cache = cache
        self.store = store
        self.progress = progress
        rng = random.Random(config.seed)
        store.insert_many(_initial_preferences(rng, i) for i in range(config.clients))
        self.repository = CommunicationRepository(db_manager=store, cache_manager=cache)
        self.source = FileTemplateSource(templates_root, cache)
        # Provider quotas sized so the busier channels run out during the run.
        self.limits = {
            MessageChannel.EMAIL: config.messages * 2,
            MessageChannel.SMS: max(config.messages // 8, 1),
            MessageChannel.WHATSAPP: max(config.messages // 12, 1),
        }
        # A fresh rate-limit namespace per run, so runs against a shared Redis don't mix.
        self.run_tag = f"{config.seed}-{time.time_ns() % 10**12}"
        weights = [1.0 / (rank**config.zipf_s) for rank in range(1, config.clients + 1)]
        self.cumulative = list(accumulate(weights))
        self.committed = _Committed()
        self.report = DemoReport(config=config, redis_url=cache.settings.masked_url)
        self.stop = threading.Event()
        self.deadline = time.monotonic() + config.duration
        self._lock = threading.Lock()
        self._done = 0

    def run(self) -> DemoReport:
        config = self.config
        self.cache.reset_stats()
        loads_before = self.store.loads
        per_thread = [config.messages // config.threads] * config.threads
        for i in range(config.messages % config.threads):
            per_thread[i] += 1
        threads = [
            threading.Thread(target=self.worker, args=(i, n), name=f"demo-{i}", daemon=True)
            for i, n in enumerate(per_thread)
        ]
        started = time.perf_counter()
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except BaseException:
            # Ctrl-C / SIGTERM: let the workers finish their current message, then unwind
            # (the caller's cleanup drops the table and stops an embedded Redis).
            self.stop.set()
            for t in threads:
                t.join(timeout=10)
            raise
        report = self.report
        report.elapsed = time.perf_counter() - started
        report.stopped_early = self.stop.is_set()
        if self.progress is not None:
            self.progress(config.messages)
        stats = self.cache.get_stats()
        prefs = stats.by_kind[Kind.PREFERENCES]
        report.preference_hit_rate = prefs.hit_rate
        report.template_hit_rate = stats.by_kind[Kind.TEMPLATES].hit_rate
        report.db_reads = self.store.loads - loads_before
        report.db_reads_avoided = prefs.hits + prefs.misses - report.db_reads
        report.template_file_reads = self.source.file_reads
        report.redis_memory = stats.redis.used_memory_human if stats.redis else "unknown"
        return report

    def worker(self, index: int, count: int) -> None:
        rng = random.Random(self.config.seed * 1000 + index)
        picks = rng.choices(range(self.config.clients), cum_weights=self.cumulative, k=count)
        tally = _Tally()
        for n, pick in enumerate(picks, 1):
            if self.stop.is_set():
                break
            prefs = self.send_one(pick, tally)
            if prefs is not None and n % self.config.update_every == 0:
                started = time.perf_counter()
                _update(self.repository, prefs, rng, self.committed, tally)
                tally.latencies["update"].append((time.perf_counter() - started) * 1e6)
            if n % 50 == 0:
                self.tick(50)
        self.merge(tally)

    def send_one(self, pick: int, tally: _Tally) -> ClientPreferences | None:
        """One message: preferences, templates in a batch, the provider's rate limit."""
        clock = time.perf_counter
        client_id = _client_id(pick)
        started = clock()
        floor = self.committed.floor(client_id)
        prefs = self.repository.get_client_preferences(client_id)
        t1 = clock()
        tally.latencies["preferences"].append((t1 - started) * 1e6)
        if prefs is None:
            return None
        if prefs.version < floor:
            tally.stale += 1
        if prefs.opt_out:
            tally.opt_out += 1
            return prefs
        channel = prefs.preferred_channel
        template = _TEMPLATES[pick % len(_TEMPLATES)]
        t2 = clock()
        self.source.get_many([(template, channel), ("footer", channel)])
        t3 = clock()
        tally.latencies["templates"].append((t3 - t2) * 1e6)
        result = self.cache.check_rate_limit(
            f"{channel.value}-provider-{self.run_tag}", self.limits[channel], 3600
        )
        t4 = clock()
        tally.latencies["rate_limit"].append((t4 - t3) * 1e6)
        tally.latencies["message"].append((t4 - started) * 1e6)
        if result.allowed:
            tally.allowed += 1
        else:
            tally.rejected += 1
        tally.sent += 1
        return prefs

    def tick(self, n: int) -> None:
        with self._lock:
            self._done += n
            total = self._done
        if self.progress is not None:
            self.progress(total)
        if time.monotonic() > self.deadline:
            self.stop.set()

    def merge(self, tally: _Tally) -> None:
        report = self.report
        with self._lock:
            for op, values in tally.latencies.items():
                report.latencies_us.setdefault(op, []).extend(values)
            report.messages_sent += tally.sent
            report.suppressed_opt_out += tally.opt_out
            report.rate_limit_allowed += tally.allowed
            report.rate_limit_rejected += tally.rejected
            report.updates += tally.updates
            report.update_conflicts += tally.conflicts
            report.stale_reads += tally.stale


def _update(
    repository: CommunicationRepository,
    prefs: ClientPreferences,
    rng: random.Random,
    committed: _Committed,
    tally: _Tally,
) -> None:
    """Change one preference and save it; on a version conflict reload and retry once."""
    for _attempt in range(2):
        changed = prefs.model_copy(
            update={"timezone": rng.choice(_TIMEZONES), "language": rng.choice(_LANGUAGES)}
        )
        try:
            saved = repository.save_client_preferences(changed)
        except StaleVersionError:
            tally.conflicts += 1
            reloaded = repository.get_client_preferences(prefs.client_id)
            if reloaded is None:
                return
            prefs = reloaded
            continue
        committed.committed(saved.client_id, saved.version)
        tally.updates += 1
        return


def remove_demo_keys(cache: CRMCacheManager) -> int:
    """Delete every key under ``cache``'s key prefix, on every primary (SCAN, never
    KEYS); return how many were deleted. For a demo run on a Redis it did not start,
    under a prefix of its own."""
    transport = cache._transport
    if transport is None:
        return 0
    pattern = cache._keys.scan_pattern
    removed = 0
    for node in transport.primaries():
        cursor: bytes = b"0"
        while True:
            cursor, batch = node.execute("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            # One key per DEL: the keys of a batch may live in different cluster slots.
            for key in batch:
                removed += node.execute("DEL", key)
            if cursor == b"0":
                break
    return removed
