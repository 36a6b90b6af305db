"""examples/threaded_worker.py against a real server: a thread pool drains a queue of
send jobs through one manager; duplicates are skipped, rate limits refuse, a failed send
is refunded and its claim released, and the manager is closed at the end."""

from __future__ import annotations

import importlib.util
import queue
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "threaded_worker.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("threaded_worker", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_threaded_worker_drains_the_queue(
    redis_url: str, raw: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    example = load_example()
    monkeypatch.setattr(example, "CLIENT_LIMIT", 3)
    sent: list[tuple[str, str]] = []
    lock = threading.Lock()

    def gateway(channel: Any, client_id: str, text: str) -> None:
        if client_id == "client-3":
            raise ConnectionError("gateway down")  # every send to client-3 fails
        with lock:
            sent.append((client_id, text))

    worker = example.SendWorker(redis_url, gateway, threads=4)
    jobs: queue.Queue[Any] = queue.Queue()
    # client-1: 5 distinct messages (3 allowed by CLIENT_LIMIT), each queued twice;
    # client-3: 5 messages whose sends fail; one job for a client nobody knows.
    for i in range(5):
        jobs.put(example.SendJob(f"c1-{i}", "client-1"))
        jobs.put(example.SendJob(f"c1-{i}", "client-1"))
        jobs.put(example.SendJob(f"c3-{i}", "client-3"))
    jobs.put(example.SendJob("who", "client-404"))
    for _ in range(worker.threads):
        jobs.put(None)
    outcomes = worker.run(jobs)

    assert sum(outcomes.values()) == 16
    assert outcomes["unknown"] == 1
    # Every failure was refunded: client-3's five sends were all tried, none refused.
    assert outcomes["failed"] == 5
    assert raw.exists(*[f"crm:send:c3-{i}" for i in range(5)]) == 0  # claims released
    # client-1: three sent, each once; the other two were refused (claims released, so
    # their second copy was tried again and refused again, not skipped as a duplicate,
    # unless it came while the first copy's claim was still held).
    assert outcomes["sent"] == 3
    assert sorted(client for client, _ in sent) == ["client-1"] * 3
    assert outcomes["rate_limited"] + outcomes["duplicate"] == 7
    assert outcomes["rate_limited"] >= 2
    assert sent[0][1] == "<h1>Welcome</h1>"  # client-1 (odd) prefers email
    assert worker.cache.health_check() is False  # closed
