"""Security: TLS with certificate verification (and mutual TLS) against a real TLS
redis-server, a least-privilege ACL user, a key-namespace and expiry audit after real
workloads, and no pickle (or other code-executing decoder) anywhere."""

from __future__ import annotations

import datetime
import importlib.util
import logging
import os
import pickle
import re
import secrets
import shlex
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import pytest
import redis
from redis.exceptions import NoPermissionError, ResponseError

import crmcache
from crmcache import ClientPreferences, CRMCacheManager, MessageChannel
from crmcache._demo import DemoConfig, run_demo
from crmcache._scripts import SCRIPT_NAMES, load_script_source
from crmcache._sync.manager import CRMCacheManager as SyncCRMCacheManager
from crmcache.cache_manager import LeaseState, SendClaim
from crmcache.repository import CommunicationRepository
from crmcache.store import SQLPreferenceStore
from crmcache.testing import (
    RedisServer,
    RedisServerError,
    find_redis_server_binary,
    free_loopback_port,
)

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

#: Timeouts for managers that are expected to fail: a refused handshake must not stall.
FAST_FAIL = {"socket_timeout": 2.0, "socket_connect_timeout": 2.0, "pool_timeout": 1.0}


def _unavailable(reason: str) -> None:
    """Skip the test for a missing tool, or fail it under CI=true."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true)", pytrace=False)
    pytest.skip(reason)


def _records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    """The crmcache records at ``level`` or above."""
    return [r for r in caplog.records if r.name.split(".")[0] == "crmcache" and r.levelno >= level]


def _messages(caplog: pytest.LogCaptureFixture, level: int) -> str:
    """The crmcache messages at ``level`` or above, one per line."""
    return "\n".join(r.getMessage() for r in _records(caplog, level))


# -- a throwaway PKI ----------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A throwaway CA and the certificates the tests present (PEM files)."""

    ca: Path
    server_cert: Path  # for IP:127.0.0.1 and DNS:localhost
    server_key: Path
    wrong_host_cert: Path  # signed by the CA, but only for DNS:wrong-host.invalid
    wrong_host_key: Path
    client_cert: Path  # a client certificate for mutual TLS
    client_key: Path


CA_NAME = "crmcache throwaway test CA"
_LEAF_EXTENSIONS = (
    "basicConstraints=critical,CA:FALSE\n"
    "keyUsage=critical,digitalSignature\n"
    "extendedKeyUsage={usage}\n"
    "subjectKeyIdentifier=hash\n"
    "authorityKeyIdentifier=keyid\n"
)


def _pki_paths(folder: Path) -> Pki:
    return Pki(
        ca=folder / "ca.crt",
        server_cert=folder / "server.crt",
        server_key=folder / "server.key",
        wrong_host_cert=folder / "wrong.crt",
        wrong_host_key=folder / "wrong.key",
        client_cert=folder / "client.crt",
        client_key=folder / "client.key",
    )


def _pki_with_openssl(openssl: str, folder: Path) -> Pki:
    """Make the PKI with the ``openssl`` command line tool (EC P-256 keys)."""

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True, timeout=60)

    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run(
        *shlex.split("req -x509 -new -sha256 -days 2 -keyout ca.key -out ca.crt"),
        *new_key,
        *("-subj", f"/CN={CA_NAME}"),
        *shlex.split("-addext basicConstraints=critical,CA:TRUE"),
        *shlex.split("-addext keyUsage=critical,keyCertSign,cRLSign"),
    )
    leaves = {
        "server": ("/CN=127.0.0.1", "serverAuth", "IP:127.0.0.1,DNS:localhost"),
        "wrong": ("/CN=wrong-host.invalid", "serverAuth", "DNS:wrong-host.invalid"),
        "client": ("/CN=crmcache-client", "clientAuth", None),
    }
    for stem, (subject, usage, san) in leaves.items():
        extensions = _LEAF_EXTENSIONS.format(usage=usage)
        if san is not None:
            extensions += f"subjectAltName={san}\n"
        (folder / f"{stem}.ext").write_text(extensions)
        run(*shlex.split(f"req -new -keyout {stem}.key -out {stem}.csr -subj {subject}"), *new_key)
        run(
            *shlex.split(f"x509 -req -in {stem}.csr -CA ca.crt -CAkey ca.key -days 2 -sha256"),
            *shlex.split(
                f"-set_serial {secrets.randbits(63)} -extfile {stem}.ext -out {stem}.crt"
            ),
        )
    return _pki_paths(folder)


def _pki_with_cryptography(folder: Path) -> Pki:
    """Make the PKI with the ``cryptography`` package (EC P-256 keys)."""
    import ipaddress  # noqa: PLC0415

    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: PLC0415

    now = datetime.datetime.now(datetime.UTC)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def key_usage(*, cert_sign: bool) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=not cert_sign,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=cert_sign,
            crl_sign=cert_sign,
            encipher_only=False,
            decipher_only=False,
        )

    def builder(
        subject: x509.Name, issuer: x509.Name, public_key: object
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(public_key),  # type: ignore[arg-type]
                critical=False,
            )
        )

    def save(stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        (folder / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / f"{stem}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        builder(name(CA_NAME), name(CA_NAME), ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(key_usage(cert_sign=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    save("ca", ca_cert, ca_key)
    leaves: dict[str, tuple[str, x509.ObjectIdentifier, list[x509.GeneralName]]] = {
        "server": (
            "127.0.0.1",
            ExtendedKeyUsageOID.SERVER_AUTH,
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
        ),
        "wrong": (
            "wrong-host.invalid",
            ExtendedKeyUsageOID.SERVER_AUTH,
            [x509.DNSName("wrong-host.invalid")],
        ),
        "client": ("crmcache-client", ExtendedKeyUsageOID.CLIENT_AUTH, []),
    }
    for stem, (common_name, usage, sans) in leaves.items():
        key = ec.generate_private_key(ec.SECP256R1())
        cert_builder = (
            builder(name(common_name), ca_cert.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if sans:
            cert_builder = cert_builder.add_extension(
                x509.SubjectAlternativeName(sans), critical=False
            )
        save(stem, cert_builder.sign(ca_key, hashes.SHA256()), key)
    return _pki_paths(folder)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA with server, wrong-hostname and client certificates."""
    folder = tmp_path_factory.mktemp("pki")
    openssl = shutil.which("openssl")
    if openssl is not None:
        return _pki_with_openssl(openssl, folder)
    if importlib.util.find_spec("cryptography") is not None:
        return _pki_with_cryptography(folder)
    _unavailable("neither the openssl CLI nor the cryptography package can make certificates")
    raise AssertionError("unreachable")


# -- TLS servers ---------------------------------------------------------------------------


@dataclass
class TlsServer:
    """A redis-server with a plain port (``server.url``) and a TLS port."""

    server: RedisServer
    tls_port: int
    pki: Pki

    def url(self, *, scheme: str = "rediss", port: int | None = None, **query: object) -> str:
        """A URL for database 0 on the TLS port (or ``port``), with redis-py query args."""
        args = urlencode({name: str(value) for name, value in query.items()})
        return f"{scheme}://127.0.0.1:{port or self.tls_port}/0" + (f"?{args}" if args else "")

    def admin(self) -> redis.Redis:
        """A plain-port client for looking at the server from the inside."""
        return redis.Redis.from_url(self.server.url, protocol=2)


def _start_tls_server(pki: Pki, cert: Path, key: Path, *, auth_clients: str) -> TlsServer:
    """Start a redis-server with TLS on a free loopback port besides its plain port."""
    if find_redis_server_binary() is None:
        _unavailable("no redis-server binary for the TLS tests")
    error: RedisServerError | None = None
    for _ in range(3):  # the TLS port is only free when chosen: retry a lost race
        tls_port = free_loopback_port()
        options = {
            "--tls-port": str(tls_port),
            "--tls-cert-file": str(cert),
            "--tls-key-file": str(key),
            "--tls-ca-cert-file": str(pki.ca),
            "--tls-auth-clients": auth_clients,
        }
        server = RedisServer(extra_args=[part for pair in options.items() for part in pair])
        try:
            server.start()
        except RedisServerError as exc:
            server.stop()
            if "bad directive" in str(exc).lower():
                _unavailable(f"this redis-server was built without TLS: {exc}")
            error = exc
            continue
        return TlsServer(server, tls_port, pki)
    raise AssertionError(f"redis-server with TLS did not start: {error}")


@pytest.fixture(scope="module")
def tls(pki: Pki) -> Iterator[TlsServer]:
    """A TLS redis-server presenting the 127.0.0.1 certificate; client certs not asked."""
    handle = _start_tls_server(pki, pki.server_cert, pki.server_key, auth_clients="no")
    try:
        yield handle
    finally:
        handle.server.stop()


@pytest.fixture(scope="module")
def mtls(pki: Pki) -> Iterator[TlsServer]:
    """A TLS redis-server that requires a client certificate signed by the test CA."""
    handle = _start_tls_server(pki, pki.server_cert, pki.server_key, auth_clients="yes")
    try:
        yield handle
    finally:
        handle.server.stop()


@pytest.fixture
def tls_admin(tls: TlsServer) -> Iterator[redis.Redis]:
    """A plain-port client on the TLS server, flushed before the test."""
    with tls.admin() as client:
        client.flushdb()
        yield client


def _crmcache_clients(
    admin: redis.Redis, *, besides: frozenset[str] = frozenset()
) -> list[dict[str, str]]:
    """CLIENT LIST entries of crmcache's connections (named crmcache / crmcache-health),
    leaving out the client ids in ``besides`` (connections of earlier tests)."""
    return [
        c
        for c in admin.client_list()
        if c["name"].startswith("crmcache") and c["id"] not in besides
    ]


def _client_ids(admin: redis.Redis) -> frozenset[str]:
    """The ids of every connection the server holds now."""
    return frozenset(c["id"] for c in admin.client_list())


def _assert_degraded(cache: CRMCacheManager) -> None:
    """Every call misses, refuses or follows the rate-limit policy; none raises."""
    assert cache.get_client_preferences("tls-client") is None
    assert cache.set_client_preferences(ClientPreferences(client_id="tls-client")) is False
    assert cache.get_template("welcome", "email") is None
    assert cache.set_template("welcome", "email", "x") is False
    assert cache.check_rate_limit("tls-api", limit=5, window=60).degraded is True
    assert cache.health_check() is False


# -- 1. TLS --------------------------------------------------------------------------------


def test_tls_port_negotiates_modern_tls_with_the_test_ca(tls: TlsServer) -> None:
    """The TLS port completes a verified TLS 1.2+ handshake for 127.0.0.1 with the test CA."""
    context = ssl.create_default_context(cafile=str(tls.pki.ca))
    with (
        socket.create_connection(("127.0.0.1", tls.tls_port), timeout=5) as raw_sock,
        context.wrap_socket(raw_sock, server_hostname="127.0.0.1") as tls_sock,
    ):
        assert tls_sock.version() in {"TLSv1.2", "TLSv1.3"}
        cipher_name, _, bits = tls_sock.cipher()
        assert cipher_name
        assert bits >= 128
        assert ("IP Address", "127.0.0.1") in tls_sock.getpeercert()["subjectAltName"]


def test_tls_round_trip_with_verified_certificate(
    tls: TlsServer, tls_admin: redis.Redis, crm_logs: pytest.LogCaptureFixture
) -> None:
    """Preferences, templates and rate limits work over verified TLS; the server sees TLS."""
    prefs = ClientPreferences(client_id="tls-client", timezone="Europe/Paris", version=3)
    earlier = _client_ids(tls_admin)
    with CRMCacheManager(redis_url=tls.url(ssl_ca_certs=tls.pki.ca)) as cache:
        assert cache.health_check() is True
        assert cache.set_client_preferences(prefs) is True
        assert cache.get_client_preferences("tls-client") == prefs
        assert cache.invalidate_client_preferences("tls-client", version=4) is True
        assert cache.get_client_preferences("tls-client") is None
        assert cache.set_template("welcome", MessageChannel.EMAIL, "<h1>Hi</h1>") is True
        assert cache.get_template("welcome", "email") == "<h1>Hi</h1>"
        assert cache.set_templates({("otp", "sms"): "Code {{c}}"}) is True
        assert cache.get_templates([("otp", "sms"), ("welcome", "email")]) == {
            ("otp", "sms"): "Code {{c}}",
            ("welcome", "email"): "<h1>Hi</h1>",
        }
        decisions = [cache.check_rate_limit("tls-api", limit=2, window=60) for _ in range(3)]
        assert [d.allowed for d in decisions] == [True, True, False]
        assert not any(d.degraded for d in decisions)
        stats = cache.get_cache_stats()
        assert stats["total_keys"] == 4  # prefs tombstone, two templates, one counter
        assert stats["redis"] is not None

        # The data really went through this server, and every crmcache connection it
        # holds came in on the TLS port (a plain-port connection would show laddr=port).
        assert tls_admin.get("crm:template:sms:otp") == b"Code {{c}}"
        assert tls_admin.get("crm:prefs:tls-client") == b"T4"
        clients = _crmcache_clients(tls_admin, besides=earlier)
        assert {c["name"] for c in clients} >= {"crmcache", "crmcache-health"}
        assert {c["laddr"] for c in clients} == {f"127.0.0.1:{tls.tls_port}"}
    assert _records(crm_logs, logging.WARNING) == []


def test_tls_untrusted_certificate_is_refused(
    tls: TlsServer, tls_admin: redis.Redis, crm_logs: pytest.LogCaptureFixture
) -> None:
    """Without the CA, rediss:// refuses the self-made certificate: reads miss, logged."""
    tls_admin.set("crm:template:email:welcome", b"served only over a verified channel")
    earlier = _client_ids(tls_admin)
    with CRMCacheManager(redis_url=tls.url(), **FAST_FAIL) as cache:
        _assert_degraded(cache)
        assert cache.get_templates([("welcome", "email")]) == {("welcome", "email"): None}
    assert tls_admin.get("crm:template:email:welcome") == b"served only over a verified channel"
    assert _crmcache_clients(tls_admin, besides=earlier) == []
    logged = _messages(crm_logs, logging.WARNING)
    assert "certificate verify failed" in logged.lower()


def test_tls_certificate_for_another_host_is_refused(
    pki: Pki, crm_logs: pytest.LogCaptureFixture
) -> None:
    """A CA-signed certificate for another hostname is refused; only the name check fails."""
    handle = _start_tls_server(pki, pki.wrong_host_cert, pki.wrong_host_key, auth_clients="no")
    try:
        with CRMCacheManager(redis_url=handle.url(ssl_ca_certs=pki.ca), **FAST_FAIL) as cache:
            _assert_degraded(cache)
        logged = _messages(crm_logs, logging.WARNING)
        assert "certificate verify failed" in logged.lower()
        assert "mismatch" in logged.lower()
        # Control: the chain itself is trusted; only the hostname check refused it.
        control_url = handle.url(ssl_ca_certs=pki.ca, ssl_check_hostname="false")
        with CRMCacheManager(redis_url=control_url) as cache:
            assert cache.health_check() is True
            assert cache.set_template("welcome", "email", "hi") is True
    finally:
        handle.server.stop()


def test_plain_redis_url_on_the_tls_port_fails(
    tls: TlsServer, tls_admin: redis.Redis, crm_logs: pytest.LogCaptureFixture
) -> None:
    """redis:// (no TLS) on the TLS port is turned away: nothing travels in clear text."""
    with CRMCacheManager(redis_url=tls.url(scheme="redis"), **FAST_FAIL) as cache:
        _assert_degraded(cache)
    assert tls_admin.dbsize() == 0
    assert _records(crm_logs, logging.WARNING)


def test_rediss_url_on_the_plain_port_fails_within_the_connect_timeout(
    tls: TlsServer, tls_admin: redis.Redis, crm_logs: pytest.LogCaptureFixture
) -> None:
    """rediss:// on a plain port degrades; the stalled handshake is bounded by the timeout."""
    url = tls.url(port=tls.server.port, ssl_ca_certs=tls.pki.ca)
    with CRMCacheManager(
        redis_url=url, socket_timeout=0.5, socket_connect_timeout=0.5, pool_timeout=0.5
    ) as cache:
        started = time.monotonic()
        assert cache.health_check() is False
        assert time.monotonic() - started < 3.0
        _assert_degraded(cache)
    assert tls_admin.dbsize() == 0
    assert "timeout" in _messages(crm_logs, logging.WARNING).lower()


@pytest.mark.parametrize(
    "options",
    [
        {"ssl_cert_reqs": "none"},
        {"ssl_cert_reqs": "optional", "ssl_ca_certs": "CA"},
        {"ssl_cert_reqs": "required", "ssl_ca_certs": "CA", "ssl_check_hostname": "yes"},
        {"ssl_ca_certs": "CA", "ssl_min_version": int(ssl.TLSVersion.TLSv1_2)},
        {"ssl_ca_certs": "CA", "ssl_ciphers": "ECDHE+AESGCM:ECDHE+CHACHA20"},
        {"ssl_ca_certs": "CA", "ssl_include_verify_flags": "VERIFY_X509_STRICT"},
        {"ssl_ca_certs": "CA", "ssl_exclude_verify_flags": "VERIFY_X509_PARTIAL_CHAIN"},
        {"ssl_ca_certs": "CA", "socket_keepalive": "false", "client_name": "orders-tls"},
    ],
    ids=lambda options: "&".join(f"{k}={v}" for k, v in options.items()),
)
def test_tls_url_options_crmcache_accepts_work(
    tls: TlsServer, tls_admin: redis.Redis, options: dict[str, object]
) -> None:
    """Each TLS option redis_url accepts (crmcache._config.URL_PARAMETERS) works over TLS."""
    query = {name: tls.pki.ca if value == "CA" else value for name, value in options.items()}
    with CRMCacheManager(redis_url=tls.url(**query)) as cache:
        assert cache.health_check() is True
        prefs = ClientPreferences(client_id="tls-options", version=1)
        assert cache.set_client_preferences(prefs) is True
        assert cache.get_client_preferences("tls-options") == prefs
        assert cache.set_template("welcome", "email", "hi") is True
        assert cache.get_templates([("welcome", "email")]) == {("welcome", "email"): "hi"}
        assert cache.check_rate_limit("tls-options", limit=3, window=60).degraded is False
        counters = cache.get_cache_stats()["counters"]
        assert counters["redis_errors"] == 0
        assert counters["unexpected_errors"] == 0
    assert tls_admin.get("crm:template:email:welcome") == b"hi"


def test_mutual_tls_with_client_certificate(
    mtls: TlsServer, crm_logs: pytest.LogCaptureFixture
) -> None:
    """With --tls-auth-clients yes, a CA-signed client certificate from the URL gets in."""
    url = mtls.url(
        ssl_ca_certs=mtls.pki.ca,
        ssl_certfile=mtls.pki.client_cert,
        ssl_keyfile=mtls.pki.client_key,
    )
    with mtls.admin() as admin:
        earlier = _client_ids(admin)
    with CRMCacheManager(redis_url=url) as cache:
        assert cache.health_check() is True
        prefs = ClientPreferences(client_id="mtls-client", version=1)
        assert cache.set_client_preferences(prefs) is True
        assert cache.get_client_preferences("mtls-client") == prefs
        assert cache.check_rate_limit("mtls-api", limit=3, window=60).allowed is True
        with mtls.admin() as admin:
            clients = _crmcache_clients(admin, besides=earlier)
            assert clients
            assert {c["laddr"] for c in clients} == {f"127.0.0.1:{mtls.tls_port}"}
            admin.flushdb()
    assert _records(crm_logs, logging.WARNING) == []


def test_mutual_tls_without_client_certificate_is_refused(
    mtls: TlsServer, crm_logs: pytest.LogCaptureFixture
) -> None:
    """A server that requires client certificates turns away a client without one."""
    with CRMCacheManager(redis_url=mtls.url(ssl_ca_certs=mtls.pki.ca), **FAST_FAIL) as cache:
        _assert_degraded(cache)
    assert _records(crm_logs, logging.WARNING)
    with mtls.admin() as admin:
        assert admin.dbsize() == 0


# -- 2. ACL least privilege ---------------------------------------------------------------

#: Every command crmcache sends, as ACL names. Direct: GET, MGET, SET (also NX PX for
#: leases), MSET, DEL, EVALSHA, SCRIPT LOAD (after NOSCRIPT), PING (health), INFO and SCAN
#: (stats), CLIENT SETNAME (redis-py, for client_name). From the Lua scripts, which run
#: with the caller's ACL: GET, SET, DEL, INCRBY, DECRBY, PEXPIRE, PTTL, TYPE.
LEAST_PRIVILEGE_COMMANDS = (
    "get",
    "mget",
    "set",
    "mset",
    "del",
    "evalsha",
    "script|load",
    "ping",
    "info",
    "scan",
    "client|setname",
    "incrby",
    "decrby",
    "pexpire",
    "pttl",
    "type",
)
ACL_USER = "crm"
ACL_PASSWORD = "crm-pass"


@pytest.fixture
def admin(own_server: RedisServer) -> Iterator[redis.Redis]:
    """The default (all-powerful) user on this test's own server."""
    with redis.Redis.from_url(own_server.url, protocol=2) as client:
        yield client


def _acl_user(
    server: RedisServer, admin: redis.Redis, commands: tuple[str, ...], prefix: str = "crm"
) -> str:
    """Create the crm user: only ``<prefix>:*`` keys, no channels, only ``commands``."""
    admin.execute_command(
        *shlex.split(
            f"ACL SETUSER {ACL_USER} reset on >{ACL_PASSWORD} ~{prefix}:* resetchannels -@all"
        ),
        *(f"+{c}" for c in commands),
    )
    return f"redis://{ACL_USER}:{ACL_PASSWORD}@127.0.0.1:{server.port}/0"


def _every_operation(cache: CRMCacheManager, admin: redis.Redis, prefix: str = "crm") -> list[str]:
    """Run every public operation (and every Lua path) once, the manager's keys under
    ``prefix``; return what went wrong."""
    problems: list[str] = []

    def expect(label: str, ok: bool) -> None:
        if not ok:
            problems.append(label)

    # Preferences: versioned set, stale refusal, tombstones with and without a version.
    v1 = ClientPreferences(client_id="acl-1", version=1)
    expect("set prefs v1", cache.set_client_preferences(v1) is True)
    expect("get prefs v1", cache.get_client_preferences("acl-1") == v1)
    v0 = v1.model_copy(update={"version": 0})
    expect("stale v0 refused", cache.set_client_preferences(v0) is False)
    expect("invalidate version=2", cache.invalidate_client_preferences("acl-1", version=2))
    expect("tombstone T2", admin.get(f"{prefix}:prefs:acl-1") == b"T2")
    expect("tombstone reads as miss", cache.get_client_preferences("acl-1") is None)
    expect("tombstone refuses v1", cache.set_client_preferences(v1) is False)
    v2 = ClientPreferences(client_id="acl-1", version=2, timezone="Asia/Tokyo")
    expect("set prefs v2", cache.set_client_preferences(v2) is True)
    expect("invalidate without version", cache.invalidate_client_preferences("acl-1"))
    expect("tombstone T3", admin.get(f"{prefix}:prefs:acl-1") == b"T3")
    expect("bare tombstone", cache.invalidate_client_preferences("acl-none"))
    expect("bare tombstone T", admin.get(f"{prefix}:prefs:acl-none") == b"T")

    # Templates: single, batched, invalidation.
    expect("set template", cache.set_template("welcome", "email", "<h1>Hi</h1>"))
    expect("get template", cache.get_template("welcome", "email") == "<h1>Hi</h1>")
    expect("set templates", cache.set_templates({("otp", "sms"): "Code", ("a", "whatsapp"): "A"}))
    expect(
        "get templates",
        cache.get_templates([("otp", "sms"), ("a", "whatsapp"), ("none", "email")])
        == {("otp", "sms"): "Code", ("a", "whatsapp"): "A", ("none", "email"): None},
    )
    expect("invalidate template", cache.invalidate_template("welcome", "email"))
    expect("template gone", cache.get_template("welcome", "email") is None)

    # Rate limits: first call (PEXPIRE), later calls (PTTL), refusal (DECRBY), a garbage
    # counter (DEL, fresh INCRBY), a counter without expiry (PEXPIRE again).
    results = [cache.check_rate_limit("acl-api", limit=2, window=60) for _ in range(3)]
    expect("rate limit", [r.allowed for r in results] == [True, True, False])
    expect("rate limit not degraded", not any(r.degraded for r in results))
    admin.set(f"{prefix}:ratelimit:garbage:60", b"not a number")
    garbage = cache.check_rate_limit("garbage", limit=5, window=60)
    expect("garbage counter restarted", (garbage.allowed, garbage.current_count) == (True, 1))
    admin.set(f"{prefix}:ratelimit:no-expiry:60", 1)
    cache.check_rate_limit("no-expiry", limit=5, window=60)
    expect("counter given an expiry", admin.pttl(f"{prefix}:ratelimit:no-expiry:60") > 0)

    # Load leases: acquire (SET NX PX), busy, release (delete_if_equals: TYPE, GET, DEL).
    lease = cache.acquire_load_lease("acl-1", ttl=30)
    expect("lease acquired", lease.state is LeaseState.ACQUIRED)
    expect("lease busy", cache.acquire_load_lease("acl-1", ttl=30).state is LeaseState.BUSY)
    lease.release()
    expect("lease released", admin.exists(f"{prefix}:lease:prefs:acl-1") == 0)

    # Send claims: claim (SET NX PX), duplicate, release (delete_if_equals).
    expect("send claimed", cache.try_claim_send("acl-msg", ttl=30) is SendClaim.CLAIMED)
    expect("send duplicate", cache.try_claim_send("acl-msg", ttl=30) is SendClaim.DUPLICATE)
    expect("send released", cache.release_send("acl-msg") is True)
    expect("send claim gone", admin.exists(f"{prefix}:send:acl-msg") == 0)

    # Corrupt values: evicted (only if unchanged) and counted.
    admin.set(f"{prefix}:prefs:corrupt", b"garbage")
    admin.rpush(f"{prefix}:prefs:wrongtype", b"x")
    admin.set(f"{prefix}:template:email:corrupt", b"\xff\xfe")
    expect("corrupt prefs miss", cache.get_client_preferences("corrupt") is None)
    expect("wrong-type prefs miss", cache.get_client_preferences("wrongtype") is None)
    expect("corrupt template miss", cache.get_template("corrupt", "email") is None)
    for key in (
        f"{prefix}:prefs:corrupt",
        f"{prefix}:prefs:wrongtype",
        f"{prefix}:template:email:corrupt",
    ):
        expect(f"{key} evicted", admin.exists(key) == 0)

    # Scripts flushed (as after a restart): NOSCRIPT, SCRIPT LOAD, EVALSHA again.
    admin.script_flush()
    v3 = ClientPreferences(client_id="acl-1", version=3)
    expect("set after SCRIPT FLUSH", cache.set_client_preferences(v3) is True)

    # The repository: lease, database load, fill, versioned save.
    store = SQLPreferenceStore()
    try:
        repo = CommunicationRepository(db_manager=store, cache_manager=cache)
        saved = repo.save_client_preferences(ClientPreferences(client_id="acl-repo"))
        expect("repository save", saved.version == 1)
        expect("repository read", repo.get_client_preferences("acl-repo") == saved)
        cache.invalidate_client_preferences("acl-repo", version=1)
        expect("repository reload", repo.get_client_preferences("acl-repo") == saved)
        expect("repository filled cache", cache.get_client_preferences("acl-repo") == saved)
    finally:
        store.close()

    # Statistics and health.
    stats = cache.get_cache_stats()
    expect("stats total_keys", isinstance(stats["total_keys"], int) and stats["total_keys"] > 0)
    expect("stats exact", stats["total_keys_exact"] is True)
    expect("stats INFO", stats["redis"] is not None)
    expect("corrupt values counted", stats["counters"]["corrupt_values"] == 3)
    expect("no redis errors", stats["counters"]["redis_errors"] == 0)
    expect("health", cache.health_check() is True)
    return problems


def test_least_privilege_acl_runs_every_operation(
    own_server: RedisServer, admin: redis.Redis, crm_logs: pytest.LogCaptureFixture
) -> None:
    """A user with only ~crm:* and the listed commands runs every operation, no error."""
    url = _acl_user(own_server, admin, LEAST_PRIVILEGE_COMMANDS)
    with CRMCacheManager(redis_url=url) as cache:
        assert _every_operation(cache, admin) == []
    assert _records(crm_logs, logging.ERROR) == []
    unexpected = [
        r.getMessage()
        for r in _records(crm_logs, logging.WARNING)
        if not r.getMessage().startswith("undecodable value")
    ]
    assert unexpected == []


def test_least_privilege_acl_follows_the_key_prefix(
    own_server: RedisServer, admin: redis.Redis, crm_logs: pytest.LogCaptureFixture
) -> None:
    """With key_prefix="tenant-7", a user with only ~tenant-7:* runs every operation, and
    a manager with the default prefix is refused by that user (its keys are crm:*)."""
    url = _acl_user(own_server, admin, LEAST_PRIVILEGE_COMMANDS, prefix="tenant-7")
    with CRMCacheManager(redis_url=url, key_prefix="tenant-7") as cache:
        assert _every_operation(cache, admin, prefix="tenant-7") == []
    assert _records(crm_logs, logging.ERROR) == []
    assert admin.keys("crm:*") == []
    with CRMCacheManager(redis_url=url, **FAST_FAIL) as default:
        assert default.set_template("welcome", "email", "x") is False
    assert "no permissions" in _messages(crm_logs, logging.WARNING)


@pytest.mark.parametrize("missing", LEAST_PRIVILEGE_COMMANDS)
def test_each_granted_command_is_needed(
    own_server: RedisServer,
    admin: redis.Redis,
    crm_logs: pytest.LogCaptureFixture,
    missing: str,
) -> None:
    """Without any one of the granted commands some operation fails: the list is minimal."""
    commands = tuple(c for c in LEAST_PRIVILEGE_COMMANDS if c != missing)
    url = _acl_user(own_server, admin, commands)
    with CRMCacheManager(redis_url=url, **FAST_FAIL) as cache:
        problems = _every_operation(cache, admin)
    assert problems
    refusal = re.compile(r"no permissions|can't run|can't access")
    assert refusal.search(_messages(crm_logs, logging.WARNING))


def test_least_privilege_user_cannot_touch_other_keys(
    own_server: RedisServer, admin: redis.Redis
) -> None:
    """The crm user gets NOPERM outside crm:* and for commands it was not given."""
    admin.set("other:key", b"secret")
    url = _acl_user(own_server, admin, LEAST_PRIVILEGE_COMMANDS)
    with redis.Redis.from_url(url, protocol=2) as crm:
        assert crm.set("crm:mine", b"ok") is True
        for command in (
            ("GET", "other:key"),
            ("SET", "other:key", "x"),
            ("DEL", "other:key"),
            ("MGET", "crm:mine", "other:key"),
            ("FLUSHDB",),
            ("FLUSHALL",),
            ("KEYS", "*"),
            ("CONFIG", "GET", "*"),
            ("EVAL", "return 1", "0"),
            ("SCRIPT", "FLUSH"),
            ("ACL", "LIST"),
            ("PUBLISH", "channel", "x"),
        ):
            with pytest.raises(NoPermissionError):
                crm.execute_command(*command)
        # SCRIPT LOAD does not widen access: scripts run with the caller's ACL.
        sha = crm.script_load("return redis.call('GET', KEYS[1])")
        with pytest.raises(NoPermissionError):
            crm.evalsha(sha, 1, "other:key")
        sneaky = crm.script_load("return redis.call('GET', 'other:key')")
        with pytest.raises(ResponseError, match="can't access"):
            crm.evalsha(sneaky, 1, "crm:mine")
    assert admin.get("other:key") == b"secret"


def test_missing_permission_logs_one_error_and_degrades(
    own_server: RedisServer, admin: redis.Redis, crm_logs: pytest.LogCaptureFixture
) -> None:
    """A user without data commands: calls degrade, never raise, one ERROR line in all."""
    url = _acl_user(own_server, admin, ("client|setname", "ping"))
    with CRMCacheManager(redis_url=url) as cache:
        for i in range(20):
            assert cache.get_client_preferences(f"c-{i}") is None
            assert cache.set_client_preferences(ClientPreferences(client_id=f"c-{i}")) is False
            assert cache.invalidate_client_preferences(f"c-{i}") is False
            assert cache.get_template("welcome", "email") is None
            assert cache.set_template("welcome", "email", "x") is False
            assert cache.get_templates([("welcome", "email")]) == {("welcome", "email"): None}
            result = cache.check_rate_limit("api", limit=5, window=60)
            assert (result.allowed, result.degraded) == (True, True)
            assert cache.acquire_load_lease(f"c-{i}").state is LeaseState.UNAVAILABLE
        errors = _records(crm_logs, logging.ERROR)
        assert len(errors) == 1
        assert "no permissions" in errors[0].getMessage()
        assert cache.get_cache_stats()["counters"]["redis_errors"] >= 20 * 8
    assert admin.dbsize() == 0


def test_partial_permission_does_not_flood_the_log(
    own_server: RedisServer, admin: redis.Redis, crm_logs: pytest.LogCaptureFixture
) -> None:
    """One missing command (EVALSHA) amid working ones is logged once, not once per call."""
    commands = tuple(c for c in LEAST_PRIVILEGE_COMMANDS if c != "evalsha")
    url = _acl_user(own_server, admin, commands)
    with CRMCacheManager(redis_url=url) as cache:
        for _ in range(10):
            assert cache.get_template("welcome", "email") is None  # allowed: a real miss
            assert cache.check_rate_limit("api", limit=5, window=60).degraded is True
        assert len(_records(crm_logs, logging.ERROR)) == 1
        assert "reachable again" not in _messages(crm_logs, logging.WARNING)


def test_refused_incrby_leaves_the_rate_limit_counter_alone(
    own_server: RedisServer, admin: redis.Redis
) -> None:
    """A refused INCRBY inside the script degrades without deleting the live counter."""
    commands = tuple(c for c in LEAST_PRIVILEGE_COMMANDS if c != "incrby")
    url = _acl_user(own_server, admin, commands)
    admin.set("crm:ratelimit:api:60", 7, px=60_000)
    with CRMCacheManager(redis_url=url) as cache:
        assert cache.check_rate_limit("api", limit=10, window=60).degraded is True
    assert admin.get("crm:ratelimit:api:60") == b"7"


def test_refused_get_never_bypasses_the_stale_write_check(
    own_server: RedisServer, admin: redis.Redis
) -> None:
    """If the script cannot read the key, the versioned set must refuse, not overwrite."""
    commands = tuple(c for c in LEAST_PRIVILEGE_COMMANDS if c != "get")
    url = _acl_user(own_server, admin, commands)
    admin.set("crm:prefs:c-1", b"T9", px=60_000)
    with CRMCacheManager(redis_url=url) as cache:
        assert cache.set_client_preferences(ClientPreferences(client_id="c-1", version=1)) is False
    assert admin.get("crm:prefs:c-1") == b"T9"


# -- 3. Key audit ---------------------------------------------------------------------------


def _audit_keys(client: redis.Redis) -> dict[str, int]:
    """SCAN every key: all under crm:, templates without TTL, everything else with one.

    Returns:
        How many keys of each kind (the second key segment: prefs, template, ...).
    """
    keys = [key.decode() for key in client.scan_iter(count=1000)]
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.pttl(key)
    ttls = pipe.execute()
    kinds: dict[str, int] = {}
    outside = [key for key in keys if not key.startswith("crm:")]
    assert outside == [], "keys outside the crm: namespace"
    for key, ttl in zip(keys, ttls, strict=True):
        kind = key.split(":")[1]
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind == "template":
            assert ttl == -1, f"template {key} has a TTL ({ttl} ms)"
        else:
            # -2: the key expired between SCAN and PTTL, so it had a TTL.
            assert ttl > 0 or ttl == -2, f"{key} has no TTL ({ttl})"
    return kinds


def test_workload_keys_are_namespaced_and_expire(cache: CRMCacheManager, raw: redis.Redis) -> None:
    """After a mixed workload every key is crm:*, and only templates live without a TTL."""
    for i in range(10):
        prefs = ClientPreferences(client_id=f"audit-{i}", version=i)
        assert cache.set_client_preferences(prefs, ttl=600 if i % 2 else None)
    assert cache.invalidate_client_preferences("audit-1")
    assert cache.invalidate_client_preferences("audit-2", version=7)
    assert cache.invalidate_client_preferences("audit-never-cached")
    assert cache.set_template("welcome", "email", "<h1>Hi</h1>")
    assert cache.set_templates({(f"t{i}", "sms"): f"text {i}" for i in range(5)})
    assert cache.invalidate_template("t0", "sms")
    for api, limit, window in (("sms", 3, 60), ("email", 100, 3600), ("whatsapp", 1, 86400)):
        for _ in range(5):
            cache.check_rate_limit(api, limit=limit, window=window, cost=1)
    cache.check_rate_limit("bulk", limit=100, window=60, cost=30)
    held = cache.acquire_load_lease("audit-held", ttl=60)  # never released: must expire
    assert held.state is LeaseState.ACQUIRED
    released = cache.acquire_load_lease("audit-released")
    released.release()

    store = SQLPreferenceStore()
    try:
        repo = CommunicationRepository(db_manager=store, cache_manager=cache)
        for i in range(10):
            saved = repo.save_client_preferences(ClientPreferences(client_id=f"repo-{i}"))
            assert repo.get_client_preferences(f"repo-{i}") == saved
            cache.invalidate_client_preferences(f"repo-{i}", version=saved.version)
            assert repo.get_client_preferences(f"repo-{i}") == saved  # load and fill
            changed = saved.model_copy(update={"language": "fr"})
            assert repo.save_client_preferences(changed).version == saved.version + 1
        assert repo.get_client_preferences("repo-missing") is None
    finally:
        store.close()

    kinds = _audit_keys(raw)
    assert kinds.get("prefs", 0) >= 20
    assert kinds.get("template") == 5
    assert kinds.get("ratelimit") == 4
    assert kinds.get("lease") == 1


@pytest.mark.slow
@pytest.mark.sync_only  # the demo (a CLI workload) runs on the sync facade only
def test_demo_keys_are_namespaced_and_expire(redis_url: str, raw: redis.Redis) -> None:
    """The demo workload's keys on a clean db are all crm:*, and only templates lack a TTL.

    Run in-process: the CLI removes what it wrote on a --redis-url Redis when it ends
    (tests/test_cli.py), so only the workload itself can be audited."""
    with SyncCRMCacheManager(redis_url=redis_url) as manager:
        report = run_demo(DemoConfig(clients=200, messages=1000, threads=2, seed=7), manager)
    assert report.stale_reads == 0
    kinds = _audit_keys(raw)
    assert kinds.get("prefs", 0) > 0
    assert kinds.get("template", 0) > 0
    assert kinds.get("ratelimit", 0) > 0


# -- 4. No pickle ---------------------------------------------------------------------------

_FORBIDDEN_PYTHON = {
    "imports pickle/marshal/shelve/dill": re.compile(
        r"^\s*(?:import|from)\s+(?:c?pickle|_pickle|marshal|shelve|dill|cloudpickle|jsonpickle)\b",
        re.MULTILINE,
    ),
    "pickle.": re.compile(r"\bc?pickle\."),
    "marshal.": re.compile(r"\bmarshal\."),
    "eval(": re.compile(r"(?<![\w])eval\s*\("),
    "exec(": re.compile(r"(?<![\w])exec\s*\("),
}
_FORBIDDEN_LUA = {
    "loadstring(": re.compile(r"\bloadstring\s*\("),
    "load(": re.compile(r"(?<![\w.])load\s*\("),
    "cmsgpack": re.compile(r"\bcmsgpack\b"),
}


def test_package_source_has_no_pickle_marshal_or_eval() -> None:
    """No .py or .lua file crmcache ships or runs imports pickle/marshal or calls eval."""
    package = Path(crmcache.__file__).parent
    sources = {path: path.read_text(encoding="utf-8") for path in package.rglob("*.py")}
    sources |= {path: path.read_text(encoding="utf-8") for path in package.rglob("*.lua")}
    # An editable install runs the scripts from the source tree: check what actually runs.
    sources |= {Path(f"lua/{name}.lua"): load_script_source(name) for name in SCRIPT_NAMES}
    assert len([p for p in sources if p.suffix == ".py"]) >= 10
    found = []
    for path, text in sources.items():
        patterns = _FORBIDDEN_PYTHON if path.suffix == ".py" else _FORBIDDEN_LUA
        found += [f"{path}: {label}" for label, rx in patterns.items() if rx.search(text)]
    assert found == []


_UNPICKLED: list[str] = []


def _record_unpickling(tag: str) -> dict[str, object]:
    """What unpickling a :class:`_Canary` calls: records that it happened."""
    _UNPICKLED.append(tag)
    return {"client_id": "pickled", "version": 1}


class _Canary:
    """Pickles to a call of :func:`_record_unpickling`: unpickling it is detectable."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_record_unpickling, ("unpickled",))


def test_pickled_payloads_are_corrupt_values_never_unpickled(
    cache: CRMCacheManager, raw: redis.Redis, crm_logs: pytest.LogCaptureFixture
) -> None:
    """Pickled bytes at a crm key are misses, deleted and counted, and never unpickled."""
    canary = pickle.dumps(_Canary())
    assert pickle.loads(canary) == {"client_id": "pickled", "version": 1}  # noqa: S301
    assert _UNPICKLED == ["unpickled"]  # the canary works
    _UNPICKLED.clear()

    planted = {
        "crm:prefs:pickled-dict": pickle.dumps({"client_id": "pickled-dict", "version": 1}),
        "crm:prefs:pickled-canary": canary,
        # Passes the "<version>:" prefix check, so the JSON decoder sees the pickle.
        "crm:prefs:prefixed-canary": b"1:" + canary,
        "crm:template:email:pickled": pickle.dumps({"body": "<h1>Hi</h1>"}),
        "crm:template:sms:pickled": canary,
    }
    raw.mset(planted)
    assert cache.get_client_preferences("pickled-dict") is None
    assert cache.get_client_preferences("pickled-canary") is None
    assert cache.get_client_preferences("prefixed-canary") is None
    assert cache.get_template("pickled", "email") is None
    assert cache.get_templates([("pickled", "sms")]) == {("pickled", "sms"): None}

    assert _UNPICKLED == []
    assert raw.exists(*planted) == 0
    stats = cache.get_cache_stats()
    assert stats["counters"]["corrupt_values"] == len(planted)
    assert stats["by_kind"]["preferences"]["hits"] == 0
    assert stats["by_kind"]["templates"]["hits"] == 0
    evictions = [r for r in _records(crm_logs, logging.WARNING) if "undecodable" in r.getMessage()]
    assert len(evictions) == len(planted)
