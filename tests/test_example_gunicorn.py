"""examples/gunicorn.conf.py: its pool arithmetic is consistent, and gunicorn with uvicorn
workers serves examples/fastapi_app.py from it against a real server, then stops cleanly
(each worker's lifespan closes its manager: no connection of theirs is left)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import httpx
import pytest
import redis

from crmcache.testing import free_loopback_port
from helpers import poll

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "gunicorn.conf.py"
ENV = ("WEB_CONCURRENCY", "BIND", "REPLICAS", "REDIS_MAXCLIENTS")


def load_config() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gunicorn_conf", CONFIG)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_values_are_consistent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Uvicorn workers, no preload (one manager per worker, after the fork), and the
    connections of every worker of every replica fit under Redis's maxclients."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WEB_CONCURRENCY", "4")
    conf = load_config()
    assert conf.worker_class == "uvicorn_worker.UvicornWorker"
    assert conf.wsgi_app == "examples.fastapi_app:app"
    assert conf.preload_app is False
    assert conf.workers == 4
    assert conf.CONNECTIONS_PER_WORKER == conf.PIPELINE_CONNECTIONS + 5  # + templates' own
    assert conf.TOTAL_CONNECTIONS == conf.REPLICAS * 4 * conf.CONNECTIONS_PER_WORKER
    assert conf.TOTAL_CONNECTIONS + conf.RESERVED_CLIENTS <= conf.REDIS_MAXCLIENTS
    assert f"CRMCACHE_PIPELINE_CONNECTIONS={conf.PIPELINE_CONNECTIONS}" in conf.raw_env
    assert conf.graceful_timeout > 5  # more than the manager's drain_timeout
    monkeypatch.setenv("REPLICAS", "2000")
    with pytest.raises(ValueError, match="exceeds Redis maxclients"):
        load_config()


def crmcache_clients(raw: redis.Redis) -> int:
    """Connections on the server other than this test's own."""
    me = raw.client_id()
    return sum(1 for client in raw.client_list() if int(client["id"]) != me)


@pytest.mark.slow
@pytest.mark.single_only
def test_gunicorn_serves_the_fastapi_app(redis_url: str, raw: redis.Redis, tmp_path: Path) -> None:
    port = free_loopback_port()
    env = {k: v for k, v in os.environ.items() if k not in ENV}
    env |= {"BIND": f"127.0.0.1:{port}", "WEB_CONCURRENCY": "2", "REDIS_URL": redis_url}
    log = tmp_path / "gunicorn.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", str(CONFIG), "--error-logfile", str(log)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    conf = load_config()
    try:

        def healthy() -> bool:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                return httpx.get(f"{base}/health", timeout=2).json() == {"status": "ok"}
            except httpx.HTTPError:
                return False

        def started() -> bool:
            assert proc.poll() is None, proc.communicate()[1]
            return log.exists() and log.read_text().count("Application startup complete") == 2

        # Both workers' lifespans ran (each opened its manager), then /health answers.
        poll(started, timeout=60, what="both workers started", interval=0.1)
        poll(healthy, timeout=30, what="gunicorn serving /health", interval=0.1)
        sent = httpx.post(f"{base}/send/client-2", timeout=10)
        assert sent.status_code == 200, sent.text
        assert sent.json() == {
            "client_id": "client-2",
            "channel": "sms",
            "text": "Welcome, {name}",
        }
        assert raw.exists("crm:prefs:client-2") == 1
        # Two workers, each within its share of connections.
        assert 0 < crmcache_clients(raw) <= 2 * conf.CONNECTIONS_PER_WORKER
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = log.read_text()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert err.count("Application shutdown complete") == 2  # each worker's lifespan ran
    # Every manager closed its connections (the server notices at once, or nearly).
    poll(lambda: crmcache_clients(raw) == 0, timeout=10, what="the workers' connections closed")
