"""Issue 11, finding 8: a server that echoes the password in its error replies.

A server with ``AUTH`` renamed (``rename-command AUTH ""``) answers redis-py's ``AUTH
<password>`` with "unknown command 'AUTH', with args beginning with: '<password...>'":
the password truncated to 128 characters, newlines turned into spaces. Masking only the
exact password let about 124 characters of a 191-character one through, logged at
WARNING. Here a real server echoes a long password with newlines, and no run of 8 of its
characters may appear in any log record, exception, repr, stats or CLI output.
"""

from __future__ import annotations

import json
import logging
import os
import random
import string
import subprocess
import sys
import time
import traceback
from collections.abc import Iterable, Iterator
from urllib.parse import quote

import pytest
import redis

from crmcache import ClientPreferences, ConfigurationError, CRMCacheManager
from crmcache._guard import MIN_SECRET_RUN, SecretMask, describe_failure, is_handshake_error
from crmcache.testing import RedisServer, find_redis_server_binary
from helpers import poll

pytestmark = pytest.mark.skipif(
    find_redis_server_binary() is None, reason="needs a redis-server binary"
)


def _password() -> str:
    """191+ characters: letters, digits, punctuation (quotes, backslash, URL delimiters)
    and line breaks, deterministic."""
    rng = random.Random(11)
    alphabet = string.ascii_letters + string.digits + "!#$%&()*+,-./:;<=>?@[]^_{|}~'\"\\"
    parts = []
    for i in range(10):
        parts.append("".join(rng.choice(alphabet) for _ in range(19)))
        parts.append("\r\n" if i % 3 == 0 else "\n")
    return "".join(parts)


PASSWORD = _password()
#: Timeouts for managers that are expected to fail: a refused handshake must not stall.
FAST = {"socket_timeout": 2.0, "socket_connect_timeout": 2.0, "pool_timeout": 1.0}


def password_runs(password: str = PASSWORD) -> frozenset[str]:
    """Every run of 8 characters of the password, as is, as Redis echoes it (CR and LF
    as spaces), and as repr() escapes either."""
    spaced = password.replace("\r", " ").replace("\n", " ")
    forms = [password, spaced, repr(password)[1:-1], repr(spaced)[1:-1]]
    return frozenset(form[i : i + 8] for form in forms for i in range(len(form) - 7))


RUNS = password_runs()


def leaks(text: str, runs: frozenset[str] = RUNS) -> list[str]:
    """The runs of the password found in ``text``."""
    return [text[i : i + 8] for i in range(len(text) - 7) if text[i : i + 8] in runs]


def full_text(exc: BaseException) -> str:
    """Everything a traceback of ``exc`` would print, chained exceptions included."""
    return "".join(traceback.format_exception(exc))


def record_texts(records: Iterable[logging.LogRecord]) -> Iterator[str]:
    """Everything a handler could print of each record."""
    for record in records:
        yield record.getMessage()
        yield repr(record.args)
        if record.exc_info and record.exc_info[1] is not None:
            yield full_text(record.exc_info[1])
        if record.exc_text:
            yield record.exc_text


@pytest.fixture(scope="module")
def echoing_server() -> Iterator[RedisServer]:
    """A Redis whose AUTH command is renamed away: AUTH <password> is echoed back."""
    with RedisServer(extra_args=["--rename-command", "AUTH", ""]) as server:
        yield server


def password_url(server: RedisServer, password: str = PASSWORD) -> str:
    """The server's URL with ``password`` (percent-encoded) in its authority."""
    return f"redis://:{quote(password, safe='')}@127.0.0.1:{server.port}/0"


def test_the_server_really_echoes_the_password(echoing_server: RedisServer) -> None:
    """Positive control: redis-py's own error carries runs of the password (the thing the
    other tests must keep out of sight)."""
    client = redis.Redis(host="127.0.0.1", port=echoing_server.port, password=PASSWORD, protocol=2)
    with pytest.raises(redis.ResponseError) as info:
        client.ping()
    client.close()
    assert "unknown command 'AUTH'" in str(info.value)
    assert len(leaks(str(info.value))) > 100
    assert is_handshake_error(info.value)


def test_no_run_of_the_password_in_logs_reprs_stats_or_errors(
    echoing_server: RedisServer, crm_logs: pytest.LogCaptureFixture
) -> None:
    """Every call degrades; the handshake's reply is never logged, only a fixed description
    with the error class; no 8-character run of the password is shown anywhere (before:
    about 124 characters of it at WARNING, from every call and from health_check)."""
    url = password_url(echoing_server)
    texts: list[str] = []
    manager = CRMCacheManager(url, near_cache=True, near_cache_protocol=2, **FAST)
    try:
        texts += [repr(manager), str(manager), repr(manager.settings), str(manager.settings)]
        for _ in range(7):  # enough to open the breaker, were these outages
            assert manager.get_client_preferences("c1") is None
        assert manager.set_client_preferences(ClientPreferences(client_id="c1")) is False
        assert manager.invalidate_client_preferences("c1") is False
        assert manager.get_template("welcome", "email") is None
        assert manager.set_template("welcome", "email", "hi") is False
        assert manager.set_templates({("welcome", "email"): "hi"}) is False
        assert manager.invalidate_template("welcome", "email") is False
        assert manager.get_templates([("welcome", "email")]) == {("welcome", "email"): None}
        assert manager.check_rate_limit("api", 10).degraded is True
        lease = manager.acquire_load_lease("c1")
        texts.append(repr(lease))
        assert manager.health_check() is False
        # The near cache's listener fails its handshake too, and says so.
        poll(lambda: any("near cache off" in r.getMessage() for r in crm_logs.records))
        stats = manager.get_cache_stats()
        texts += [json.dumps(stats, default=str), repr(manager.get_stats())]
        assert stats["counters"]["redis_errors"] > 0
    finally:
        manager.close()

    records = [r for r in crm_logs.records if r.name.startswith("crmcache")]
    texts += list(record_texts(records))
    texts.append(crm_logs.text)
    assert [leak for text in texts for leak in leaks(text)] == []

    withheld = [r for r in records if "server reply withheld" in r.getMessage()]
    assert withheld, "no handshake failure was logged: the test proves nothing"
    for record in withheld:
        message = record.getMessage()
        assert "ResponseError" in message
        assert "the command 'AUTH'" in message
        assert "with args beginning with" not in message
    # A refused handshake needs a person: logged at ERROR, as bad credentials are.
    assert any(r.levelno == logging.ERROR for r in withheld)
    assert any("health check failed" in r.getMessage() for r in withheld)
    assert any("near cache off" in r.getMessage() for r in withheld)


def test_configuration_errors_mask_runs_of_the_password(echoing_server: RedisServer) -> None:
    """A part of the password pasted into another URL option is masked in the error (before:
    only the whole password was)."""
    base = password_url(echoing_server)
    for value in (PASSWORD[:30], PASSWORD[5:40].replace("\n", " ")):
        with pytest.raises(ConfigurationError, match="socket_timeout") as info:
            CRMCacheManager(f"{base}?socket_timeout={quote(value, safe='')}")
        assert leaks(full_text(info.value)) == []
        assert "***" in str(info.value)
    with pytest.raises(ConfigurationError) as info:
        CRMCacheManager(f"{base}?foo=bar")
    assert leaks(full_text(info.value)) == []


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m crmcache ARGS``, run to completion."""
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "CACHE_TTL"}}
    return subprocess.run(
        [sys.executable, "-m", "crmcache", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


@pytest.mark.sync_only
@pytest.mark.parametrize("command", [["health", "--timeout", "2"], ["stats"], ["stats", "--json"]])
def test_cli_never_prints_a_run_of_the_password(
    echoing_server: RedisServer, command: list[str]
) -> None:
    """`crmcache health` and `crmcache stats` (with warnings shown) report the failure
    without the server's reply."""
    proc = run_cli("-vv", command[0], "--redis-url", password_url(echoing_server), *command[1:])
    assert proc.returncode == 1, proc.stderr
    output = proc.stdout + proc.stderr
    assert leaks(output) == []
    assert "server reply withheld" in output


# -- SecretMask and the handshake description, without a server ---------------------------


def test_secret_mask_masks_every_run_of_the_password() -> None:
    """The whole password, any run of 8 of its characters, and the forms Redis and repr()
    give it are masked; text around them is kept."""
    mask = SecretMask(PASSWORD)
    echoed = PASSWORD.replace("\r", " ").replace("\n", " ")[:128]
    for text in (
        f"before {PASSWORD} after",
        f"unknown command 'AUTH', with args beginning with: '{echoed}'",
        f"args: {PASSWORD[17:25]!r} and {PASSWORD[100:140]!r}",
        repr(PASSWORD.encode()),
        quote(PASSWORD, safe=""),
    ):
        masked = mask(text)
        assert leaks(masked) == [], masked
        assert "***" in masked
    assert mask("unknown command 'AUTH', with args").startswith("unknown command 'AUTH'")
    assert mask("nothing secret here") == "nothing secret here"
    assert mask(f"x{PASSWORD[: MIN_SECRET_RUN - 1]}y") == f"x{PASSWORD[: MIN_SECRET_RUN - 1]}y"


def test_secret_mask_short_and_missing_passwords() -> None:
    """A password shorter than the run length is masked whole; no password masks
    nothing."""
    assert SecretMask("pw")("user pw in text") == "user *** in text"
    assert SecretMask(None)("pw") == "pw"
    assert SecretMask("")("pw") == "pw"


def test_secret_mask_cost_is_linear() -> None:
    """A 200 KB traceback is scrubbed in well under a second (error paths only)."""
    mask = SecretMask(PASSWORD)
    text = ("Traceback line without secrets, some redis-py frames\n" * 4000) + PASSWORD
    started = time.perf_counter()
    masked = mask(text)
    assert time.perf_counter() - started < 1.0
    assert leaks(masked) == []


def test_errors_outside_the_handshake_keep_their_text() -> None:
    """Only handshake errors are withheld: a refusal of a data command is still shown."""
    exc = redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind")
    assert is_handshake_error(exc) is False
    assert describe_failure(exc, SecretMask(PASSWORD)) == f"ResponseError: {exc}"
