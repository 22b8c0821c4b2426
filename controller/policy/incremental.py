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
from controller.policy.model import DIRECTIONS, PROTO_ALL, PROTO_TCP, PROTO_UDP, Peer, Rule, State, all_rules

Item = Tuple[int, int, int, int, bool]  # (rule index, protocol, first, last, world): one rule in a class
Slot = Tuple[int, int]  # (dir index, family)
Where = Tuple[Tuple[int, Prefix], ...]  # (family, prefix) a rule's peer stands for

_serials = itertools.count(1)


@functools.lru_cache(maxsize=1 << 18)
def _cidr_key(text: str) -> Tuple[int, Prefix]:
    """Canonical CIDR text -> (family, (prefix length, network as int))."""
    net = ipaddress.ip_network(text)
    return net.version, (net.prefixlen, int(net.network_address))


class _Members:
    """Group id -> its members' addresses as (family, prefix): one pass over
    the interfaces, made only when a compile meets a group reference."""

    def __init__(self, state: State) -> None:
        self.state = state
        self._by_group: Optional[Dict[str, List[Tuple[int, Prefix]]]] = None

    def where(self, peer: Peer) -> Where:
        if peer.kind == "pl":
            nets = self.state.peer_networks(peer)
            return tuple(sorted({(n.version, (n.prefixlen, int(n.network_address)))
                                 for n in nets}))
        if self._by_group is None:
            self._by_group = {}
            for eni in self.state.interfaces.values():
                if not eni.groups:
                    continue
                addrs = [_cidr_key(f"{a}/{a.max_prefixlen}") for a in eni.addresses()]
                for gid in eni.groups:
                    self._by_group.setdefault(gid, []).extend(addrs)
        return tuple(sorted(set(self._by_group.get(peer.value, ()))))


@dataclass
class _SetCache:
    """One group set's last compile."""

    groups: Tuple[str, ...]
    rules: Dict[int, Tuple[Rule, Item, Where]] = field(default_factory=dict)  # id(rule) ->
    resolved: Dict[Peer, Where] = field(default_factory=dict)  # group and prefix-list peers
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
        # 1. which rules came, went or changed (by identity, number, peer's addresses)
        now: Dict[int, Rule] = {}
        for g in self.groups:
            for r in state.groups[g].rules:
                now[id(r)] = r
        resolved: Dict[Peer, Where] = {}
        gone: List[int] = [i for i in self.rules if i not in now]
        came: List[Rule] = []
        for i, r in now.items():
            if r.peer.kind != "cidr" and r.peer not in resolved:
                resolved[r.peer] = members.where(r.peer)
            had = self.rules.get(i)
            if had is None:
                came.append(r)
            elif had[1][0] != rule_index[r.rule_id] or (
                    r.peer.kind != "cidr" and self.resolved.get(r.peer) != resolved[r.peer]):
                gone.append(i)
                came.append(r)
        self.resolved = resolved

        # 2. the prefixes' own rules
        touched: Dict[Slot, Set[Prefix]] = {s: set() for s in self.own}
        where: Where
        for i in gone:
            r, item, where = self.rules.pop(i)
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
            tuple(e.groups) for e in state.interfaces.values() if e.device}
        members = _Members(state)
        self.sets = {g: self.sets.get(g) or _SetCache(g) for g in sorted(wanted)}
        try:
            return Compiled({g: c.update(state, rule_index, members)
                             for g, c in self.sets.items()}, rule_index)
        except BaseException:
            self.sets = {}  # half-updated: the next compile starts afresh
            raise


def compile_state(state: State, only: Optional[Iterable[Tuple[str, ...]]] = None,
                  rule_index: Optional[Dict[str, int]] = None) -> Compiled:
    """A compile from scratch."""
    return Compiler().compile(state, only, rule_index)
