"""Settings: arguments, environment variables and defaults, resolved in one place.

Environment variables (read here and nowhere else):

``REDIS_URL``         where Redis is (``redis://``, ``rediss://``, ``unix://``, a Sentinel
                      group: ``redis+sentinel://`` / ``rediss+sentinel://``, or a Redis
                      Cluster: ``redis+cluster://`` / ``rediss+cluster://``)
``CACHE_TTL``         seconds a cached preference lives (positive integer)
``ENABLE_CACHING``    ``true``/``false`` (also ``1``/``0``, ``yes``/``no``, ``on``/``off``)
``CACHE_KEY_PREFIX``  the prefix of every key (default ``crm``: ``crm:prefs:<id>`` ...)

An explicit argument always wins over the environment, which wins over the defaults.

The URL's query string is checked here too (see :data:`URL_PARAMETERS`): the options
redis-py would pass to its connections are accepted only if crmcache can honour them,
their values must parse, and anything else raises :class:`ConfigurationError` at
construction, never at a call. A ``socket_timeout`` / ``socket_connect_timeout`` in the
URL wins over the argument (redis-py's rule for URL options); the settings show the
value in force.

Every duration given in seconds (``socket_timeout``, ``socket_connect_timeout``,
``pool_timeout``, ``near_cache_ttl``, ``breaker_max_backoff``, and the URL's ``socket_timeout``,
``socket_connect_timeout`` and ``health_check_interval``) is at most
:data:`MAX_DURATION`, one day: far longer waits overflow the operating system's timers
(``OverflowError`` on every call), and none means anything a day would not.
"""

from __future__ import annotations

import functools
import math
import os
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, TypeVar, cast
from urllib.parse import parse_qsl, unquote, urlsplit

from pydantic import TypeAdapter, ValidationError

from ._errors import ConfigurationError
from ._guard import DEFAULT_FAILURE_THRESHOLD, DEFAULT_MAX_RESET_TIMEOUT, SecretMask
from ._keys import DEFAULT_KEY_PREFIX, check_key_prefix
from ._validate import MAX_TTL, positive_int

__all__ = [
    "DEFAULT_BREAKER_FAILURES",
    "DEFAULT_BREAKER_MAX_BACKOFF",
    "DEFAULT_CACHE_TTL",
    "DEFAULT_ENABLED",
    "DEFAULT_KEY_PREFIX",
    "DEFAULT_LEASE_TTL",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_ID_LENGTH",
    "DEFAULT_MAX_TEMPLATE_BYTES",
    "DEFAULT_NEAR_CACHE_SIZE",
    "DEFAULT_NEAR_CACHE_TTL",
    "DEFAULT_PIPELINE_CONNECTIONS",
    "DEFAULT_POOL_TIMEOUT",
    "DEFAULT_RATE_LIMIT_WINDOW",
    "DEFAULT_REDIS_URL",
    "DEFAULT_SOCKET_CONNECT_TIMEOUT",
    "DEFAULT_SOCKET_TIMEOUT",
    "DEFAULT_TOMBSTONE_TTL",
    "MAX_DURATION",
    "MAX_PIPELINE_CONNECTIONS",
    "MAX_SOCKET_READ_SIZE",
    "MAX_TTL",
    "URL_PARAMETERS",
    "CacheSettings",
    "ClusterTarget",
    "RateLimitPolicy",
    "SendGuardPolicy",
    "SentinelTarget",
    "cluster_target",
    "is_cluster_url",
    "mask_url",
    "resolve_settings",
    "sentinel_target",
    "url_password",
]

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
#: Shared connections per node when the data path is auto-pipelined.
DEFAULT_PIPELINE_CONNECTIONS = 1
#: More shared connections than this buy nothing (each already carries every caller).
MAX_PIPELINE_CONNECTIONS = 64
DEFAULT_ENABLED = True
#: Client preferences live one hour (spec: "good balance between freshness and performance").
DEFAULT_CACHE_TTL = 3600
DEFAULT_MAX_CONNECTIONS = 10
#: Consecutive connection failures that open the circuit breaker.
DEFAULT_BREAKER_FAILURES = DEFAULT_FAILURE_THRESHOLD
#: Longest wait, in seconds, between two probes of an open breaker (it doubles from 1 s).
DEFAULT_BREAKER_MAX_BACKOFF = DEFAULT_MAX_RESET_TIMEOUT
DEFAULT_SOCKET_TIMEOUT = 5.0
DEFAULT_SOCKET_CONNECT_TIMEOUT = 5.0
#: How long a caller waits for a free pooled connection before the call degrades.
#: A wait timeout means "saturated", not "down", so it stays short.
DEFAULT_POOL_TIMEOUT = 1.0
#: Seconds an invalidation tombstone keeps stale preference writes out.
DEFAULT_TOMBSTONE_TTL = 30
DEFAULT_RATE_LIMIT_WINDOW = 60
#: Seconds a database-load lease lives if its holder never releases it.
DEFAULT_LEASE_TTL = 2.0
#: Longest client id, template name or API name accepted, in characters.
DEFAULT_MAX_ID_LENGTH = 256
#: Near cache: most values held per process, and seconds one is served at most.
DEFAULT_NEAR_CACHE_SIZE = 10_000
DEFAULT_NEAR_CACHE_TTL = 30.0
#: Largest template accepted by set_template, in UTF-8 bytes.
DEFAULT_MAX_TEMPLATE_BYTES = 1024 * 1024
#: Longest timeout or near-cache TTL accepted, in seconds (one day). A socket timeout
#: past about 292 years overflows the C time types (every call then raised OverflowError),
#: and a lock wait past ``threading.TIMEOUT_MAX`` does too.
MAX_DURATION = 86400.0
#: Largest ``socket_read_size`` accepted in the URL, in bytes (16 MiB; redis-py reads
#: 64 KiB at a time by default). Each read allocates a buffer of this size.
MAX_SOCKET_READ_SIZE = 16 * 1024 * 1024

T = TypeVar("T")

RateLimitPolicy = Literal["open", "closed", "local"]
_POLICIES: dict[str, RateLimitPolicy] = {"open": "open", "closed": "closed", "local": "local"}
#: What ``claim_send`` answers when Redis cannot be asked: ``"open"`` True (send: a
#: duplicate is possible), ``"closed"`` False (do not send: the message is dropped as if
#: it were a duplicate).
SendGuardPolicy = Literal["open", "closed"]
_SEND_GUARD_POLICIES: dict[str, SendGuardPolicy] = {"open": "open", "closed": "closed"}
_SCHEMES = frozenset({"redis", "rediss", "unix"})
#: Sentinel schemes, each with the scheme of the data nodes it names.
_SENTINEL_SCHEMES: Mapping[str, str] = MappingProxyType(
    {"redis+sentinel": "redis", "rediss+sentinel": "rediss"}
)
#: Cluster schemes, each with the scheme of the nodes it names.
_CLUSTER_SCHEMES: Mapping[str, str] = MappingProxyType(
    {"redis+cluster": "redis", "rediss+cluster": "rediss"}
)
#: The port of a cluster seed node named without one.
DEFAULT_CLUSTER_PORT = 6379
#: The port of a sentinel named without one.
DEFAULT_SENTINEL_PORT = 26379
_QUERY_PASSWORD_RE = re.compile(r"(?P<key>[?&](?:ssl_)?password=)[^&#]*", re.IGNORECASE)


def mask_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``.

    Args:
        url: a Redis URL, possibly ``redis://user:secret@host:port/db``.

    Returns:
        The same URL with the password (in the authority, a ``password=`` query
        parameter, or the TLS key's ``ssl_password=``) masked; usernames, hosts and
        ports are kept for diagnosis.
    """
    head, sep, rest = url.partition("://")
    if sep and "@" in rest:
        # Split at the LAST "@", as urllib and redis-py do: a password may contain "@".
        userinfo, _, after = rest.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        if colon:
            url = f"{head}://{user}:***@{after}"
    return _QUERY_PASSWORD_RE.sub(lambda m: f"{m['key']}***", url)


def url_password(url: str) -> str | None:
    """The password in ``url`` (authority or ``password=`` query parameter), if any."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return None
    if password:
        return unquote(password)
    for key, value in parse_qsl(parts.query):
        if key.lower() == "password" and value:
            return value
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheSettings:
    """Validated, immutable settings of one cache manager.

    Build it with :func:`resolve_settings`, which applies the precedence
    argument > environment > default and validates every field.
    """

    redis_url: str = field(repr=False)
    enabled: bool
    cache_ttl: int
    max_connections: int
    socket_timeout: float
    socket_connect_timeout: float
    pool_timeout: float
    tombstone_ttl: int
    rate_limit_policy: RateLimitPolicy
    rate_limit_policies: Mapping[str, RateLimitPolicy]
    rate_limit_local_share: float
    max_id_length: int
    max_template_bytes: int
    near_cache: bool = False
    near_cache_size: int = 10_000
    near_cache_ttl: float = 30.0
    near_cache_protocol: int = 2
    key_prefix: str = DEFAULT_KEY_PREFIX
    #: Auto-pipelined shared connections for the data path (async facade); None: the
    #: facade's default (async: on, sync: off).
    pipelining: bool | None = None
    #: Shared connections per node when pipelining.
    pipeline_connections: int = DEFAULT_PIPELINE_CONNECTIONS
    #: What ``claim_send`` answers when Redis cannot be asked.
    send_guard_policy: SendGuardPolicy = "open"
    #: Time every Redis call into per-operation latency histograms (crmcache.metrics).
    metrics_latency: bool = False
    #: Consecutive connection failures that open the circuit breaker.
    breaker_failures: int = DEFAULT_BREAKER_FAILURES
    #: Longest wait between two probes of an open breaker, in seconds.
    breaker_max_backoff: float = DEFAULT_BREAKER_MAX_BACKOFF

    @property
    def masked_url(self) -> str:
        """The Redis URL with its password masked, safe for logs and reprs."""
        return mask_url(self.redis_url)

    def __repr__(self) -> str:
        return (
            f"CacheSettings(redis_url={self.masked_url!r}, enabled={self.enabled}, "
            f"cache_ttl={self.cache_ttl}, max_connections={self.max_connections}, "
            f"socket_timeout={self.socket_timeout}, "
            f"socket_connect_timeout={self.socket_connect_timeout}, "
            f"pool_timeout={self.pool_timeout}, tombstone_ttl={self.tombstone_ttl}, "
            f"rate_limit_policy={self.rate_limit_policy!r}, "
            f"rate_limit_policies={dict(self.rate_limit_policies)!r}, "
            f"rate_limit_local_share={self.rate_limit_local_share}, "
            f"near_cache={self.near_cache}, key_prefix={self.key_prefix!r}, "
            f"pipelining={self.pipelining}, pipeline_connections={self.pipeline_connections}, "
            f"send_guard_policy={self.send_guard_policy!r}, "
            f"metrics_latency={self.metrics_latency}, "
            f"breaker_failures={self.breaker_failures}, "
            f"breaker_max_backoff={self.breaker_max_backoff})"
        )


def _env(name: str, kind: type[T]) -> T | None:
    """Read and validate one environment variable; unset or blank means None."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    try:
        return TypeAdapter(kind).validate_python(raw.strip())
    except ValidationError as exc:
        # pydantic's errors can echo the input, and REDIS_URL may hold a password.
        reason = exc.errors()[0]["msg"]
        raise ConfigurationError(f"environment variable {name} is invalid: {reason}") from None


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """What a ``redis+sentinel://`` / ``rediss+sentinel://`` URL names.

    Attributes:
        sentinels: the sentinels' ``(host, port)``, in the URL's order.
        service: the name the sentinels monitor the primary under.
        node_url: a ``redis://`` (``rediss://``) URL for the data nodes: the URL's
            credentials, database and query parameters, with the first sentinel as a
            placeholder host (the transport connects to the primary it discovers).
    """

    sentinels: tuple[tuple[str, int], ...]
    service: str
    node_url: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class ClusterTarget:
    """What a ``redis+cluster://`` / ``rediss+cluster://`` URL names.

    Attributes:
        seeds: the seed nodes' ``(host, port)``, in the URL's order; the rest of the
            cluster is discovered from them (``CLUSTER SLOTS``).
        node_url: a ``redis://`` (``rediss://``) URL for every node: the URL's
            credentials and query parameters, with the first seed as its host.
    """

    seeds: tuple[tuple[str, int], ...]
    node_url: str = field(repr=False)


def _split_hosts(
    url: str, schemes: Mapping[str, str], what: str
) -> tuple[str, str, str, str, str]:
    """``(base scheme, credentials with "@", hosts, path, "?query")`` of a multi-host URL."""
    scheme, sep, rest = url.partition("://")
    base = schemes.get(scheme)
    if not sep or base is None:
        raise ConfigurationError(f"redis_url is not a {what} URL: {mask_url(url)!r}")
    rest, _, _fragment = rest.partition("#")
    rest, question, query = rest.partition("?")
    # The authority ends at the first "/" after the LAST "@" (a password may hold "/" or "@").
    at = rest.rfind("@")
    slash = rest.find("/", at + 1)
    authority, path = (rest, "") if slash == -1 else (rest[:slash], rest[slash:])
    userinfo, at_sign, hosts = authority.rpartition("@")
    if not hosts:
        raise ConfigurationError(f"redis_url names no {what.lower()} node: {mask_url(url)!r}")
    credentials = f"{userinfo}{at_sign}" if at_sign else ""
    return base, credentials, hosts, path, f"{question}{query}"


def _node_url(base: str, credentials: str, address: tuple[str, int], rest: str) -> str:
    host, port = address
    shown_host = f"[{host}]" if ":" in host else host
    return f"{base}://{credentials}{shown_host}:{port}{rest}"


@functools.lru_cache(maxsize=32)
def cluster_target(url: str) -> ClusterTarget:
    """Parse ``redis+cluster://[user:password@]host:port[,host:port...]`` (or
    ``rediss+cluster://``; a query string as for ``redis://``). A cluster has one
    database: a path, if any, must be ``/`` or ``/0``.

    Raises:
        ConfigurationError: not a Cluster URL, no node, a node that is not
            ``host:port``, or a database other than 0. The message never shows the
            password.
    """
    base, credentials, hosts, path, query = _split_hosts(url, _CLUSTER_SCHEMES, "Cluster")
    seeds = tuple(
        _host_port(part.strip(), url, DEFAULT_CLUSTER_PORT, "cluster node")
        for part in hosts.split(",")
    )
    if unquote(path) not in ("", "/", "/0"):
        raise ConfigurationError(
            "redis_url of a Redis Cluster names no database (a cluster has only db 0; "
            f"use key_prefix to share one), got {mask_url(url)!r}"
        )
    return ClusterTarget(seeds=seeds, node_url=_node_url(base, credentials, seeds[0], query))


def is_cluster_url(url: str) -> bool:
    """True for a ``redis+cluster://`` or ``rediss+cluster://`` URL."""
    return url.partition("://")[0] in _CLUSTER_SCHEMES


def _sentinel_address(text: str, url: str) -> tuple[str, int]:
    return _host_port(text, url, DEFAULT_SENTINEL_PORT, "sentinel")


def _host_port(text: str, url: str, default_port: int, what: str) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:port
        host, bracket, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ("" if not rest else "!")
        if not bracket:
            port_text = "!"
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            host, port_text = text, ""
    port = int(port_text) if port_text.isdigit() else (0 if port_text else default_port)
    if not host or not 0 < port < 65536 or any(c in host for c in "/?#@, "):
        raise ConfigurationError(
            f"redis_url names a {what} that is not host:port: {_shown(text, url_password(url))} "
            f"in {mask_url(url)!r}"
        )
    return host, port


@functools.lru_cache(maxsize=32)
def sentinel_target(url: str) -> SentinelTarget:
    """Parse ``redis+sentinel://[user:password@]host:port[,host:port...]/<service>[/<db>]``
    (or ``rediss+sentinel://``; a query string as for ``redis://``).

    Raises:
        ConfigurationError: not a Sentinel URL, no sentinel, a sentinel that is not
            ``host:port``, no service name, or a database that is not an int >= 0. The
            message never shows the password.
    """
    scheme = url.partition("://")[0]
    base, credentials, hosts, path, query = _split_hosts(url, _SENTINEL_SCHEMES, "Sentinel")
    sentinels = tuple(_sentinel_address(part.strip(), url) for part in hosts.split(","))
    segments = [unquote(segment) for segment in path.split("/")[1:]]
    if segments and segments[-1] == "":
        segments.pop()  # a trailing slash
    if not segments or not segments[0]:
        raise ConfigurationError(
            f"redis_url names no service: {scheme}:// needs /<service_name> after the "
            f"sentinels, got {mask_url(url)!r}"
        )
    if len(segments) > 2:
        raise ConfigurationError(
            f"redis_url path must be /<service_name>[/<db>], got {mask_url(url)!r}"
        )
    service = segments[0]
    if any(not "!" <= char <= "~" for char in service):
        raise ConfigurationError(
            f"redis_url service name must be printable ASCII without spaces, "
            f"got {_shown(service, url_password(url))}"
        )
    db_path = ""
    if len(segments) == 2:
        try:
            db = _q_db(segments[1])
        except _BadValueError as exc:
            raise ConfigurationError(
                f"redis_url database {exc}, got {_shown(segments[1], url_password(url))}"
            ) from None
        db_path = f"/{db}"
    node_url = _node_url(base, credentials, sentinels[0], f"{db_path}{query}")
    return SentinelTarget(sentinels=sentinels, service=service, node_url=node_url)


def is_sentinel_url(url: str) -> bool:
    """True for a ``redis+sentinel://`` or ``rediss+sentinel://`` URL."""
    return url.partition("://")[0] in _SENTINEL_SCHEMES


def node_url(url: str) -> str:
    """The ``redis://`` / ``rediss://`` / ``unix://`` URL of the node(s) ``url`` names: the
    URL itself, or a Sentinel or Cluster URL's node URL (credentials, TLS and query)."""
    if is_sentinel_url(url):
        return sentinel_target(url).node_url
    if is_cluster_url(url):
        return cluster_target(url).node_url
    return url


def _check_url(url: object) -> str:
    if not isinstance(url, str):
        raise TypeError(f"redis_url must be a str, not {type(url).__name__}")
    if is_sentinel_url(url):
        sentinel_target(url)
        return url
    if is_cluster_url(url):
        cluster_target(url)
        return url
    try:
        parts = urlsplit(url)
        scheme = url.partition("://")[0]
        _ = parts.port  # raises ValueError on a non-numeric port
    except ValueError:
        raise ConfigurationError(f"redis_url is not a valid URL: {mask_url(url)!r}") from None
    if scheme not in _SCHEMES:
        raise ConfigurationError(
            "redis_url must start with redis://, rediss://, unix://, redis+sentinel://, "
            f"rediss+sentinel://, redis+cluster:// or rediss+cluster://, got {mask_url(url)!r}"
        )
    if scheme != "unix" and not parts.hostname:
        raise ConfigurationError(f"redis_url has no host: {mask_url(url)!r}")
    return url


# -- the URL's query string -------------------------------------------------------------
#
# redis-py's from_url() passes every query parameter to its connection class: a known one
# parsed (URL_QUERY_ARGUMENT_PARSERS), an unknown one as a string. Connection() then fails
# on an unknown keyword, and options crmcache sets itself (RESP2, bytes replies, its own
# pools and retries) would be overridden, since a URL option wins over from_url's keyword
# arguments. Each check below accepts exactly what redis-py parses to the same meaning.

_TRUE_WORDS = frozenset({"1", "true", "t", "yes", "y"})
#: redis-py's to_bool() reads these as False and any other non-empty text as True.
_FALSE_WORDS = frozenset({"0", "false", "f", "no", "n"})
_CERT_REQS = frozenset({"none", "optional", "required"})
_TLS_VERSIONS = {int(version): version for version in ssl.TLSVersion}
#: The longest value or name quoted back in an error.
_SHOWN = 40


class _BadValueError(ValueError):
    """A query parameter's value does not parse; the message says what was expected."""


def _q_db(raw: str) -> int:
    try:
        db = int(raw)
    except ValueError:
        raise _BadValueError("must be a database number (an int >= 0)") from None
    if db < 0:
        raise _BadValueError("must be a database number (an int >= 0)")
    return db


def _q_seconds(raw: str) -> float:
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or not 0 < seconds <= MAX_DURATION:
        raise _BadValueError(f"must be a number of seconds > 0 and <= {MAX_DURATION:g}")
    return seconds


def _q_int(minimum: int, maximum: int) -> Callable[[str], int]:
    def check(raw: str) -> int:
        try:
            number = int(raw)
        except ValueError:
            number = minimum - 1
        if not minimum <= number <= maximum:
            raise _BadValueError(f"must be an int >= {minimum} and <= {maximum}")
        return number

    return check


def _q_bool(raw: str) -> bool:
    word = raw.lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise _BadValueError("must be true or false (also yes/no, 1/0, t/f, y/n)")


def _q_text(raw: str) -> str:
    return raw


def _q_client_name(raw: str) -> str:
    # Redis refuses CLIENT SETNAME with spaces or non-printable characters, which would
    # fail every connection.
    if not all("!" <= char <= "~" for char in raw):
        raise _BadValueError("must be printable ASCII without spaces")
    return raw


def _q_cert_reqs(raw: str) -> str:
    if raw not in _CERT_REQS:
        raise _BadValueError("must be none, optional or required")
    return raw


def _q_tls_version(raw: str) -> ssl.TLSVersion:
    try:
        return _TLS_VERSIONS[int(raw)]
    except (ValueError, KeyError):
        known = ", ".join(f"{int(v)} ({v.name})" for v in _TLS_VERSIONS.values() if int(v) > 0)
        raise _BadValueError(f"must be the number of an ssl.TLSVersion: {known}") from None


def _q_ciphers(raw: str) -> str:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).set_ciphers(raw)
    except ssl.SSLError:
        raise _BadValueError("selects no cipher (OpenSSL cipher list syntax)") from None
    return raw


def _q_verify_flags(raw: str) -> list[ssl.VerifyFlags]:
    # The syntax of redis-py's parse_ssl_verify_flags(): names, comma-separated,
    # optionally in brackets.
    names = [name.strip() for name in raw.replace("[", "").replace("]", "").split(",")]
    flags = ssl.VerifyFlags.__members__
    if not all(name in flags for name in names):
        raise _BadValueError("must be ssl.VerifyFlags names separated by commas")
    return [flags[name] for name in names]


#: Query parameters accepted in ``redis_url``, with the check of each value. redis-py
#: passes them to its connections; the ``ssl_`` ones need ``rediss://``.
URL_PARAMETERS: Mapping[str, Callable[[str], object]] = MappingProxyType(
    {
        "db": _q_db,
        "username": _q_text,
        "password": _q_text,
        "socket_timeout": _q_seconds,
        "socket_connect_timeout": _q_seconds,
        "socket_keepalive": _q_bool,
        "socket_read_size": _q_int(1, MAX_SOCKET_READ_SIZE),
        "health_check_interval": _q_int(0, int(MAX_DURATION)),
        "client_name": _q_client_name,
        "ssl_cert_reqs": _q_cert_reqs,
        "ssl_check_hostname": _q_bool,
        "ssl_ca_certs": _q_text,
        "ssl_ca_path": _q_text,
        "ssl_certfile": _q_text,
        "ssl_keyfile": _q_text,
        "ssl_password": _q_text,
        "ssl_min_version": _q_tls_version,
        "ssl_ciphers": _q_ciphers,
        "ssl_include_verify_flags": _q_verify_flags,
        "ssl_exclude_verify_flags": _q_verify_flags,
    }
)
_NO_PARAMETERS: Mapping[str, object] = MappingProxyType({})
#: Values never quoted back in an error.
_SECRET_PARAMETERS = frozenset({"username", "password", "ssl_password"})

#: redis-py options crmcache sets itself, and why a URL may not change them.
_CONTROLLED_PARAMETERS: Mapping[str, str] = MappingProxyType(
    {
        "decode_responses": "crmcache decodes replies itself and needs them as bytes",
        "encoding": "crmcache encodes every value as UTF-8 itself",
        "encoding_errors": "crmcache encodes every value as UTF-8 itself",
        "protocol": (
            "the data path speaks RESP2, so Lua replies decode the same on every redis-py "
            "version (the near cache's listener takes the near_cache_protocol argument)"
        ),
        "legacy_responses": "crmcache parses replies itself",
        "max_connections": "the pool size is the max_connections argument",
        "timeout": "the wait for a pooled connection is the pool_timeout argument",
        "retry_on_timeout": "crmcache never retries a timeout (a retry would double the stall)",
        "retry_on_error": "crmcache retries once on a dropped connection and nothing else",
    }
)


def _shown(text: str, secret: str | None) -> str:
    """``text`` fit for an error message: shortened, the URL's password taken out."""
    if secret:
        text = SecretMask(secret)(text)
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "...")


def _path_db(path: str) -> int | None:
    """The database number in a ``redis://`` path, as redis-py reads it (else None)."""
    try:
        return int(unquote(path).replace("/", ""))
    except ValueError:
        return None


@functools.lru_cache(maxsize=32)
def _check_url_parameters(url: str) -> Mapping[str, object]:
    """Check the query string of a valid ``redis_url``; return the parsed parameters.

    Cached: ``get_cache_manager()`` resolves its URL on every call.

    Raises:
        ConfigurationError: a parameter is unknown, set by crmcache itself, repeated,
            blank, does not fit the scheme, or its value does not parse. The message
            names the parameter and never shows the URL's password.
    """
    parts = urlsplit(url)
    if not parts.query:
        return _NO_PARAMETERS
    scheme = url.partition("://")[0]
    secret = url_password(url)
    parsed: dict[str, object] = {}
    for name, raw in parse_qsl(parts.query, keep_blank_values=True):
        label = f"redis_url query parameter {_shown(name, secret)}"
        check = URL_PARAMETERS.get(name)
        if check is None:
            reason = _CONTROLLED_PARAMETERS.get(name)
            if reason is not None:
                raise ConfigurationError(f"{label} is not allowed: {reason}")
            raise ConfigurationError(
                f"{label} is not supported; crmcache accepts {', '.join(URL_PARAMETERS)}"
            )
        if name in parsed:
            raise ConfigurationError(f"{label} is given more than once")
        if not raw:
            raise ConfigurationError(f"{label} has no value")
        if name.startswith("ssl_") and scheme != "rediss":
            raise ConfigurationError(f"{label} needs a rediss:// URL (TLS)")
        if name == "socket_keepalive" and scheme == "unix":
            raise ConfigurationError(f"{label} does not apply to a unix:// socket")
        try:
            parsed[name] = check(raw)
        except _BadValueError as exc:
            shown = "" if name in _SECRET_PARAMETERS else f", got {_shown(raw, secret)}"
            raise ConfigurationError(f"{label} {exc}{shown}") from None
    if scheme != "unix" and "db" in parsed:
        path_db = _path_db(parts.path)
        if path_db is not None and path_db != parsed["db"]:
            raise ConfigurationError(
                f"redis_url names two databases: {path_db} in its path and "
                f"{parsed['db']} in its query parameter 'db'"
            )
    return MappingProxyType(parsed)


def _shown_value(value: object) -> str:
    """``value`` for an error message: an int too long to print is described instead
    (``str()`` of an int past 4300 digits raises ValueError)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an int of {value.bit_length()} bits"
    return str(value)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
        # Checked here first: the message must not print an int too long to print.
        raise ConfigurationError(f"{name} must be > 0, got {_shown_value(value)}")
    return positive_int(name, value, error=ConfigurationError)


def _ttl(name: str, value: object) -> int:
    seconds = _positive_int(name, value)
    if seconds > MAX_TTL:
        raise ConfigurationError(
            f"{name} must be at most {MAX_TTL} seconds, got {_shown_value(seconds)}"
        )
    return seconds


def _positive_seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        seconds = math.inf
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigurationError(
            f"{name} must be a finite number of seconds > 0, got {_shown_value(value)}"
        )
    if seconds > MAX_DURATION:
        raise ConfigurationError(
            f"{name} must be at most {MAX_DURATION:g} seconds (one day), got {_shown_value(value)}"
        )
    return seconds


def _check_pipeline_connections(value: object) -> int:
    count = _positive_int("pipeline_connections", value)
    if count > MAX_PIPELINE_CONNECTIONS:
        raise ConfigurationError(
            f"pipeline_connections must be at most {MAX_PIPELINE_CONNECTIONS}, got {count}"
        )
    return count


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, not {type(value).__name__}")
    return value


def check_policy(
    value: object, name: str = "rate_limit_policy", *, error: type[ValueError] = ValueError
) -> RateLimitPolicy:
    """Validate a rate-limit failure policy name.

    Raises:
        TypeError: ``value`` is not a str.
        ValueError: ``value`` is not one of ``"open"``, ``"closed"``, ``"local"``.
    """
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    policy = _POLICIES.get(value)
    if policy is None:
        raise error(f"{name} must be 'open', 'closed' or 'local', got {value!r}")
    return policy


def check_send_guard_policy(
    value: object, name: str = "send_guard_policy", *, error: type[ValueError] = ValueError
) -> SendGuardPolicy:
    """Validate a send-guard failure policy name.

    Raises:
        TypeError: ``value`` is not a str.
        ValueError: ``value`` is not ``"open"`` or ``"closed"``.
    """
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    policy = _SEND_GUARD_POLICIES.get(value)
    if policy is None:
        raise error(f"{name} must be 'open' or 'closed', got {value!r}")
    return policy


def _check_policies(value: object) -> Mapping[str, RateLimitPolicy]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, Mapping):
        raise TypeError(
            f"rate_limit_policies must be a mapping of API name to policy, "
            f"not {type(value).__name__}"
        )
    checked: dict[str, RateLimitPolicy] = {}
    for api, policy in value.items():
        if not isinstance(api, str) or not api.strip():
            raise TypeError(f"rate_limit_policies keys must be API names (str), got {api!r}")
        checked[api] = check_policy(
            policy, f"rate_limit_policies[{api!r}]", error=ConfigurationError
        )
    return MappingProxyType(checked)


def _check_share(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"rate_limit_local_share must be a number, not {type(value).__name__}")
    if not 0 < value <= 1:
        raise ConfigurationError(
            f"rate_limit_local_share must be in (0, 1], got {_shown_value(value)}"
        )
    return float(value)


def _check_protocol(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"near_cache_protocol must be an int, not {type(value).__name__}")
    if value not in (2, 3):
        raise ConfigurationError(
            f"near_cache_protocol must be 2 or 3 (RESP2/RESP3), got {_shown_value(value)}"
        )
    return value


def resolve_settings(
    *,
    redis_url: str | None = None,
    enabled: bool | None = None,
    cache_ttl: int | None = None,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
    socket_connect_timeout: float = DEFAULT_SOCKET_CONNECT_TIMEOUT,
    pool_timeout: float = DEFAULT_POOL_TIMEOUT,
    tombstone_ttl: int = DEFAULT_TOMBSTONE_TTL,
    rate_limit_policy: str = "open",
    rate_limit_policies: Mapping[str, str] | None = None,
    rate_limit_local_share: float = 1.0,
    max_id_length: int = DEFAULT_MAX_ID_LENGTH,
    max_template_bytes: int = DEFAULT_MAX_TEMPLATE_BYTES,
    near_cache: bool = False,
    near_cache_size: int = DEFAULT_NEAR_CACHE_SIZE,
    near_cache_ttl: float = DEFAULT_NEAR_CACHE_TTL,
    near_cache_protocol: int = 2,
    key_prefix: str | None = None,
    pipelining: bool | None = None,
    pipeline_connections: int = DEFAULT_PIPELINE_CONNECTIONS,
    send_guard_policy: str = "open",
    metrics_latency: bool = False,
    breaker_failures: int = DEFAULT_BREAKER_FAILURES,
    breaker_max_backoff: float = DEFAULT_BREAKER_MAX_BACKOFF,
) -> CacheSettings:
    """Combine arguments, environment and defaults into validated settings.

    ``None`` for ``redis_url``, ``enabled``, ``cache_ttl`` or ``key_prefix`` means "not
    given": the environment variable is used if set, else the default.

    Raises:
        ConfigurationError: a value (argument, environment variable or query parameter of
            the URL) is out of range or malformed, or the URL has a query parameter
            crmcache does not accept. The message names it and never shows a password.
        TypeError: an argument has the wrong type.
    """
    # Each variable is read only when its argument is missing: an explicit argument wins
    # even over a malformed variable.
    if redis_url is None:
        redis_url = _env("REDIS_URL", str) or DEFAULT_REDIS_URL
    if enabled is None:
        env_enabled = _env("ENABLE_CACHING", bool)
        enabled = DEFAULT_ENABLED if env_enabled is None else env_enabled
    if cache_ttl is None:
        env_ttl = _env("CACHE_TTL", int)
        if env_ttl is not None and not 0 < env_ttl <= MAX_TTL:
            raise ConfigurationError(f"CACHE_TTL must be between 1 and {MAX_TTL}, got {env_ttl}")
        cache_ttl = DEFAULT_CACHE_TTL if env_ttl is None else env_ttl
    if key_prefix is None:
        env_prefix = os.environ.get("CACHE_KEY_PREFIX")
        if env_prefix is not None and env_prefix.strip():
            try:
                key_prefix = check_key_prefix(env_prefix.strip(), error=ConfigurationError)
            except ConfigurationError as exc:
                raise ConfigurationError(
                    f"environment variable CACHE_KEY_PREFIX is invalid: {exc}"
                ) from None
        else:
            key_prefix = DEFAULT_KEY_PREFIX
    url = _check_url(redis_url)
    # A Sentinel or Cluster URL's query string is the data nodes': checked as theirs.
    url_parameters = _check_url_parameters(node_url(url))
    # A timeout in the URL wins over the argument, as it does in redis-py's from_url()
    # (which builds the connections): the settings then show the value in force, and
    # health checks and close() use it too.
    read_timeout = _positive_seconds("socket_timeout", socket_timeout)
    connect_timeout = _positive_seconds("socket_connect_timeout", socket_connect_timeout)

    return CacheSettings(
        redis_url=url,
        enabled=_check_bool("enabled", enabled),
        cache_ttl=_ttl("cache_ttl", cache_ttl),
        max_connections=_positive_int("max_connections", max_connections),
        socket_timeout=cast(float, url_parameters.get("socket_timeout", read_timeout)),
        socket_connect_timeout=cast(
            float, url_parameters.get("socket_connect_timeout", connect_timeout)
        ),
        pool_timeout=_positive_seconds("pool_timeout", pool_timeout),
        tombstone_ttl=_ttl("tombstone_ttl", tombstone_ttl),
        rate_limit_policy=check_policy(rate_limit_policy, error=ConfigurationError),
        rate_limit_policies=_check_policies(rate_limit_policies),
        rate_limit_local_share=_check_share(rate_limit_local_share),
        max_id_length=_positive_int("max_id_length", max_id_length),
        max_template_bytes=_positive_int("max_template_bytes", max_template_bytes),
        near_cache=_check_bool("near_cache", near_cache),
        near_cache_size=_positive_int("near_cache_size", near_cache_size),
        near_cache_ttl=_positive_seconds("near_cache_ttl", near_cache_ttl),
        near_cache_protocol=_check_protocol(near_cache_protocol),
        key_prefix=check_key_prefix(key_prefix, error=ConfigurationError),
        pipelining=None if pipelining is None else _check_bool("pipelining", pipelining),
        pipeline_connections=_check_pipeline_connections(pipeline_connections),
        send_guard_policy=check_send_guard_policy(send_guard_policy, error=ConfigurationError),
        metrics_latency=_check_bool("metrics_latency", metrics_latency),
        breaker_failures=_positive_int("breaker_failures", breaker_failures),
        breaker_max_backoff=_positive_seconds("breaker_max_backoff", breaker_max_backoff),
    )
