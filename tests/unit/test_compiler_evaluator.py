"""Compiler and reference evaluator, no kernel needed."""

from __future__ import annotations

import ipaddress
import random

import pytest

from controller.abi import CHAIN_MAX, FLAG_WORLD, PROTO_ANY
from controller.abi.reasons import Reason
from controller.policy.compiler import (
    _segments,
    class_segments,
    open_all_bit,
    range_to_prefixes,
)
from controller.policy.evaluator import TCP_ACK, TCP_SYN, Evaluator, Packet, addr
from controller.policy.incremental import compile_state
from tests.states import one_interface

L, R = addr("198.18.0.10"), addr("198.18.1.1")


@pytest.mark.parametrize("lo, hi", [(0, 65535), (1, 65534), (80, 80), (1000, 2000), (0, 0),
                                    (65535, 65535), (1024, 65535)])
def test_range_to_prefixes_covers_exactly(lo: int, hi: int) -> None:
    covered = set()
    prefixes = range_to_prefixes(lo, hi)
    for value, plen in prefixes:
        size = 1 << (16 - plen)
        assert value % size == 0
        covered.update(range(value, value + size))
    assert covered == set(range(lo, hi + 1))
    assert len(prefixes) <= 30


def test_segments_union_and_min_rule() -> None:
    segs = _segments([(80, 80, 3, False), (0, 65535, 5, True), (70, 90, 1, False)])
    assert segs == [(0, 69, 5, FLAG_WORLD), (70, 90, 1, FLAG_WORLD), (91, 65535, 5, FLAG_WORLD)]


def test_segments_random_against_brute_force() -> None:
    rnd = random.Random(7)
    for _ in range(50):
        items = []
        for _ in range(rnd.randint(1, 6)):
            lo = rnd.randint(0, 300)
            items.append((lo, lo + rnd.randint(0, 50), rnd.randint(1, 9), rnd.random() < 0.3))
        segs = _segments(items)
        for port in range(0, 400):
            live = [(i, w) for lo, hi, i, w in items if lo <= port <= hi]
            got = [s for s in segs if s[0] <= port <= s[1]]
            if not live:
                assert not got
                continue
            assert got[0][2] == min(i for i, _ in live)
            assert bool(got[0][3]) == any(w for _, w in live)


def _ingress_classes(pol) -> dict:  # type: ignore[no-untyped-def]
    return {str(ipaddress.ip_network((net, plen))): content
            for (d, fam, plen, net), content in pol.peers.items() if d == 0}


def test_prefix_classes_hold_their_own_rules() -> None:
    state = one_interface(ingress=[{"proto": "tcp", "ports": 80, "from": "198.18.0.0/15"},
                                   {"proto": "tcp", "ports": 22, "from": "198.18.1.0/24"},
                                   {"proto": "udp", "ports": 53, "from": "198.18.1.1/32"}],
                          egress=[])
    pol = next(iter(compile_state(state).policies.values()))
    cls = _ingress_classes(pol)
    assert {x[1] for x in cls["198.18.1.1/32"]} == {17}, "no copies of the containing rules"
    assert {(x[1], x[2]) for x in cls["198.18.0.0/15"]} == {(6, 80)}
    assert pol.plens[(0, 4)] == (32, 24, 15)
    assert pol.open_all == 0 and not pol.world


def test_deep_nesting_folds_ancestors_into_the_last_checked_prefix() -> None:
    nets = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.0/28", "10.1.2.1/32"]
    state = one_interface(ingress=[{"proto": "tcp", "ports": 100 + i, "from": n}
                                   for i, n in enumerate(nets)], egress=[])
    pol = next(iter(compile_state(state).policies.values()))
    cls = _ingress_classes(pol)
    ports = {n: {x[2] for x in cls[n]} for n in nets}
    assert CHAIN_MAX == 4
    # 10.1.0.0/16 has 3 nested prefixes below it: it may be the 4th checked
    assert ports["10.1.0.0/16"] == {100, 101}
    assert ports["10.1.2.0/24"] == {102} and ports["10.1.2.1/32"] == {104}
    assert ports["10.0.0.0/8"] == {100}


def test_class_segments_fold_protocol_any() -> None:
    content = frozenset({(1, 6, 80, 80, False), (2, -1, 0, 65535, True)})
    segs = class_segments(content)
    assert segs[6] == [(0, 79, 2, FLAG_WORLD), (80, 80, 1, FLAG_WORLD), (81, 65535, 2, FLAG_WORLD)]
    assert segs[PROTO_ANY] == [(0, 65535, 2, FLAG_WORLD)]


def test_world_bits_and_any_protocol() -> None:
    state = one_interface(ingress=[{"proto": "tcp", "ports": 80, "from": "0.0.0.0/0"}])
    pol = next(iter(compile_state(state).policies.values()))
    assert pol.open_all & open_all_bit("egress", 4, 6) and pol.open_all & open_all_bit("egress", 6, 17)
    assert not pol.open_all & open_all_bit("ingress", 4, 6)
    assert (0, 4) in pol.world and (1, 6) in pol.world
    assert any(x[1] == -1 and x[4] for x in pol.world[(1, 4)])


def test_unchanged_group_set_keeps_fingerprint() -> None:
    a = compile_state(one_interface(ingress=[{"proto": "tcp", "ports": 80, "from": "0.0.0.0/0"}]))
    b = compile_state(one_interface(ingress=[{"proto": "tcp", "ports": 80, "from": "0.0.0.0/0"}]))
    c = compile_state(one_interface(ingress=[{"proto": "tcp", "ports": 81, "from": "0.0.0.0/0"}]))
    fa, fb, fc = (next(iter(x.policies.values())).fingerprint() for x in (a, b, c))
    assert fa == fb != fc


def test_compiles_10k_rules() -> None:
    rules = [{"proto": "tcp", "ports": f"{1000 + i % 50}-{1100 + i % 50}",
              "from": str(ipaddress.ip_network((0xC6120000 + (i << 8), 24)))} for i in range(10000)]
    state = one_interface(ingress=rules)
    pol = next(iter(compile_state(state).policies.values()))
    assert len([k for k in pol.peers if k[0] == 0]) == 10000


def test_evaluator_tracked_flow_and_timeouts() -> None:
    now = {"t": 0}
    ev = Evaluator(one_interface(ingress=[{"proto": "tcp", "ports": 80, "from": "198.18.1.0/24"}],
                                 egress=[]), clock=lambda: now["t"])
    assert ev.packet("eni-a", "ingress", Packet(R, L, 6, 5, 80)).reason == Reason.ALLOW_NEW
    assert ev.packet("eni-a", "egress", Packet(L, R, 6, 80, 5, tcp_flags=TCP_SYN | TCP_ACK)).reason \
        == Reason.ALLOW_ESTABLISHED
    now["t"] = 61  # a handshake the origin never completed is half-open: 60 s
    assert ev.packet("eni-a", "egress", Packet(L, R, 6, 80, 5, tcp_flags=TCP_ACK)).reason \
        == Reason.DROP_NO_RULE
    now["t"] = 0
    assert ev.packet("eni-a", "ingress", Packet(R, L, 6, 6, 80)).reason == Reason.ALLOW_NEW
    assert ev.packet("eni-a", "egress", Packet(L, R, 6, 80, 6, tcp_flags=TCP_SYN | TCP_ACK)).reason \
        == Reason.ALLOW_ESTABLISHED
    assert ev.packet("eni-a", "ingress", Packet(R, L, 6, 6, 80, tcp_flags=TCP_ACK)).reason \
        == Reason.ALLOW_ESTABLISHED  # the handshake's ACK: established
    now["t"] = 432000
    assert ev.packet("eni-a", "egress", Packet(L, R, 6, 80, 6, tcp_flags=TCP_ACK)).reason \
        == Reason.ALLOW_ESTABLISHED
    now["t"] += 432001
    assert ev.packet("eni-a", "egress", Packet(L, R, 6, 80, 6, tcp_flags=TCP_ACK)).reason \
        == Reason.DROP_NO_RULE


def test_evaluator_explains_rules_and_tracking() -> None:
    ev = Evaluator(one_interface(ingress=[{"proto": "tcp", "ports": 80, "from": "0.0.0.0/0",
                                           "description": "web"},
                                          {"proto": "tcp", "ports": "1-100", "from": "198.18.1.1/32"}]))
    v = ev.packet("eni-a", "ingress", Packet(R, L, 6, 5, 80))
    assert v.reason == Reason.ALLOW_UNTRACKED and not v.tracked
    assert sorted(r.description for r in v.rules) == ["", "web"]


def test_evaluator_unknown_interface_passes() -> None:
    ev = Evaluator(one_interface())
    assert ev.packet("eni-zzz", "ingress", Packet(R, L, 6, 5, 80)).reason == Reason.PASS_UNBOUND


def test_rule_numbers_are_reused_only_when_the_counter_slots_run_out() -> None:
    from controller import abi
    from controller.reconcile.applied import Applied
    from controller.reconcile.plan import number_rules

    state = one_interface(ingress=[{"proto": "tcp", "ports": p, "from": "10.0.0.0/8"}
                                   for p in range(1, 6)])
    applied = Applied(next_rule_index=abi.RULE_SLOTS - 2)
    numbers, _, reused = number_rules(applied, state)
    values = list(numbers.values())
    assert len(set(values)) == len(values), "every rule has its own number"
    assert {abi.RULE_SLOTS - 2, abi.RULE_SLOTS - 1} <= set(values)
    assert sorted(reused) == list(range(1, len(values) - 1)), "then the lowest free ones"
    applied.rule_index = numbers  # what apply() records
    assert number_rules(applied, state)[0] == numbers, "a rule keeps its number"


def test_evaluator_revalidate_cuts_only_what_the_new_policy_would_not_open() -> None:
    from controller.policy.evaluator import Evaluator, Packet, addr
    from controller.policy.formats import load_document

    def state(ports: list, revalidate: bool):
        return load_document({"sgctl": 1, "groups": {"sg-a": {"name": "a", "ingress": [
            {"proto": "tcp", "ports": p, "from": "198.18.0.0/24"} for p in ports]}},
            "interfaces": {"eni-a": {"groups": ["sg-a"], "ipv4": ["198.18.0.10"],
                                     "device": "x", "revalidate": revalidate}}}, "t")

    for revalidate in (False, True):
        ev = Evaluator(state([22, 443], revalidate))
        conns = {port: Packet(addr("198.18.0.30"), addr("198.18.0.10"), 6, 40000 + port, port)
                 for port in (22, 443)}
        for pkt in conns.values():
            assert ev.packet("eni-a", "ingress", pkt).reason.label == "allow_new"
        ev.set_state(state([22], revalidate))
        assert {key[5] for key in ev.ct} == ({22} if revalidate else {22, 443})
        ack = {port: Packet(p.dst, p.src, 6, p.dport, p.sport, tcp_flags=0x10)
               for port, p in conns.items()}
        assert ev.packet("eni-a", "egress", ack[22]).reason.label == "allow_established"
        reply_443 = ev.packet("eni-a", "egress", ack[443]).reason.label
        # cut: the server's next packet is a new flow to the default egress rule
        assert reply_443 == ("allow_new" if revalidate else "allow_established")
