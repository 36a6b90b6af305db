"""Redis Cluster arithmetic with no I/O: key slots, the slot map, batches grouped by slot.

A key's slot is ``CRC16(key) mod 16384`` (XMODEM CRC, ``binascii.crc_hqx``), computed over
the part between the first ``{`` and the next ``}`` when that part is not empty (a hash
tag: ``crm:{tenant}:prefs:1`` and ``crm:{tenant}:template:x`` share a slot). The slot map
is what ``CLUSTER SLOTS`` answers, checked before it is trusted: a reply from a buggy or
hostile node that breaks the format is refused whole, never half applied.
"""

from __future__ import annotations

from binascii import crc_hqx
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["SLOTS", "SlotMap", "group_by_slot", "parse_cluster_slots", "slot_of"]

#: Hash slots in a Redis Cluster.
SLOTS = 16384
#: Memoised key slots at most (the hot keys of a process); cleared when full.
_MEMO_SIZE = 65536
_memo: dict[str, int] = {}


def slot_of(key: str) -> int:
    """The hash slot of ``key`` (hash tags honoured), as Redis computes it."""
    try:
        return _memo[key]
    except KeyError:
        pass
    raw = key.encode()
    start = raw.find(b"{")
    if start > -1:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    slot = crc_hqx(raw, 0) & (SLOTS - 1)
    if len(_memo) >= _MEMO_SIZE:
        _memo.clear()  # a bound, not an LRU: recomputing a slot costs under a microsecond
    _memo[key] = slot
    return slot


def group_by_slot(keys: Sequence[str]) -> dict[int, list[int]]:
    """The positions of ``keys`` grouped by slot (first seen first)."""
    groups: dict[int, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(slot_of(key), []).append(index)
    return groups


@dataclass(frozen=True, slots=True)
class SlotMap:
    """Which primary serves each slot.

    Attributes:
        owners: for each slot, the index into :attr:`primaries` of its primary, or -1
            where no node serves it.
        primaries: every primary's ``host:port``, in the order first seen.
    """

    owners: tuple[int, ...]
    primaries: tuple[str, ...]

    def owner(self, slot: int) -> str | None:
        """The ``host:port`` serving ``slot``, or None."""
        index = self.owners[slot]
        return None if index < 0 else self.primaries[index]

    @property
    def covered(self) -> int:
        """How many slots some primary serves."""
        return sum(1 for index in self.owners if index >= 0)

    def moved_slots(self, other: SlotMap) -> int:
        """How many slots changed primary between ``other`` and this map."""
        return sum(1 for slot in range(SLOTS) if self.owner(slot) != other.owner(slot))


class BadSlotMapError(ValueError):
    """A ``CLUSTER SLOTS`` reply that breaks the format (the message says where)."""


def _address(entry: object, asked_host: str) -> str:
    if type(entry) is not list or len(entry) < 2:
        raise BadSlotMapError("a node entry is not [host, port, ...]")
    host, port = entry[0], entry[1]
    if type(host) is not bytes or type(port) is not int or not 0 < port < 65536:
        raise BadSlotMapError("a node entry's host or port is malformed")
    try:
        text = host.decode("ascii")
    except UnicodeDecodeError:
        raise BadSlotMapError("a node's host is not ASCII") from None
    if text in ("", "?"):
        text = asked_host  # "the node you asked" (cluster-announce-hostname unset)
    if len(text) > 255 or any(not "!" <= char <= "~" for char in text):
        raise BadSlotMapError("a node's host is not printable")
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def parse_cluster_slots(reply: object, asked_host: str) -> SlotMap:
    """The slot map in a ``CLUSTER SLOTS`` reply (RESP2) from a node at ``asked_host``.

    Raises:
        BadSlotMapError: the reply is not a list of ``[start, end, primary, replicas...]``
            with ``0 <= start <= end < 16384``, or two ranges overlap.
    """
    if type(reply) is not list:
        raise BadSlotMapError("the reply is not a list")
    owners = [-1] * SLOTS
    primaries: dict[str, int] = {}
    for item in reply:
        if type(item) is not list or len(item) < 3:
            raise BadSlotMapError("a range is not [start, end, primary, ...]")
        start, end = item[0], item[1]
        if type(start) is not int or type(end) is not int or not 0 <= start <= end < SLOTS:
            raise BadSlotMapError("a range's bounds are out of 0..16383")
        address = _address(item[2], asked_host)
        index = primaries.setdefault(address, len(primaries))
        for slot in range(start, end + 1):
            if owners[slot] != -1:
                raise BadSlotMapError(f"slot {slot} is in two ranges")
            owners[slot] = index
    return SlotMap(owners=tuple(owners), primaries=tuple(primaries))
