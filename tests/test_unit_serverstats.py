"""The figures of `crmcache stats` from samples: rates from deltas, fallbacks, totals."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from crmcache._keys import KeySpace
from crmcache._serverstats import KeyKind, NodeSample, ServerSample, info_fields, key_kind
from crmcache._serverstats import server_figures as figures_of
from crmcache._statsview import StatsView, render

INFO = (
    b"# Server\r\nredis_version:7.2.4\r\nuptime_in_seconds:{up}\r\n# Clients\r\n"
    b"connected_clients:3\r\n# Memory\r\nused_memory:500\r\nmaxmemory:1000\r\n"
    b"maxmemory_policy:volatile-lru\r\n# Stats\r\ntotal_commands_processed:{cmds}\r\n"
    b"instantaneous_ops_per_sec:7\r\nkeyspace_hits:{hits}\r\nkeyspace_misses:{misses}\r\n"
    b"evicted_keys:{evicted}\r\n# Replication\r\nrole:master\r\n"
)


def node(at: float, address: str = "n1", **values: int) -> NodeSample:
    fields = {"up": 100, "cmds": 0, "hits": 0, "misses": 0, "evicted": 0} | values
    info = info_fields(INFO.decode().format(**fields).encode())
    return NodeSample(address, at, info, {KeyKind.TEMPLATES: 2}, keys_exact=True)


def server(*nodes: NodeSample) -> ServerSample:
    return ServerSample(nodes[0].at, 1e9, "standalone", nodes)


def test_info_fields_and_key_kinds() -> None:
    info = info_fields(INFO.decode().format(up=1, cmds=2, hits=3, misses=4, evicted=5))
    assert info is not None
    assert (info["maxmemory"], info["maxmemory_policy"], info["role"]) == (
        1000,
        "volatile-lru",
        "master",
    )
    assert info_fields(b"not info") is None
    keys = KeySpace("crm")
    assert key_kind(b"crm:prefs:a", keys) is KeyKind.PREFERENCES
    assert key_kind(b"crm:lease:prefs:a", keys) is KeyKind.LEASES
    assert key_kind(b"crm:send:x", keys) is KeyKind.SEND_CLAIMS
    assert key_kind(b"crm:ratelimit:x:60", keys) is KeyKind.RATE_LIMITS
    assert key_kind(b"crm:template:sms:x", keys) is KeyKind.TEMPLATES
    assert key_kind(b"crm:zzz", keys) is KeyKind.OTHER


def test_rates_from_deltas_and_fallbacks() -> None:
    first = node(0.0, cmds=100, hits=10, misses=10, evicted=1)
    second = node(2.0, cmds=300, hits=19, misses=11, evicted=4)
    once = figures_of(server(first)).total
    assert (once.ops_per_sec, once.ops_per_sec_source) == (7.0, "redis")
    assert once.hit_ratio_interval is None
    assert once.memory_used_ratio == 50.0
    watched = figures_of(server(second), server(first), server(first)).total
    assert (watched.ops_per_sec, watched.ops_per_sec_source) == (100.0, "delta")
    assert watched.evicted_keys_delta == 3
    assert watched.hit_ratio_interval == 90.0
    assert watched.hit_ratio_lifetime == 63.33
    # A counter that went down (restart, CONFIG RESETSTAT): no delta, Redis's estimate.
    reset = figures_of(server(node(3.0, cmds=5)), server(second)).total
    assert reset.ops_per_sec_source == "redis"
    assert reset.evicted_keys_delta is None


def test_cluster_total_and_a_node_down() -> None:
    a0, b0 = node(0.0, "a", cmds=0, hits=1), node(0.0, "b", cmds=0, misses=1)
    a1, b1 = node(1.0, "a", cmds=10, hits=3), node(1.0, "b", cmds=20, misses=3)
    figures = figures_of(server(a1, b1), server(a0, b0), server(a0, b0))
    assert figures.total.ops_per_sec == 30.0
    assert figures.total.hit_ratio_interval == 50.0
    assert figures.total.keys["templates"] == 4
    assert figures.total.maxmemory == 2000
    down = NodeSample("b", 2.0, None, error="ConnectionError: refused")
    partial = figures_of(server(node(2.0, "a", cmds=20), down), server(a1, b1))
    assert partial.total.error == "1 node(s) unreachable"
    assert partial.total.ops_per_sec == 10.0


def test_view_takes_its_own_reads_out_and_says_since_when_a_node_is_down() -> None:
    samples: list[Any] = [
        server(NodeSample("n1", 0.0, node(0.0, hits=0).info, own_hits=5)),
        server(NodeSample("n1", 1.0, node(1.0, hits=5, misses=5).info, own_hits=5)),
        ServerSample(2.0, 1e9 + 2, "standalone", (NodeSample("n1", 2.0, None, error="gone"),)),
    ]
    view = StatsView(sample=lambda: samples.pop(0), url="u", console=Console())
    view.once()
    figures, _ = view.once()
    assert figures.total.hit_ratio_interval == 0.0  # the 5 hits were the view's own
    figures, _ = view.once()
    assert view.down_since == {"n1": 1e9 + 2}
    console = Console(record=True, width=200)
    console.print(render(figures, "u", watching=True, down_since=view.down_since))
    assert "unreachable since" in console.export_text()
