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
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import ipaddress
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterable, List, Optional, Tuple

from controller.abi import CHAIN_MAX, FLAG_WORLD, PROTO_ANY
from controller.policy.model import (
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

    def fingerprint(self) -> str:
        """Stable across processes: decides whether a policy must be rewritten.
        (The hash of a frozenset of int tuples does not depend on the process's
        hash seed; only str/bytes hashes do.)"""
        peers, world = frozenset(self.peers.items()), frozenset(self.world.items())
        text = repr((len(peers), hash(peers), hash(frozenset(self.peers)),
                     sorted((k, len(v), hash(v)) for k, v in self.world.items()),
                     hash(world), self.plens and sorted(self.plens.items()), self.open_all,
                     self.exempt))
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


def _fold_chains(own: Dict[Tuple[int, int], set], bits: int) -> Dict[Tuple[int, int], set]:
    """Give every prefix (plen, network as int) with CHAIN_MAX - 1 nested
    prefixes below it the rules of all its ancestors (module docstring)."""
    plens = sorted({p for p, _ in own}, reverse=True)
    full = (1 << bits) - 1
    parent: Dict[Tuple[int, int], Tuple[int, int]] = {}
    height: Dict[Tuple[int, int], int] = dict.fromkeys(own, 0)
    for net in sorted(own, key=lambda n: -n[0]):
        for plen in plens:
            if plen >= net[0]:
                continue
            sup = (plen, net[1] & (full ^ ((1 << (bits - plen)) - 1)))
            if sup in own:
                parent[net] = sup
                height[sup] = max(height[sup], height[net] + 1)
                break
    out = dict(own)
    for net, h in height.items():
        if h >= CHAIN_MAX - 1 and net in parent:
            rules = set(own[net])
            up: Optional[Tuple[int, int]] = parent[net]
            while up is not None:
                rules |= own[up]
                up = parent.get(up)
            out[net] = rules
    return out


@functools.lru_cache(maxsize=1 << 18)
def _cidr_key(text: str) -> Tuple[int, Tuple[int, int]]:
    """Canonical CIDR text -> (family, (prefix length, network as int))."""
    net = ipaddress.ip_network(text)
    return net.version, (net.prefixlen, int(net.network_address))


def compile_policy(state: State, groups: Tuple[str, ...], rule_index: Dict[str, int]) -> Policy:
    pol = Policy(groups, exempt=tuple(sorted(
        (n.version, n.prefixlen, int(n.network_address)) for n in state.settings.exempt)))
    for direction in DIRECTIONS:
        d = DIR_INDEX[direction]
        rules = [r for g in groups for r in state.groups[g].rules_in(direction)]
        own: Dict[int, Dict[Tuple[int, int], set]] = {4: {}, 6: {}}
        world: Dict[int, set] = {4: set(), 6: set()}
        for r in rules:
            lo, hi = port_range(r)
            is_world = r.peer.is_world()
            item = (rule_index[r.rule_id], r.protocol, lo, hi, is_world)
            if r.peer.kind == "cidr":  # the common case, without building networks
                fam, key = _cidr_key(r.peer.value)
                own[fam].setdefault(key, set()).add(item)
                if is_world:
                    world[fam].add(item)
                continue
            for peer_net in state.peer_networks(r.peer):
                key = (peer_net.prefixlen, int(peer_net.network_address))
                own[peer_net.version].setdefault(key, set()).add(item)
        for family in (4, 6):
            pol.plens[(d, family)] = ()  # always written: its bitmap covers exempt addresses
            if not own[family]:
                continue
            bits = 32 if family == 4 else 128
            for (plen, addr), items in _fold_chains(own[family], bits).items():
                pol.peers[(d, family, plen, addr)] = frozenset(items)
            pol.plens[(d, family)] = tuple(sorted({p for p, _ in own[family]}, reverse=True))
            if world[family]:
                pol.world[(d, family)] = frozenset(world[family])
            for proto in (PROTO_TCP, PROTO_UDP):
                if any(x[1] == PROTO_ALL or (x[1] == proto and x[2] == 0 and x[3] == 65535)
                       for x in world[family]):
                    pol.open_all |= open_all_bit(direction, family, proto)
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
    wanted = set(only) if only is not None else {
        tuple(e.groups) for e in state.interfaces.values() if e.device}
    return Compiled({g: compile_policy(state, g, rule_index) for g in sorted(wanted)},
                    rule_index)


def network_bytes(net: IPNetwork) -> bytes:
    """16-byte address field: IPv4 in the first four bytes."""
    return net.network_address.packed.ljust(16, b"\0")

