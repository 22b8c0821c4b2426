"""Policies compiled change by change (compiler.py, step 4).

A ``Compiler`` keeps, per group set, what its last compile found: each
rule's contribution (its item and the prefixes its peer stands for), the
prefixes with their own rules per (direction, family), their nesting
(chains.py) and the classes it produced. The next compile of the set finds
what changed -- rules by object identity (rules are immutable and shared
by copies of a state; a rule whose number or whose peer's addresses
changed counts as changed too) -- and updates only the prefixes those
rules name, then the classes of the prefixes whose rule set may differ.
Many changes at once (a first compile, a whole new document) rebuild the
nesting in one sorted pass instead.

A fresh ``Compiler`` compiles from scratch through the same code, and
tests check that any sequence of changes compiles to what a fresh one
gives.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Set, Tuple

from controller.policy.chains import REBUILD_AT, Chains, Prefix
from controller.policy.compiler import (
    DIR_INDEX,
    HASH_MOD,
    ClassContent,
    Compiled,
    PeerPrefix,
    Policy,
    open_all_bit,
    peer_hash,
    port_range,
)
from controller.policy.model import (
    DIRECTIONS,
    PROTO_ALL,
    PROTO_TCP,
    PROTO_UDP,
    NetworkInterface,
    Peer,
    Rule,
    State,
    all_rules,
)

Item = Tuple[int, int, int, int, bool]  # (rule index, protocol, first, last, world): one rule in a class
Slot = Tuple[int, int]  # (dir index, family)
Where = Tuple[Tuple[int, Prefix], ...]  # (family, prefix) a rule's peer stands for
Addresses = Tuple[NetworkInterface, List[Tuple[int, Prefix]]]  # an interface's, as prefixes

_serials = itertools.count(1)


@functools.lru_cache(maxsize=1 << 18)
def _cidr_key(text: str) -> Tuple[int, Prefix]:
    """Canonical CIDR text -> (family, (prefix length, network as int))."""
    net = ipaddress.ip_network(text)
    return net.version, (net.prefixlen, int(net.network_address))


class _Members:
    """Group id -> its members' addresses as (family, prefix): one pass over
    the interfaces, made only when a compile meets a group reference."""

    def __init__(self, state: State, known: Dict[str, Addresses]) -> None:
        self.state = state
        self.known = known  # eni id -> (interface, its addresses) of the last compile
        self._by_group: Optional[Dict[str, List[Tuple[int, Prefix]]]] = None

    def where(self, peer: Peer) -> Where:
        if peer.kind == "pl":
            nets = self.state.peer_networks(peer)
            return tuple(sorted({(n.version, (n.prefixlen, int(n.network_address)))
                                 for n in nets}))
        if self._by_group is None:
            self._by_group = {}
            known, self.known = self.known, {}
            for eid, eni in self.state.interfaces.items():
                if not eni.groups:
                    continue
                had = known.get(eid)
                if had is not None and had[0] is eni:
                    addrs = had[1]
                else:
                    addrs = [(a.version, (a.max_prefixlen, int(a))) for a in eni.addresses()]
                self.known[eid] = (eni, addrs)
                for gid in eni.groups:
                    self._by_group.setdefault(gid, []).extend(addrs)
        return tuple(sorted(set(self._by_group.get(peer.value, ()))))


@dataclass
class _SetCache:
    """One group set's last compile."""

    groups: Tuple[str, ...]
    rules: Dict[int, Tuple[Rule, Item, Where]] = field(default_factory=dict)  # id(rule) ->
    numbers: Dict[str, int] = field(default_factory=dict)  # rule id -> the number compiled in
    by_peer: Dict[Peer, Set[int]] = field(default_factory=dict)  # group/prefix-list peer -> rules
    resolved: Dict[Peer, Where] = field(default_factory=dict)  # what those stood for
    own: Dict[Slot, Dict[Prefix, Set[Item]]] = field(default_factory=dict)
    chains: Dict[Slot, Chains] = field(default_factory=dict)
    world: Dict[Slot, Set[Item]] = field(default_factory=dict)
    peers: Dict[PeerPrefix, ClassContent] = field(default_factory=dict)
    peers_hash: int = 0
    serial: Optional[int] = None

    def __post_init__(self) -> None:
        for d in DIR_INDEX.values():
            for fam, bits in ((4, 32), (6, 128)):
                self.own[(d, fam)] = {}
                self.chains[(d, fam)] = Chains(bits)
                self.world[(d, fam)] = set()

    def _put(self, key: PeerPrefix, content: Optional[ClassContent]) -> None:
        old = self.peers.pop(key, None)
        if old is not None:
            self.peers_hash -= peer_hash(key, old)
        if content is not None:
            self.peers[key] = content
            self.peers_hash += peer_hash(key, content)
        self.peers_hash %= HASH_MOD

    def update(self, state: State, rule_index: Dict[str, int], members: _Members) -> Policy:
        # 1. which rules came, went or changed (by identity, number, peer's
        #    addresses) -- in set operations, so that a group of 10k rules
        #    of which one changed costs C loops, not Python ones
        lists = [state.groups[g].rules for g in self.groups]
        if len(lists) == 1:
            now = dict(zip(map(id, lists[0]), lists[0]))
        else:
            now = {id(r): r for rules in lists for r in rules}
        gone = list(self.rules.keys() - now.keys())
        came_ids = now.keys() - self.rules.keys()
        for i in gone:
            self.numbers.pop(self.rules[i][0].rule_id, None)
        if not self.numbers.items() <= rule_index.items():  # rules were numbered afresh
            renumbered = [i for i, (r, item, _) in self.rules.items()
                          if i in now and rule_index[r.rule_id] != item[0]]
            gone += renumbered
            came_ids |= set(renumbered)
        resolved = {peer: members.where(peer) for peer in self.by_peer}
        for peer, ids in self.by_peer.items():
            if self.resolved.get(peer) != resolved[peer]:  # its addresses changed
                moved = ids & now.keys()
                gone += moved
                came_ids |= moved
        came = [now[i] for i in came_ids]
        for r in came:
            if r.peer.kind != "cidr" and r.peer not in resolved:
                resolved[r.peer] = members.where(r.peer)
        self.resolved = resolved

        # 2. the prefixes' own rules
        touched: Dict[Slot, Set[Prefix]] = {s: set() for s in self.own}
        where: Where
        for i in set(gone):
            r, item, where = self.rules.pop(i)
            self.numbers.pop(r.rule_id, None)
            if r.peer.kind != "cidr":
                self.by_peer[r.peer].discard(i)
                if not self.by_peer[r.peer]:
                    del self.by_peer[r.peer]
            d = DIR_INDEX[r.direction]
            for fam, p in where:
                own = self.own[(d, fam)]
                rules = own[p]
                rules.discard(item)
                if not rules:
                    del own[p]
                touched[(d, fam)].add(p)
                if item[4]:
                    self.world[(d, fam)].discard(item)
        for r in came:
            lo, hi = port_range(r)
            is_world = r.peer.is_world()
            item = (rule_index[r.rule_id], r.protocol, lo, hi, is_world)
            where = (_cidr_key(r.peer.value),) if r.peer.kind == "cidr" else resolved[r.peer]
            self.rules[id(r)] = (r, item, where)
            self.numbers[r.rule_id] = item[0]
            if r.peer.kind != "cidr":
                self.by_peer.setdefault(r.peer, set()).add(id(r))
            d = DIR_INDEX[r.direction]
            for fam, p in where:
                self.own[(d, fam)].setdefault(p, set()).add(item)
                touched[(d, fam)].add(p)
                if is_world:
                    self.world[(d, fam)].add(item)

        # 3. nesting, then the classes of every prefix whose rule set may differ
        changed: Set[PeerPrefix] = set()
        for slot, ps in touched.items():
            if ps:
                self._reclass(slot, ps, changed)
        return self._policy(state, changed)

    def _reclass(self, slot: Slot, touched: Set[Prefix], changed: Set[PeerPrefix]) -> None:
        own, chains = self.own[slot], self.chains[slot]
        added = [p for p in touched if p in own and p not in chains.parent]
        removed = [p for p in touched if p not in own and p in chains.parent]
        if len(added) + len(removed) > REBUILD_AT or not chains.parent:
            chains.rebuild(own)
            redo: Iterable[Prefix] = own
            for key in [k for k in self.peers if k[:2] == slot and (k[2], k[3]) not in own]:
                self._put(key, None)
                changed.add(key)
        else:
            moved: Set[Prefix] = set(touched)
            for p in removed:
                chains.remove(p, moved)
            for p in added:
                chains.add(p, moved)
            for p in removed:
                self._put((*slot, *p), None)
                changed.add((*slot, *p))
            redo = chains.affected(moved)
        for p in redo:
            if chains.is_deep(p):
                rules: Set[Item] = set()
                for q in chains.chain(p):
                    rules |= own[q]
                content = frozenset(rules)
            else:
                content = frozenset(own[p])
            key = (*slot, *p)
            if self.peers.get(key) != content:
                self._put(key, content)
                changed.add(key)

    def _policy(self, state: State, changed: Set[PeerPrefix]) -> Policy:
        pol = Policy(self.groups, peers=dict(self.peers), peers_hash=self.peers_hash,
                     exempt=tuple(sorted((n.version, n.prefixlen, int(n.network_address))
                                         for n in state.settings.exempt)),
                     serial=next(_serials), since=self.serial, changed=frozenset(changed))
        self.serial = pol.serial
        for direction in DIRECTIONS:
            d = DIR_INDEX[direction]
            for family in (4, 6):
                slot = (d, family)
                pol.plens[slot] = tuple(self.chains[slot].plens())  # always written: its
                world = self.world[slot]  # bitmap covers exempt addresses
                if world:
                    pol.world[slot] = frozenset(world)
                for proto in (PROTO_TCP, PROTO_UDP):
                    if any(x[1] == PROTO_ALL or (x[1] == proto and x[2] == 0 and x[3] == 65535)
                           for x in world):
                        pol.open_all |= open_all_bit(direction, family, proto)
        return pol


class Compiler:
    """Compiles states one after another, each from the last (module doc).
    Not thread-safe: one owner (the reconciler) calls it."""

    def __init__(self) -> None:
        self.sets: Dict[Tuple[str, ...], _SetCache] = {}
        self.addresses: Dict[str, Addresses] = {}

    def compile(self, state: State, only: Optional[Iterable[Tuple[str, ...]]] = None,
                rule_index: Optional[Dict[str, int]] = None) -> Compiled:
        """The policy of every group set used by a bound interface (or of
        ``only``). ``rule_index`` (rule id -> index, the rule's number in the
        kernel) lets the caller keep each rule's number across changes; by
        default rules are numbered in id order."""
        if rule_index is None:
            rule_index = {rid: i + 1
                          for i, rid in enumerate(sorted(r.rule_id for r in all_rules(state)))}
        wanted = set(only) if only is not None else {
            tuple(e.groups) for e in state.bound_interfaces()}
        members = _Members(state, self.addresses)
        self.sets = {g: self.sets.get(g) or _SetCache(g) for g in sorted(wanted)}
        try:
            out = Compiled({g: c.update(state, rule_index, members)
                            for g, c in self.sets.items()}, rule_index)
            if members._by_group is not None:
                self.addresses = members.known
            return out
        except BaseException:
            self.sets = {}  # half-updated: the next compile starts afresh
            raise


def compile_state(state: State, only: Optional[Iterable[Tuple[str, ...]]] = None,
                  rule_index: Optional[Dict[str, int]] = None) -> Compiled:
    """A compile from scratch."""
    return Compiler().compile(state, only, rule_index)
