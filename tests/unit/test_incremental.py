"""Work proportional to the change: the incremental compiler
(policy/incremental.py) and the key space's patch (formats/keyspace.py).
Any sequence of changes gives exactly what starting afresh gives."""

from __future__ import annotations

import ipaddress
from typing import Dict, List, Optional, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.policy.compiler import Policy
from controller.policy.errors import ValidationError
from controller.policy.formats import keyspace, native
from controller.policy.incremental import Compiler, compile_state
from controller.policy.model import (
    INGRESS,
    Peer,
    PrefixListEntry,
    SecurityGroup,
    State,
    make_rule,
    validate,
)
from tests.states import one_interface

# Nested prefixes (the fold's hard case: chains deeper than CHAIN_MAX) in
# 198.18.0.0/15, plus IPv6 and the world.
POOL = ["198.18.0.0/15", "198.18.0.0/16", "198.18.0.0/20", "198.18.0.0/24", "198.18.0.0/28",
        "198.18.0.0/30", "198.18.0.1/32", "198.18.0.2/32", "198.18.1.0/24", "198.19.0.0/16",
        "198.19.7.0/24", "198.19.7.7/32", "0.0.0.0/0", "2001:db8::/32", "2001:db8::/64",
        "2001:db8::1/128", "::/0"]
PEERS = [Peer("cidr", c) for c in POOL] + [Peer("sg", "sg-m"), Peer("pl", "pl-12345678")]
MEMBER_ADDRS = ["198.18.0.1", "198.18.0.2", "198.18.0.3", "198.19.7.7", "2001:db8::1"]

Op = Tuple[str, int, int]
ops = st.lists(st.tuples(st.sampled_from(["rule+", "rule-", "member+", "member-", "renumber",
                                          "group+", "group-", "settings", "sg-b+", "sg-b-", "pl"]),
                         st.integers(0, len(PEERS) - 1), st.integers(0, 40)),
               min_size=1, max_size=25)


def base() -> State:
    """A chain of nested prefixes deeper than CHAIN_MAX to start from."""
    return one_interface(
        ingress=[*({"proto": "tcp", "ports": 22, "from": c} for c in POOL[1:7]),
                 {"proto": "tcp", "ports": 80, "from": "sg-m"},
                 {"proto": "udp", "ports": 53, "from": "pl-12345678"}],
        extra_groups={"sg-m": {"name": "m"}, "sg-b": {"name": "b"}},
        others={"eni-m": {"groups": ["sg-m"], "ipv4": ["198.18.0.1"]}},
        prefix_lists={"pl-12345678": {"name": "p", "family": "ipv4", "max_entries": 5,
                                      "entries": [{"cidr": "198.18.0.0/20"}]}})


def change(state: State, op: Op) -> State:
    kind, peer_i, n = op
    new = state.copy()
    if kind == "sg-b-":
        new.groups.pop("sg-b", None)
        new.interfaces["eni-a"].groups = ["sg-a"]
        return validate(new)
    if kind == "sg-b+" or "sg-b" not in new.groups:
        new.groups.setdefault("sg-b", SecurityGroup("sg-b", "b"))
    if kind == "pl":
        entries = new.prefix_lists["pl-12345678"].entries
        net = ipaddress.ip_network(POOL[n % 7])
        if any(e.cidr == net for e in entries):
            entries[:] = [e for e in entries if e.cidr != net]
        elif len(entries) < 5:
            entries.append(PrefixListEntry(net))  # type: ignore[arg-type]
    if kind == "settings":
        new.settings.exempt_dhcp = not new.settings.exempt_dhcp
        new.settings.exempt = [] if new.settings.exempt else [ipaddress.ip_network("198.18.5.0/24")]
    group = new.groups["sg-b" if n % 3 == 0 else "sg-a"]
    if kind == "rule+":
        peer = PEERS[peer_i]
        fam6 = peer.kind == "cidr" and ":" in peer.value
        rule = make_rule(group.group_id, INGRESS, "tcp" if n % 2 else -1,
                         1000 + n if n % 2 else None, 1000 + 2 * n if n % 2 else None, peer)
        if fam6 and peer.value == "::/0" and n % 4 == 1:
            rule = make_rule(group.group_id, INGRESS, "tcp", 0, 65535, peer)
        if all(r.identity() != rule.identity() for r in group.rules):
            group.rules.append(rule)
    elif kind == "rule-" and group.rules:
        group.rules.pop(n % len(group.rules))
    elif kind in ("member+", "member-"):
        eni = new.interfaces["eni-m"]
        a = ipaddress.ip_address(MEMBER_ADDRS[n % len(MEMBER_ADDRS)])
        have = eni.ipv4 if a.version == 4 else eni.ipv6
        if kind == "member+" and a not in have:
            have.append(a)  # type: ignore[arg-type]
        elif kind == "member-" and a in have:
            have.remove(a)  # type: ignore[arg-type]
    elif kind == "group+":
        eni = new.interfaces["eni-a"]
        if "sg-b" not in eni.groups:
            eni.groups.append("sg-b")
    elif kind == "group-":
        new.interfaces["eni-a"].groups = ["sg-a"]
    return validate(new)


def same(a: Policy, b: Policy) -> None:
    assert a.peers == b.peers
    assert a.plens == b.plens
    assert a.world == b.world
    assert a.open_all == b.open_all
    assert a.exempt == b.exempt
    assert a.peers_hash == b.peers_hash
    assert a.fingerprint() == b.fingerprint()


@settings(max_examples=150, deadline=None)
@given(ops)
def test_any_sequence_of_changes_compiles_as_from_scratch(steps: List[Op]) -> None:
    comp = Compiler()
    state = base()
    offset = 0
    for op in steps:
        state = change(state, op)
        if op[0] == "renumber":
            offset += 7  # every rule gets another number: everything changes
        numbers = {r.rule_id: i + 1 + offset for i, r in
                   enumerate(sorted((r for g in state.groups.values() for r in g.rules),
                                    key=lambda r: r.rule_id))}
        got = comp.compile(state, rule_index=numbers)
        want = compile_state(state, rule_index=numbers)
        assert got.policies.keys() == want.policies.keys()
        for k, pol in got.policies.items():
            same(pol, want.policies[k])


def test_a_change_reports_only_the_prefixes_it_touched() -> None:
    comp = Compiler()
    numbers: Dict[str, int] = {}

    def compile_one(state: State) -> Policy:
        for g in state.groups.values():  # each rule keeps its number (as number_rules does)
            for r in g.rules:
                numbers.setdefault(r.rule_id, len(numbers) + 1)
        return next(iter(comp.compile(state, rule_index=numbers).policies.values()))

    state = base()
    assert compile_one(state).since is None  # nothing to start from: everything is new
    assert compile_one(state).changed == frozenset()  # the same state again
    state = change(state, ("member+", 0, 1))  # 198.18.0.2 joins sg-m, which sg-a allows
    pol = compile_one(state)
    assert pol.since is not None
    assert pol.changed == {(0, 4, 32, int(ipaddress.ip_address("198.18.0.2")))}
    new = state.copy()
    new.groups["sg-a"].rules.append(make_rule("sg-a", INGRESS, "tcp", 443, 443,
                                              Peer("cidr", "198.19.7.0/24")))
    assert compile_one(validate(new)).changed == {
        (0, 4, 24, int(ipaddress.ip_address("198.19.7.0")))}


# --------------------------------------------------------------------------- key space

@settings(max_examples=100, deadline=None)
@given(ops)
def test_patching_the_key_space_equals_decoding_it(steps: List[Op]) -> None:
    state = base()
    kvs = keyspace.encode(state)
    held = keyspace.decode(kvs)
    for op in steps:
        state = change(state, op)
        new = keyspace.encode(state)
        puts, deletes = keyspace.diff(kvs, new)
        changes: Dict[str, Optional[bytes]] = {**puts, **dict.fromkeys(deletes)}
        held = keyspace.patch(held, changes)
        kvs = new
        assert keyspace.encode(held) == kvs
        assert native.dump(held) == native.dump(keyspace.decode(kvs))


def test_a_patch_shares_what_it_did_not_change() -> None:
    state = base()
    held = keyspace.decode(keyspace.encode(state))
    key = keyspace.DEFAULT_PREFIX + "interfaces/eni-m"
    after = keyspace.patch(held, {key: b'{"groups": ["sg-m"], "ipv4": ["198.18.0.9"]}'})
    assert [str(a) for a in after.interfaces["eni-m"].ipv4] == ["198.18.0.9"]
    assert after.interfaces["eni-a"] is held.interfaces["eni-a"]
    assert all(a is b for a, b in zip(after.groups["sg-a"].rules, held.groups["sg-a"].rules))
    assert [str(a) for a in held.interfaces["eni-m"].ipv4] == ["198.18.0.1"]  # left as it was


def test_a_bad_patch_names_its_key() -> None:
    held = keyspace.decode(keyspace.encode(base()))
    key = keyspace.DEFAULT_PREFIX + "rules/sg-nope/sgr-0123456789abcdef0"
    with pytest.raises(ValidationError, match="sg-nope"):
        keyspace.patch(held, {key: b'{"id": "sgr-0123456789abcdef0", "proto": "tcp", '
                                   b'"ports": 1, "from": "198.18.0.0/16", "direction": "ingress"}'})
    with pytest.raises(ValidationError, match="groups/sg-a"):
        keyspace.patch(held, {keyspace.DEFAULT_PREFIX + "groups/sg-a": None})
