"""Desired state -> map entries. A pure function: no kernel, no I/O.

Classification without a per-rule loop (DESIGN.md 2.2):

1. *Peer classes.* For one policy (a set of groups), direction and family,
   every CIDR the rules mention (prefix lists and group members expanded) is
   a prefix. Prefix P gets the class whose rule set is *every rule whose
   peer contains P*; since rules only allow, the longest match of the remote
   address then carries the union of the rules that match it. Prefixes with
   the same rule set share a class.
2. *Port segments.* For each class and protocol the port space (or ICMP
   type<<8|code) is cut into intervals with a constant rule set; each
   interval becomes <= 30 LPM prefixes. Rules of protocol -1 are folded into
   every specific protocol of the class and also kept under ``PROTO_ANY`` for
   protocols with no rule of their own, so the datapath does at most two
   lookups: (class, proto, port), then (class, ANY).
3. *Untracked flows* (1.4) need, per packet: does a world rule (peer
   0.0.0.0/0 or ::/0) allow it here (segment flag ``WORLD``), is the other
   direction world-open on all ports for the protocol (endpoint bits
   ``open_all``), and -- for replies -- does a world rule of the other
   direction allow the reversed packet (a lookup in the *world class*).
"""

from __future__ import annotations

import hashlib
import heapq
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterable, List, Optional, Tuple

from .model import (
    DIRECTIONS,
    EGRESS,
    INGRESS,
    PROTO_ALL,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    IPNetwork,
    Rule,
    State,
    all_rules,
)

PROTO_ANY = 256  # key value for "protocol -1" entries
FLAG_WORLD = 0x1  # some rule of this segment has peer 0.0.0.0/0 or ::/0
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


@dataclass(frozen=True)
class PeerEntry:
    direction: str
    family: int
    network: IPNetwork
    cls: int


@dataclass(frozen=True)
class PortEntry:
    cls: int
    proto: int  # 0-255 or PROTO_ANY
    port: int  # prefix value (host order)
    plen: int  # 0-16
    rule_index: int
    flags: int


@dataclass
class Policy:
    """Everything one group set needs in the maps (policy id assigned later)."""

    groups: Tuple[str, ...]
    peers: List[PeerEntry] = field(default_factory=list)
    ports: List[PortEntry] = field(default_factory=list)
    world_class: Dict[Tuple[str, int], int] = field(default_factory=dict)  # (dir, fam) -> cls
    open_all: int = 0
    nclasses: int = 0

    def fingerprint(self) -> str:
        """Stable across processes: decides whether a policy must be rewritten."""
        text = repr((self.peers, self.ports, sorted(self.world_class.items()), self.open_all))
        return hashlib.sha256(text.encode()).hexdigest()


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


class _Builder:
    def __init__(self, state: State, rule_index: Dict[str, int]) -> None:
        self.state = state
        self.rule_index = rule_index

    def port_entries(self, cls: int, rules: FrozenSet[Rule]) -> List[PortEntry]:
        by_proto: Dict[int, List[Rule]] = {}
        for r in rules:
            by_proto.setdefault(r.protocol, []).append(r)
        any_rules = by_proto.pop(PROTO_ALL, [])
        out: List[PortEntry] = []
        for proto in sorted(by_proto):
            spans = [(*port_range(r), self.rule_index[r.rule_id], r.peer.is_world())
                     for r in by_proto[proto] + any_rules]
            for lo, hi, idx, flags in _segments(spans):
                for port, plen in range_to_prefixes(lo, hi):
                    out.append(PortEntry(cls, proto, port, plen, idx, flags))
        if any_rules:
            idx = min(self.rule_index[r.rule_id] for r in any_rules)
            flags = FLAG_WORLD if any(r.peer.is_world() for r in any_rules) else 0
            out.append(PortEntry(cls, PROTO_ANY, 0, 0, idx, flags))
        return out

    def policy(self, groups: Tuple[str, ...]) -> Policy:
        pol = Policy(groups)
        classes: Dict[FrozenSet[Rule], int] = {}

        def class_of(ruleset: FrozenSet[Rule]) -> int:
            if ruleset not in classes:
                classes[ruleset] = len(classes) + 1
                pol.ports.extend(self.port_entries(classes[ruleset], ruleset))
            return classes[ruleset]

        for direction in DIRECTIONS:
            rules = [r for g in groups for r in self.state.groups[g].rules_in(direction)]
            for family in (4, 6):
                by_net: Dict[IPNetwork, List[Rule]] = {}
                for r in rules:
                    for net in self.state.peer_networks(r.peer):
                        if net.version == family:
                            by_net.setdefault(net, []).append(r)
                plens = sorted({n.prefixlen for n in by_net})
                for net in sorted(by_net, key=lambda n: (n.prefixlen, int(n.network_address))):
                    members: set = set()
                    for plen in plens:
                        if plen > net.prefixlen:
                            break
                        sup = net.supernet(new_prefix=plen) if plen < net.prefixlen else net
                        members.update(by_net.get(sup, ()))
                    pol.peers.append(PeerEntry(direction, family, net,
                                               class_of(frozenset(members))))
                world = frozenset(r for r in rules
                                  if r.peer.is_world() and r.peer.network.version == family)
                if world:
                    pol.world_class[(direction, family)] = class_of(world)
                for proto in (PROTO_TCP, PROTO_UDP):
                    if any(r.protocol == PROTO_ALL or (r.protocol == proto and r.from_port == 0
                                                       and r.to_port == 65535) for r in world):
                        pol.open_all |= open_all_bit(direction, family, proto)
        pol.nclasses = len(classes)
        return pol


def compile_state(state: State, only: Optional[Iterable[Tuple[str, ...]]] = None,
                  rule_index: Optional[Dict[str, int]] = None) -> Compiled:
    """Compile the policy of every group set used by a bound interface.

    ``rule_index`` (rule id -> index, the rule's number in the kernel) lets
    the caller keep each rule's number across changes, so that a policy whose
    rules did not change compiles to the same entries; by default rules are
    numbered in id order."""
    if rule_index is None:
        rule_index = {rid: i + 1
                      for i, rid in enumerate(sorted(r.rule_id for r in all_rules(state)))}
    builder = _Builder(state, rule_index)
    wanted = set(only) if only is not None else {
        tuple(e.groups) for e in state.interfaces.values() if e.device}
    return Compiled({g: builder.policy(g) for g in sorted(wanted)}, rule_index)


def network_bytes(net: IPNetwork) -> bytes:
    """16-byte address field: IPv4 in the first four bytes."""
    return net.network_address.packed.ljust(16, b"\0")

