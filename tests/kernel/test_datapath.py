"""The real programs on scapy-built frames (BPF_PROG_TEST_RUN), Katran style:
tables of {description, packets, expected verdicts}. Each case runs against
a fresh conntrack table with a frozen clock, and every verdict is also
checked against the reference evaluator so the fixtures and the oracle
cannot disagree silently."""

from __future__ import annotations

import ctypes as ct
import ipaddress
import socket
import sys
from dataclasses import replace
from typing import Any, Dict, List

import pytest
from scapy.layers.inet import UDP
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrHopByHop,
)
from scapy.layers.l2 import Dot1Q, Ether

from controller import abi
from controller.abi.reasons import Reason as R
from controller.kernel.frames import DST_MAC, SRC_MAC, frame, l3
from controller.policy.evaluator import TCP_ACK, TCP_SYN, Evaluator, addr
from controller.policy.evaluator import Packet as P
from controller.policy.formats import load_document
from controller.policy.model import State
from tests.kernel.packets import (
    BCAST4,
    DNS,
    LOCAL,
    LOCAL6,
    OTHER,
    REMOTE,
    REMOTE6,
    SERVER,
    ZERO4,
    Case,
    icmp,
    tin,
    tout,
    uin,
    uout,
)
from tests.kernel.tables import CASES
from tests.states import one_interface

pytestmark = pytest.mark.kernel


def _state(kw: Dict[str, Any], device: str):
    return one_interface(device=device, **kw)


@pytest.mark.parametrize("case", CASES, ids=[c.desc for c in CASES])
def test_fixture_table(case: Case, kernel, test_devs) -> None:
    state = _state(case.state, test_devs[0])
    kernel.apply(state)
    clock = {"now": 1000}
    oracle = Evaluator(state, clock=lambda: clock["now"])
    for i, step in enumerate(case.steps):
        clock["now"] = 1000 + step.at
        kernel.set_clock(clock["now"])
        got = (kernel.run("eni-a", step.direction, step.pkt) if isinstance(step.pkt, P)
               else kernel.run_frame("eni-a", step.direction, step.pkt))
        assert got == step.want, f"step {i}: kernel says {got.name}, table says {step.want.name}"
        if isinstance(step.pkt, P) and step.oracle:
            ref = oracle.packet("eni-a", step.direction, step.pkt)
            assert ref.reason == step.want, (f"step {i}: evaluator says {ref.reason.name}, "
                                             f"table says {step.want.name}")


def test_truncated_at_every_offset(kernel, test_devs) -> None:
    """Every prefix of valid frames (v4 TCP, v6 UDP, ICMP error, VLAN) is
    dropped and counted under a malformed-packet reason, never passed."""
    kernel.apply(one_interface(device=test_devs[0], ingress=[],  # default egress: all allowed
                               eni={"source_dest_check": False}))  # the frames come in as egress
    malformed = {R.DROP_L2_MALFORMED, R.DROP_IPV4_MALFORMED, R.DROP_IPV6_MALFORMED,
                 R.DROP_L4_TRUNCATED, R.DROP_ICMP_EMBEDDED, R.DROP_EXTHDR_LIMIT}
    frames = [
        frame(tin(5000, 80)),
        frame(uin(5000, 53, src=REMOTE6, dst=LOCAL6)),
        frame(icmp(REMOTE, LOCAL, 3, 1, inner=tout(80, 5000))),
        bytes(Ether(src=SRC_MAC, dst=DST_MAC) / Dot1Q(vlan=5) / l3(tin(5000, 80))),
        bytes(Ether(src=SRC_MAC, dst=DST_MAC) / IPv6(src=str(REMOTE6), dst=str(LOCAL6)) /
              IPv6ExtHdrHopByHop() / UDP(sport=1, dport=2)),
    ]
    checked = 0
    for full in frames:
        # egress = the XDP hook here; BPF_PROG_TEST_RUN refuses XDP frames shorter
        # than an Ethernet header (and tc frames shorter than 34 bytes)
        for n in range(14, len(full)):
            got = kernel.run_frame("eni-a", "egress", full[:n])
            assert got in malformed, f"{full[:n].hex()} ({n} bytes) gave {got.name}"
            checked += 1
        assert kernel.run_frame("eni-a", "egress", full).allowed
    assert checked > 200


def test_conntrack_table_full(kernel, test_devs) -> None:
    """A table full of connections that saw traffic both ways drops new
    flows (counted) and evicts none of them."""
    from tests.harness import KERNEL_CT_MAX

    kernel.apply(one_interface(device=test_devs[0], ingress=[], egress=[
        {"proto": "udp", "ports": "1-65535", "to": "198.18.1.0/24"}]))
    for port in range(1, KERNEL_CT_MAX + 1):
        assert kernel.run("eni-a", "egress", uout(10000, port)) == R.ALLOW_NEW
        assert kernel.run("eni-a", "ingress", uin(port, 10000)) == R.ALLOW_ESTABLISHED
    assert kernel.run("eni-a", "egress", uout(10000, KERNEL_CT_MAX + 1)) == R.DROP_CT_FULL
    assert kernel.run("eni-a", "ingress", uin(1, 10000)) == R.ALLOW_ESTABLISHED
    # once expired, an entry's own key may be reused, others still cannot enter
    kernel.set_clock(1000 + 181)
    assert kernel.run("eni-a", "egress", uout(10000, 2)) == R.ALLOW_NEW
    assert kernel.run("eni-a", "egress", uout(10000, KERNEL_CT_MAX + 2)) == R.DROP_CT_FULL


def half_open(kernel: object, ep_id: int) -> List[int]:
    """The remote ports of an endpoint's half-open (new) connections."""
    return sorted(socket.ntohs(k.rport) for k, e in kernel.dp.map("sg_conntrack").batch_items()
                  if k.ep_id == ep_id and e.state == abi.CT_NEW)


def test_allowance_reclaims_the_oldest_half_open_of_the_same_interface(kernel, test_devs) -> None:
    """1.4 allowance: an interface holds at most its allowance of half-open
    connections; a new one reclaims the interface's oldest; connections that
    saw traffic both ways, and other interfaces' connections, are never
    touched; a forged-SYN flood's SYN-ACKs do not make its entries two-way."""
    allow = 8
    state = one_interface(device=test_devs[0], ingress=[
        {"proto": "tcp", "ports": 80, "from": "198.18.0.0/15"}], egress=[
        {"proto": "udp", "ports": "1-65535", "to": "198.18.1.0/24"}],
        others={"eni-b": {"groups": ["sg-a"], "ipv4": ["198.18.0.11"], "device": test_devs[1]}},
        settings={"conntrack_allowance": allow})
    kernel.apply(state)
    ep_a, ep_b = kernel.endpoints["eni-a"].ep_id, kernel.endpoints["eni-b"].ep_id
    b_local = ipaddress.ip_address("198.18.0.11")
    quota = kernel.dp.map("sg_ct_quota")
    before = quota.lookup(ct.c_uint32(ep_a))
    # two-way connections: a completed handshake on A, a UDP exchange on B
    assert kernel.run("eni-a", "ingress", tin(5000, 80)) == R.ALLOW_NEW
    assert kernel.run("eni-a", "egress", tout(80, 5000, TCP_SYN | TCP_ACK)) == \
        R.ALLOW_ESTABLISHED
    assert kernel.run("eni-a", "ingress", tin(5000, 80, TCP_ACK)) == R.ALLOW_ESTABLISHED
    assert kernel.run("eni-b", "egress", uout(7, 7, src=b_local)) == R.ALLOW_NEW
    assert kernel.run("eni-b", "ingress", uin(7, 7, dst=b_local)) == R.ALLOW_ESTABLISHED
    assert kernel.run("eni-b", "egress", uout(8, 8, src=b_local)) == R.ALLOW_NEW  # half-open
    # a flood of SYNs on A from forged sources, each answered by A
    for i in range(3 * allow):
        src = ipaddress.ip_address(f"198.19.{i // 250}.{i % 250 + 1}")
        assert kernel.run("eni-a", "ingress", tin(10000 + i, 80, src=src)) == R.ALLOW_NEW
        assert kernel.run("eni-a", "egress", tout(80, 10000 + i, TCP_SYN | TCP_ACK, dst=src)) \
            == R.ALLOW_ESTABLISHED
    flood = half_open(kernel, ep_a)
    assert len(flood) == allow  # the bound
    assert flood == list(range(10000 + 2 * allow, 10000 + 3 * allow))  # the newest kept
    assert kernel.run("eni-a", "egress", tout(80, 5000, TCP_ACK)) == R.ALLOW_ESTABLISHED
    assert kernel.run("eni-b", "ingress", uin(7, 7, dst=b_local)) == R.ALLOW_ESTABLISHED
    assert half_open(kernel, ep_b) == [8]  # B's own half-open one is B's
    q = quota.lookup(ct.c_uint32(ep_a))
    assert (q.next - before.next, q.evicted - before.evicted) == (1 + 3 * allow, 2 * allow)


def test_a_flood_of_first_fragments_displaces_only_its_own_interfaces(kernel, test_devs) -> None:
    """frags.h: an interface remembers its allowed first fragments in entries
    of its own. After A takes 20 times its entries' worth of allowed first
    fragments, B's datagram still lets its later fragment through; A's
    oldest datagram lost its entry to a newer one of A's, as the evaluator
    predicts, and A's newest still has its entry."""
    state = one_interface(device=test_devs[0], ingress=[
        {"proto": "udp", "ports": 53, "from": "198.18.0.0/15"}],
        others={"eni-b": {"groups": ["sg-a"], "ipv4": ["198.18.0.11"], "device": test_devs[1]}})
    kernel.apply(state)
    clock = {"now": 1000}
    kernel.set_clock(clock["now"])
    oracle = Evaluator(state, clock=lambda: clock["now"])
    b_local = ipaddress.ip_address("198.18.0.11")

    def both(eni: str, pkt: P) -> R:
        got = kernel.run(eni, "ingress", pkt)
        assert oracle.packet(eni, "ingress", pkt).reason == got, pkt
        return got

    def first(frag_id: int, **kw: Any) -> P:
        return replace(uin(5000, 53, **kw), frag_id=frag_id, more_fragments=True)

    def later(frag_id: int, **kw: Any) -> P:
        return replace(uin(5000, 53, **kw), frag_id=frag_id, frag_offset=1480)

    assert both("eni-b", first(7, dst=b_local)).allowed
    flood = range(1000, 1000 + 20 * abi.FRAG_PER_EP)
    for i in flood:
        assert both("eni-a", first(i)).allowed
    assert both("eni-b", later(7, dst=b_local)) == R.ALLOW_FRAGMENT
    assert both("eni-a", later(flood[-1])) == R.ALLOW_FRAGMENT
    assert both("eni-a", later(flood[0])) == R.DROP_FRAG_UNKNOWN


def test_an_interface_holds_at_most_its_limit_of_connections(kernel, test_devs) -> None:
    """types.h, sg_ct_quota: A's two-way connections stop at its limit (new
    ones dropped and counted, B unaffected); every way they are deleted
    (flush, GC) gives the room back; at the limit, a half-open connection
    makes way for a new one. The evaluator agrees step by step."""
    from controller.kernel import conntrack

    limit = 8
    state = one_interface(device=test_devs[0], ingress=[
        {"proto": "tcp", "ports": 80, "from": "198.18.0.0/15"}], egress=[
        {"proto": "udp", "ports": "1-65535", "to": "198.18.1.0/24"}],
        others={"eni-b": {"groups": ["sg-a"], "ipv4": ["198.18.0.11"], "device": test_devs[1]}},
        settings={"conntrack_limit": limit, "conntrack_allowance": limit})
    kernel.apply(state)
    clock = {"now": 1000}
    kernel.set_clock(clock["now"])
    oracle = Evaluator(state, clock=lambda: clock["now"])
    ep_a = kernel.endpoints["eni-a"].ep_id
    b_local = ipaddress.ip_address("198.18.0.11")

    def both(eni: str, direction: str, pkt: P) -> R:
        got = kernel.run(eni, direction, pkt)
        assert oracle.packet(eni, direction, pkt).reason == got, (eni, direction, pkt)
        return got

    def two_way(port: int) -> R:
        got = both("eni-a", "egress", uout(10000, port))
        if got == R.ALLOW_NEW:
            assert both("eni-a", "ingress", uin(port, 10000)) == R.ALLOW_ESTABLISHED
        return got

    assert [two_way(p) for p in range(1, limit + 1)] == [R.ALLOW_NEW] * limit
    assert two_way(limit + 1) == R.DROP_CT_FULL
    assert both("eni-a", "ingress", uin(1, 10000)) == R.ALLOW_ESTABLISHED  # none evicted
    assert both("eni-b", "egress", uout(7, 7, src=b_local)) == R.ALLOW_NEW
    # a flush gives the room back (the controller counts what it deletes)
    assert conntrack.flush(kernel.dp, [ep_a]) == limit
    oracle.ct = {k: e for k, e in oracle.ct.items() if k[0] != "eni-a"}
    assert [two_way(p) for p in range(1, limit + 1)] == [R.ALLOW_NEW] * limit
    assert two_way(limit + 1) == R.DROP_CT_FULL
    # ... and so does the GC, once they expired
    clock["now"] += 181
    kernel.set_clock(clock["now"])
    assert conntrack.gc(kernel.dp).removed >= limit
    oracle.ct = {k: e for k, e in oracle.ct.items() if k[0] != "eni-a"}
    # half-open ones: the ring reclaims the oldest, so a new one still gets in
    for i in range(limit + 3):
        assert both("eni-a", "ingress", tin(20000 + i, 80)) == R.ALLOW_NEW
    assert half_open(kernel, ep_a) == list(range(20003, 20000 + limit + 3))


def test_policy_change_keeps_tracked_cuts_untracked(kernel, test_devs) -> None:
    """1.4: rule removal -- tracked connections survive, untracked flows stop."""
    dev = test_devs[0]
    both = [{"proto": "tcp", "ports": 80, "from": "0.0.0.0/0"},
            {"proto": "tcp", "ports": 22, "from": "198.18.1.0/24"}]
    kernel.apply(one_interface(device=dev, ingress=both))  # default world egress
    assert kernel.run("eni-a", "ingress", tin(5000, 80)) == R.ALLOW_UNTRACKED
    assert kernel.run("eni-a", "ingress", tin(5000, 22)) == R.ALLOW_NEW
    kernel.apply(one_interface(device=dev, ingress=[]))
    assert kernel.run("eni-a", "ingress", tin(5000, 80, TCP_ACK)) == R.DROP_NO_RULE
    assert kernel.run("eni-a", "ingress", tin(5000, 22, TCP_ACK)) == R.ALLOW_ESTABLISHED
    assert kernel.run("eni-a", "ingress", tin(5001, 22)) == R.DROP_NO_RULE


def test_unbound_device_passes(kernel, test_devs) -> None:
    kernel.apply(one_interface(device=test_devs[0], ingress=[]))
    from controller.kernel import bpfsys

    idx = int(open(f"/sys/class/net/{test_devs[1]}/ifindex").read())
    before = kernel.counters(0, "egress")
    retval, _ = bpfsys.test_run(kernel.progs.xdp_fd, frame(tin(1, 2)), idx, xdp=True)
    assert retval == 2  # XDP_PASS
    assert kernel.counters(0, "egress")[R.PASS_UNBOUND] == before[R.PASS_UNBOUND] + 1




def test_the_endpoint_is_found_through_its_index_entry_and_slot(kernel, test_devs) -> None:
    """types.h, struct sg_ep_ref: a bound device's packets take its endpoint
    from the slot its index entry names; each switch writes the other slot
    of the pair; a device whose first entries other devices hold takes the
    next free one; an unbound device leaves no entry."""
    dp = kernel.dp
    idx = int(open(f"/sys/class/net/{test_devs[0]}/ifindex").read())
    index, slots, eps = dp.ep_index(), dp.map("sg_ep_slots"), dp.map("sg_endpoints")

    def ref(entry: int) -> abi.EpRef:
        return abi.EpRef.from_buffer_copy(index[entry].to_bytes(8, sys.byteorder))

    def word(ifindex: int, slot: int) -> int:
        return int.from_bytes(bytes(abi.EpRef(ifindex, slot)), sys.byteorder)

    home = idx % index.entries
    seen = set()
    for ports in ("80", "81", "82"):
        kernel.apply(one_interface(device=test_devs[0], ingress=[
            {"proto": "tcp", "ports": ports, "from": "198.18.0.0/16"}]))
        r, ep = ref(home), eps.lookup(ct.c_uint32(idx))
        assert r.ifindex == idx and r.slot // 2 == ep.ep_id, (r.ifindex, r.slot, ep.ep_id)
        assert bytes(slots.lookup(ct.c_uint32(r.slot))) == bytes(ep)
        seen.add(r.slot)
        assert kernel.run("eni-a", "ingress", tin(5000, int(ports))) == R.ALLOW_NEW
    assert len(seen) == 2, "a switch writes the other slot of the pair"

    # the datapath reads the slot: a value only the slot holds decides
    r = ref(home)
    other = abi.Endpoint.from_buffer_copy(bytes(slots.lookup(ct.c_uint32(r.slot))))
    other.policy_id = 0xFFFFFF  # no such policy
    slots.update(ct.c_uint32(r.slot), other)
    assert kernel.run("eni-a", "ingress", tin(5001, 82)) == R.DROP_NO_RULE
    slots.update(ct.c_uint32(r.slot), eps.lookup(ct.c_uint32(idx)))

    # devices elsewhere (same remainder) hold the first entries: the next free one
    kernel.apply(one_interface(device=test_devs[1], ingress=[]))  # eni-a moves: dev 0 unbound
    assert ref(home).ifindex == 0
    taken = [(idx + k) % index.entries for k in range(3)]
    try:
        for k, e in enumerate(taken):
            index[e] = word(idx + (k + 1) * index.entries, 0)
        kernel.apply(one_interface(device=test_devs[0], ingress=[
            {"proto": "tcp", "ports": "83", "from": "198.18.0.0/16"}]))
        r = ref((idx + 3) % index.entries)
        assert r.ifindex == idx
        assert kernel.run("eni-a", "ingress", tin(5002, 83)) == R.ALLOW_NEW
        assert kernel.run("eni-a", "ingress", tin(5003, 84)) == R.DROP_NO_RULE
        # all of them held: the bind fails and says why; the device stays unbound
        kernel.apply(one_interface(device=test_devs[1], ingress=[]))
        for k in range(abi.EP_INDEX_TRIES):
            e = (idx + k) % index.entries
            index[e] = word(idx + (k + 1) * index.entries, 0)
        with pytest.raises(Exception, match="endpoint-index entries"):
            kernel.apply(one_interface(device=test_devs[0], ingress=[]))
        assert eps.lookup(ct.c_uint32(idx)) is None
    finally:
        for k in range(abi.EP_INDEX_TRIES):
            e = (idx + k) % index.entries
            if ref(e).ifindex != idx:
                index[e] = 0


def test_changes_rewrite_only_the_policies_they_touch(kernel, test_devs) -> None:
    """A change to one group, or to the addresses of a referenced group's
    member, rewrites only the policies that contain them; a restarted
    controller (new Dataplane on the same pins) rewrites nothing."""
    from controller.kernel.dataplane import Dataplane
    from controller.reconcile.converge import Reconciler

    def state(b_ports: str, member_ip: str) -> State:
        return load_document({"sgctl": 1, "groups": {
            "sg-a": {"name": "a", "ingress": [{"proto": "tcp", "ports": 22, "from": "sg-m"}]},
            "sg-b": {"name": "b", "ingress": [{"proto": "tcp", "ports": b_ports,
                                                "from": "198.18.0.0/16"}]},
            "sg-m": {"name": "m"}},
            "interfaces": {
                "eni-a": {"groups": ["sg-a"], "device": test_devs[0], "ipv4": ["198.18.0.10"]},
                "eni-b": {"groups": ["sg-b"], "device": test_devs[1]},
                "eni-m": {"groups": ["sg-m"], "ipv4": [member_ip]}}})

    def ids() -> Dict[str, int]:
        summary = kernel.rc.applied().summary
        return {e: summary[e].policy_id for e in ("eni-a", "eni-b")}

    kernel.apply(state("80", "198.18.7.1"))
    first = ids()
    kernel.apply(state("80-81", "198.18.7.1"))  # sg-b changed
    second = ids()
    assert second["eni-a"] == first["eni-a"] and second["eni-b"] != first["eni-b"]
    kernel.apply(state("80-81", "198.18.7.2"))  # a member of sg-m moved
    third = ids()
    assert third["eni-a"] != second["eni-a"] and third["eni-b"] == second["eni-b"]
    assert kernel.run("eni-a", "ingress", tin(5000, 22, src=addr("198.18.7.2"))) == R.ALLOW_NEW
    assert kernel.run("eni-a", "ingress", tin(5000, 22, src=addr("198.18.7.1"))) == R.DROP_NO_RULE
    again = Reconciler(Dataplane(kernel.dp.pin_dir, kernel.dp.ct_max), str(kernel.rc.state_dir))
    try:
        applied = again.converge(state("80-81", "198.18.7.2"), attach=False).applied
        assert {e: applied.summary[e].policy_id for e in ("eni-a", "eni-b")} == third
    finally:
        again.dp.close()


def test_address_inside_more_nested_prefixes_than_the_datapath_checks(kernel, test_devs) -> None:
    """6 nested prefixes, each with its own port: every port is allowed from
    the innermost address (the datapath checks 4 prefixes; the compiler
    folds the rest into the 4th), and the evaluator agrees."""
    nets = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/23", "10.1.2.0/24", "10.1.2.0/28",
            "10.1.2.1/32"]
    state = one_interface(device=test_devs[0], egress=[],
                          ingress=[{"proto": "tcp", "ports": 100 + i, "from": n}
                                   for i, n in enumerate(nets)])
    kernel.apply(state)
    ev = Evaluator(state, clock=lambda: 1000)
    for src, port in [("10.1.2.1", p) for p in range(99, 107)] + [("10.1.3.1", 101),
                                                                  ("10.1.3.1", 103)]:
        pkt = tin(5000 + port, port, src=addr(src))
        want = ev.packet("eni-a", "ingress", pkt).reason
        assert kernel.run("eni-a", "ingress", pkt) == want, (src, port)
    assert ev.packet("eni-a", "ingress", tin(1, 100, src=addr("10.1.2.1"))).reason == R.ALLOW_NEW


def test_incremental_writes_equal_a_fresh_write_and_leak_nothing(kernel, test_devs) -> None:
    """After a run of random changes written as differences (A/B images), the
    active policy in the kernel is exactly what a fresh compile gives, and no
    class is left behind."""
    import random

    from controller import abi
    from controller.policy.compiler import class_segments
    from controller.policy.incremental import compile_state

    rnd = random.Random(20261127)
    nets = ["10.0.0.0/8", "10.1.0.0/16", "10.1.1.0/24", "10.1.1.0/28", "10.1.1.1/32",
            "10.2.0.0/16", "10.2.3.0/24", "0.0.0.0/0", "2001:db8::/32", "2001:db8:1::/48"]
    rules: List[dict] = []
    for _ in range(30):
        if rules and rnd.random() < 0.4:
            rules.pop(rnd.randrange(len(rules)))
        else:
            lo = rnd.choice([22, 80, 443, 1000])
            r = {"proto": rnd.choice(["tcp", "udp"]), "ports": f"{lo}-{lo + rnd.choice([0, 9])}",
                 "from": rnd.choice(nets)}
            if r not in rules:
                rules.append(r)
        state = one_interface(device=test_devs[0], ingress=list(rules))
        kernel.apply(state)
    dp = kernel.dp
    pm = dp.written.policies
    applied = kernel.rc.applied()
    rec = applied.policies["sg-a"]
    compiled = compile_state(state, rule_index=applied.rule_index).policies[("sg-a",)]
    content_of = {c: k for k, c in pm.classes.items()}
    got = {}
    for k, v in dp.map("sg_peers").items():
        if k.policy_id == rec.active:
            assert k.family == 6, "IPv4 prefixes are in sg_peers4"
            got[(k.dir, 6, k.plen, int.from_bytes(bytes(k.addr), "big"))] = content_of[v.value]
    for k, v in dp.map("sg_peers4").items():
        if k.policy_id == rec.active:
            raw = k.addr.to_bytes(4, sys.byteorder)
            got[(k.dir, 4, k.plen, int.from_bytes(raw, "big"))] = content_of[v.value]
    assert got == compiled.peers
    live = set()
    for img in pm.images.values():
        live |= img.classes()
    port_keys = dp.map("sg_ports").keys()
    assert {k.cls for k in port_keys} == live, "classes in the kernel = classes in use"
    for k in port_keys:
        segs = class_segments(content_of[k.cls])[k.proto]
        val = dp.map("sg_ports").lookup(k)
        if val.n != abi.SEGS_LPM:
            assert [(s.lo, s.hi, s.rule_index, s.flags) for s in val.seg[:val.n]] == segs


def test_an_image_is_overwritten_or_deleted_only_after_a_grace_period(kernel, test_devs) -> None:
    """A change writes into the image the previous switch left, and deletes
    policies that were active: each only once no program run that read the
    old endpoint value can still be running (an RCU grace period, started in
    the background at the switch, waited for when still running)."""
    dp = kernel.dp
    pm = dp.written.policies
    events: List[str] = []
    real_write, real_delete, real_barrier = pm.write, pm.delete_policy, dp._barrier

    def write(pid, new, old):  # type: ignore[no-untyped-def]
        if old is not None:  # overwriting an image some endpoint used before
            events.append("overwrite" if dp.quiet() else "UNSAFE overwrite")
        return real_write(pid, new, old)

    def delete(pid):  # type: ignore[no-untyped-def]
        events.append("delete" if dp.quiet() else "UNSAFE delete")
        return real_delete(pid)

    def barrier(epoch: int) -> None:
        real_barrier(epoch)
        events.append("grace")

    pm.write, pm.delete_policy, dp._barrier = write, delete, barrier  # type: ignore
    try:
        for ports in ("80", "81", "82", "83"):  # images: new, new, overwrite, overwrite
            kernel.apply(one_interface(device=test_devs[0], ingress=[
                {"proto": "tcp", "ports": ports, "from": "198.18.0.0/16"}]))
            assert kernel.run("eni-a", "ingress", tin(5000, int(ports))) == R.ALLOW_NEW
        kernel.apply(one_interface(device=test_devs[0], eni_groups=["sg-a", "sg-b"],
                                   extra_groups={"sg-b": {"name": "b"}}))  # a new group set
    finally:
        pm.write, pm.delete_policy, dp._barrier = real_write, real_delete, real_barrier
    assert not [e for e in events if e.startswith("UNSAFE")], events
    # (a deletion empties its image through write() too)
    assert events.count("overwrite") >= 2 and "delete" in events, events
    assert events.count("grace") >= 4, events  # one after each switch


def test_an_endpoint_slot_is_rewritten_only_after_a_grace_period(kernel, test_devs) -> None:
    """The slot a switch left (or an unbind freed) is written again only
    once a barrier that started after that switch has ended, even with no
    background grace period to rely on (types.h, struct sg_ep_ref)."""
    dp = kernel.dp
    slots = dp.map("sg_ep_slots")
    writes: List[str] = []
    real_update, real_switched = slots.update, dp.switched

    def update(key, val, flags=0):  # type: ignore[no-untyped-def]
        slot = key.value
        retired = dp._retired.get(slot)
        if retired is not None:
            writes.append("reuse" if dp._covered >= retired else "UNSAFE reuse")
        return real_update(key, val, flags)

    def switched() -> None:  # the epoch moves, no barrier runs in the background
        dp._epoch += 1

    slots.update, dp.switched = update, switched  # type: ignore
    try:
        rules = [{"proto": "tcp", "ports": "80", "from": "198.18.0.0/16"}]
        for n, secs in enumerate((100, 101, 102, 103)):  # the endpoint value alone changes
            kernel.apply(one_interface(device=test_devs[0], ingress=rules,
                                       timeouts={"tcp_syn": secs}))
            assert kernel.run("eni-a", "ingress", tin(5000 + n, 80)) == R.ALLOW_NEW
        kernel.apply(one_interface(device=test_devs[1], ingress=rules))  # unbind dev 0, bind 1
        kernel.apply(one_interface(device=test_devs[0], ingress=rules))  # and back
    finally:
        slots.update, dp.switched = real_update, real_switched  # type: ignore
    assert not [w for w in writes if w.startswith("UNSAFE")], writes
    assert writes.count("reuse") >= 3, writes


def test_a_device_that_is_not_ethernet_is_refused(kernel) -> None:
    """tun (and wireguard, gre, ...) carry IP without an Ethernet header:
    binding one is refused with the reason, and nothing changes."""
    import subprocess

    from controller.reconcile.plan import PlanError
    from tests.harness import unique

    dev = unique("sgtun")
    subprocess.run(["ip", "tuntap", "add", "dev", dev, "mode", "tun"], check=True)
    try:
        before = kernel.rc.applied().endpoints
        with pytest.raises(PlanError, match=f"device '{dev}' is not an Ethernet device"):
            kernel.apply(one_interface(device=dev, ingress=[]))
        assert kernel.rc.applied().endpoints == before
    finally:
        subprocess.run(["ip", "link", "del", dev], check=False)


def test_gc_keeps_the_entries_of_an_interface_bound_during_its_scan(kernel, test_devs,
                                                                    monkeypatch) -> None:
    """The GC lists the endpoints, then scans for seconds (1M entries): an
    interface bound meanwhile is not an orphan. Simulated by handing the GC
    the endpoint list from before the bind, once."""
    from controller.kernel import conntrack

    def state(both: bool) -> State:
        others = {"eni-b": {"groups": ["sg-a"], "ipv4": ["198.18.0.20"],
                            "device": test_devs[1]}} if both else None
        return one_interface(device=test_devs[0], ingress=[], others=others)

    kernel.apply(state(False))
    assert kernel.run("eni-a", "egress", uout(4000, 53)) == R.ALLOW_NEW
    before_bind = conntrack.endpoint_timeouts(kernel.dp)
    kernel.apply(state(True))
    for port in (53, 54, 55):
        assert kernel.run("eni-b", "egress", uout(4000, port, src=addr("198.18.0.20"))) == \
            R.ALLOW_NEW
    real, calls = conntrack.endpoint_timeouts, []

    def listed(dp):  # type: ignore[no-untyped-def]
        calls.append(1)
        return before_bind if len(calls) == 1 else real(dp)

    monkeypatch.setattr(conntrack, "endpoint_timeouts", listed)
    result = conntrack.gc(kernel.dp)
    assert len(calls) == 2, "the endpoints are read again before anything is deleted"
    assert result.removed == 0
    ep_b = kernel.endpoints["eni-b"].ep_id
    assert result.live[ep_b] == 3
    assert kernel.run("eni-b", "ingress", uin(53, 4000, dst=addr("198.18.0.20"))) == \
        R.ALLOW_ESTABLISHED


def test_endpoint_ids_are_reused_and_counters_start_at_zero(kernel, test_devs) -> None:
    """Binding and unbinding interfaces does not use up counter slots (they
    were never reused: after ~1,022 binds every new interface shared slot
    0), and a reused slot starts at zero."""
    kernel.apply(one_interface(device=test_devs[0], ingress=[]))  # (the last test's are gone)
    ids = set()
    for i in range(25):
        eid = f"eni-x{i}"
        kernel.apply(one_interface(device=test_devs[0], ingress=[], others={
            eid: {"groups": ["sg-a"], "ipv4": ["198.18.0.20"], "device": test_devs[1]}}))
        ep_id = kernel.endpoints[eid].ep_id
        ids.add(ep_id)
        assert sum(kernel.counters(ep_id, "ingress")) == 0, f"bind {i}: counters carried over"
        assert kernel.run(eid, "ingress", tin(5000, 22, dst=addr("198.18.0.20"))) == \
            R.DROP_NO_RULE
        kernel.apply(one_interface(device=test_devs[0], ingress=[]))
    assert len(ids) == 1, ids


def test_revalidate_judges_each_connection_by_what_opened_it(kernel, test_devs) -> None:
    """On a revalidate interface, re-applying an unchanged document cuts
    nothing: not an echo allowed by a code-specific rule, not a timestamp
    query, not the exchanges with infrastructure services or DHCP. A real
    change cuts exactly what it no longer allows."""
    from controller.kernel import conntrack

    def state(timestamp: bool) -> State:
        rules = [{"proto": "icmp", "type": 8, "code": 0, "from": "0.0.0.0/0"},
                 {"proto": "tcp", "ports": 22, "from": "198.18.1.0/24"}]
        if timestamp:
            rules.append({"proto": "icmp", "type": 13, "code": 0, "from": "0.0.0.0/0"})
        return one_interface(device=test_devs[0], ingress=rules, egress=[],
                             eni={"revalidate": True})

    kernel.apply(state(True))
    opened = [("ingress", icmp(REMOTE, LOCAL, 8, 0, ident=1)),
              ("ingress", icmp(REMOTE, LOCAL, 13, 0, ident=2)),
              ("ingress", tin(5000, 22)),
              ("egress", uout(4000, 53, dst=DNS)),
              ("egress", uout(68, 67, src=ZERO4, dst=BCAST4))]
    for direction, pkt in opened:
        assert kernel.run("eni-a", direction, pkt) in (R.ALLOW_NEW, R.ALLOW_EXEMPT)
    assert len(conntrack.connections(kernel.dp)) == 5
    assert kernel.apply(state(True)).cut == 0
    assert kernel.run("eni-a", "egress", icmp(LOCAL, REMOTE, 0, 0, ident=1)) == \
        R.ALLOW_ESTABLISHED
    assert kernel.run("eni-a", "egress", icmp(LOCAL, REMOTE, 14, 0, ident=2)) == \
        R.ALLOW_ESTABLISHED
    assert kernel.apply(state(False)).cut == 1, "the reconciler revalidates"
    assert kernel.run("eni-a", "egress", icmp(LOCAL, REMOTE, 14, 0, ident=2)) == R.DROP_NO_RULE
    assert kernel.run("eni-a", "egress", icmp(LOCAL, REMOTE, 0, 0, ident=1)) == \
        R.ALLOW_ESTABLISHED
    assert kernel.run("eni-a", "ingress", uin(53, 4000, src=DNS)) == R.ALLOW_ESTABLISHED


def test_addresses_follow_the_interface_and_explain_names_the_check(kernel, test_devs) -> None:
    """An address assigned to the interface becomes a valid source at once,
    and stops being one when it is taken away; `explain` gives the source
    check's reason from the evaluator and from the kernel alike."""
    from controller.kernel.explain import explain

    def state(*v4: str) -> State:
        return one_interface(device=test_devs[0], ingress=[], eni={"ipv4": list(v4)})

    kernel.apply(state("198.18.0.10"))
    assert kernel.run("eni-a", "egress", tout(5000, 80, src=OTHER)) == R.DROP_SRC_SPOOF
    kernel.apply(state("198.18.0.10", str(OTHER)))
    assert kernel.run("eni-a", "egress", tout(5001, 80, src=OTHER)) == R.ALLOW_NEW
    assert kernel.run("eni-a", "egress", tout(5009, 80)) == R.ALLOW_NEW
    kernel.apply(state("198.18.0.10"))
    assert kernel.run("eni-a", "egress", tout(5002, 80, src=OTHER)) == R.DROP_SRC_SPOOF
    # its connections on the lost address are cut (their packets skip the check)
    assert kernel.run("eni-a", "egress", tout(5001, 80, TCP_ACK, src=OTHER)) == R.DROP_SRC_SPOOF
    assert kernel.run("eni-a", "egress", tout(5009, 80, TCP_ACK)) == R.ALLOW_ESTABLISHED
    assert kernel.run("eni-a", "ingress", tin(5003, 80, dst=OTHER)) == R.DROP_DST_FOREIGN
    got = explain(kernel.dp, kernel.state, {
        "NetworkInterfaceId": "eni-a", "Direction": "egress", "Protocol": "tcp",
        "Source": str(OTHER), "Destination": str(REMOTE), "Port": 80},
        {e: ep.ifindex for e, ep in kernel.endpoints.items()})
    assert (got["Reason"], got["KernelReason"], got["Agree"]) == (
        "drop_src_spoof", "drop_src_spoof", True)
    got = explain(kernel.dp, kernel.state, {
        "NetworkInterfaceId": "eni-a", "Direction": "egress", "Protocol": "tcp",
        "Source": str(LOCAL), "Destination": str(REMOTE), "Port": 80},
        {e: ep.ifindex for e, ep in kernel.endpoints.items()})
    assert (got["Reason"], got["KernelReason"]) == ("allow_new", "allow_new")


def test_the_address_in_the_endpoint_value_and_the_others_in_the_map(kernel, test_devs) -> None:
    """The endpoint value holds one IPv4 and one IPv6 address of the
    interface, compared before the sg_local_addrs lookup; the others are
    found in the map. With the map emptied, only the held addresses pass;
    with it back, the others pass again."""
    dp = kernel.dp
    kernel.apply(one_interface(device=test_devs[0], ingress=[],
                               eni={"ipv4": ["198.18.0.10", str(OTHER)]}))
    idx = int(open(f"/sys/class/net/{test_devs[0]}/ifindex").read())
    ep = dp.map("sg_endpoints").lookup(ct.c_uint32(idx))
    assert ep.addr4.to_bytes(4, sys.byteorder) == ipaddress.ip_address("198.18.0.10").packed
    assert bytes(ep.addr6) == ipaddress.ip_address("2001:db8::10").packed
    local = dp.map("sg_local_addrs")
    saved = [(k, local.lookup(k)) for k in local.keys()]
    try:
        local.delete_many([k for k, _ in saved])
        assert kernel.run("eni-a", "egress", tout(5000, 80)) == R.ALLOW_NEW
        assert kernel.run("eni-a", "egress", tout(5001, 80, src=LOCAL6, dst=REMOTE6)) == \
            R.ALLOW_NEW
        assert kernel.run("eni-a", "egress", tout(5002, 80, src=OTHER)) == R.DROP_SRC_SPOOF
    finally:
        for k, v in saved:
            local.update(k, v)
    assert kernel.run("eni-a", "egress", tout(5003, 80, src=OTHER)) == R.ALLOW_NEW


def test_turning_the_check_on_cuts_connections_it_would_not_have_let_open(kernel,
                                                                         test_devs) -> None:
    """Connections a router instance opened on foreign addresses end when its
    SourceDestCheck goes back on; its own ones, and DHCP, stay. The
    evaluator's conntrack does the same."""
    def state(check: bool) -> State:
        return one_interface(device=test_devs[0], ingress=[],
                             eni={"source_dest_check": check})

    kernel.apply(state(False))
    oracle = Evaluator(state(False), clock=lambda: 1000)
    opened = [tout(5000, 80, src=OTHER), tout(5001, 80), uout(68, 67, src=ZERO4, dst=BCAST4)]
    for pkt in opened:
        assert kernel.run("eni-a", "egress", pkt) == oracle.packet("eni-a", "egress", pkt).reason
    kernel.apply(state(True))
    oracle.set_state(state(True))
    for pkt, want in ((tout(5000, 80, TCP_ACK, src=OTHER), R.DROP_SRC_SPOOF),
                      (tout(5001, 80, TCP_ACK), R.ALLOW_ESTABLISHED),
                      (uin(67, 68, src=SERVER, dst=BCAST4), R.ALLOW_EXEMPT)):
        direction = "ingress" if pkt.dst in (LOCAL, BCAST4) else "egress"
        assert kernel.run("eni-a", direction, pkt) == want
        assert oracle.packet("eni-a", direction, pkt).reason == want
