"""Desired state -> map entries. A pure function: no kernel, no I/O.

Classification without a per-rule loop (reshaped by what the
benchmarks showed -- see docs/design-notes.md):

1. *Prefixes.* For one policy (a set of groups), direction and family, every
   CIDR the rules mention (prefix lists and group members expanded) is a
   prefix whose *class* is the set of rules naming exactly that prefix. The
   datapath looks the remote address up in one hash per prefix length
   present, longest first, and checks the classes of the first
   ``CHAIN_MAX`` prefixes that contain it. So that nothing is lost for an
   address inside more nested prefixes than that, a prefix that can be the
   last one checked (it has a chain of ``CHAIN_MAX - 1`` nested prefixes
   below it) also carries the rules of all its ancestors. Rules are copied
   nowhere else, so entries grow linearly with rules.
2. *Port segments.* For each class and protocol the port space (or ICMP
   type<<8|code) is cut into disjoint intervals with a constant rule set.
   Up to ``SEGS_INLINE`` of them sit in the class's map value; more go to an
   LPM trie as <= 30 prefixes each. Rules of protocol -1 are folded into
   every specific protocol of the class and also kept under ``PROTO_ANY``.
   Classes are identified by content, so identical ones are shared by every
   policy and a change rewrites only the classes it touches.
3. *Untracked flows* (1.4) need, per packet: does a world rule (peer
   0.0.0.0/0 or ::/0) allow it here (segment flag ``WORLD``), is the other
   direction world-open on all ports for the protocol (endpoint bits
   ``open_all``), and -- for replies -- does a world rule of the other
   direction allow the reversed packet (the *world class*).
4. *Incremental.* The types and pure pieces are here; ``incremental.py``
   computes policies, each from the last compile of the same group set, so
   that a change costs what it touches (one rule, one member's address).
"""

from __future__ import annotations

import hashlib
import heapq
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterable, List, Optional, Tuple

from controller.abi import FLAG_WORLD, PROTO_ANY
from controller.policy.model import (
    EGRESS,
    INGRESS,
    PROTO_ALL,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    IPNetwork,
    Rule,
)

DIR_INDEX = {INGRESS: 0, EGRESS: 1}
FAMILY_INDEX = {4: 0, 6: 1}
PORT_SPACE = 1 << 16


def open_all_bit(direction: str, family: int, proto: int) -> int:
    """Bit in ``sg_endpoint.open_all``: (dir, family, tcp|udp) is world-open on all ports."""
    return 1 << ((DIR_INDEX[direction] * 2 + FAMILY_INDEX[family]) * 2
                 + (1 if proto == PROTO_UDP else 0))


def port_range(rule: Rule) -> Tuple[int, int]:
    """The rule's interval in the 16-bit port key (port, or type<<8|code)."""
    if rule.protocol in (PROTO_TCP, PROTO_UDP):
        return rule.from_port, rule.to_port
    if rule.protocol in (PROTO_ICMP, PROTO_ICMPV6):
        if rule.from_port == -1:
            return 0, PORT_SPACE - 1
        if rule.to_port == -1:
            return rule.from_port << 8, (rule.from_port << 8) | 0xFF
        code = (rule.from_port << 8) | rule.to_port
        return code, code
    return 0, PORT_SPACE - 1


def range_to_prefixes(lo: int, hi: int, bits: int = 16) -> List[Tuple[int, int]]:
    """Inclusive [lo, hi] -> minimal list of (value, prefix length)."""
    out = []
    while lo <= hi:
        size = lo & -lo if lo else 1 << bits
        while size > hi - lo + 1:
            size >>= 1
        out.append((lo, bits - size.bit_length() + 1))
        lo += size
    return out



# A class's content: (rule index, protocol, first, last, world) per rule.
ClassContent = FrozenSet[Tuple[int, int, int, int, bool]]
PeerPrefix = Tuple[int, int, int, int]  # (dir index, family, prefix length, network as int)


@dataclass
class Policy:
    """Everything one group set needs in the maps (ids assigned by the dataplane)."""

    groups: Tuple[str, ...]
    peers: Dict[PeerPrefix, ClassContent] = field(default_factory=dict)
    plens: Dict[Tuple[int, int], Tuple[int, ...]] = field(default_factory=dict)  # longest first
    world: Dict[Tuple[int, int], ClassContent] = field(default_factory=dict)  # (dir, fam) -> world rules
    open_all: int = 0
    exempt: Tuple[Tuple[int, int, int], ...] = ()  # (family, plen, network) of exempt addresses
    peers_hash: int = 0  # peers_digest(peers), kept up to date by the compiler
    # what changed since compile ``since`` of this group set (None: unknown)
    serial: int = 0
    since: Optional[int] = None
    changed: FrozenSet[PeerPrefix] = frozenset()

    def fingerprint(self) -> str:
        """Stable across processes: decides whether a policy must be rewritten.
        (Hashes of int tuples and frozensets of them do not depend on the
        process's hash seed; only str/bytes hashes do.)"""
        text = repr((len(self.peers), self.peers_hash,
                     sorted((k, len(v), hash(v)) for k, v in self.world.items()),
                     self.plens and sorted(self.plens.items()), self.open_all, self.exempt))
        return hashlib.sha256(text.encode()).hexdigest()


HASH_MOD = 1 << 64


def peer_hash(key: PeerPrefix, content: ClassContent) -> int:
    """One peer entry's share of ``Policy.peers_hash`` (a sum, so that a
    change adds and subtracts only what it touches)."""
    return hash((key, content)) % HASH_MOD


def peers_digest(peers: Dict[PeerPrefix, ClassContent]) -> int:
    return sum(peer_hash(k, v) for k, v in peers.items()) % HASH_MOD


@dataclass
class Compiled:
    policies: Dict[Tuple[str, ...], Policy]
    rule_index: Dict[str, int]  # rule id -> index (counter slot)


def _segments(items: Iterable[Tuple[int, int, int, bool]]) -> List[Tuple[int, int, int, int]]:
    """(lo, hi, rule_index, world) intervals -> disjoint (lo, hi, min index, flags), merged.

    A sweep over the interval end points: O(n log n) in the number of rules.
    """
    events: Dict[int, List[Tuple[int, int, bool]]] = {}
    for lo, hi, idx, world in items:
        events.setdefault(lo, []).append((1, idx, world))
        events.setdefault(hi + 1, []).append((-1, idx, world))
    points = sorted(events)
    active: Dict[int, int] = {}
    heap: List[int] = []
    worlds = 0
    out: List[Tuple[int, int, int, int]] = []
    for a, b in zip(points, points[1:] + [PORT_SPACE]):
        for sign, idx, world in events[a]:
            active[idx] = active.get(idx, 0) + sign
            worlds += sign * int(world)
            if sign > 0:
                heapq.heappush(heap, idx)
        while heap and active[heap[0]] == 0:
            heapq.heappop(heap)
        if not heap or a >= PORT_SPACE:
            continue
        val = (heap[0], FLAG_WORLD if worlds else 0)
        if out and out[-1][1] == a - 1 and out[-1][2:] == val:
            out[-1] = (out[-1][0], b - 1, *val)
        else:
            out.append((a, b - 1, *val))
    return out


def class_segments(content: ClassContent) -> Dict[int, List[Tuple[int, int, int, int]]]:
    """protocol -> disjoint (first, last, lowest rule index, flags) of one class."""
    any_items = [(lo, hi, idx, world) for idx, proto, lo, hi, world in content
                 if proto == PROTO_ALL]
    out: Dict[int, List[Tuple[int, int, int, int]]] = {}
    for proto in sorted({x[1] for x in content if x[1] != PROTO_ALL}):
        spans = [(lo, hi, idx, world) for idx, p, lo, hi, world in content if p == proto]
        out[proto] = _segments(spans + any_items)
    if any_items:
        out[PROTO_ANY] = [(0, PORT_SPACE - 1, min(x[2] for x in any_items),
                           FLAG_WORLD if any(x[3] for x in any_items) else 0)]
    return out


def network_bytes(net: IPNetwork) -> bytes:
    """16-byte address field: IPv4 in the first four bytes."""
    return net.network_address.packed.ljust(16, b"\0")

