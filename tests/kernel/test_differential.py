"""Differential test: random rule sets and packet sequences; the kernel
program and the reference evaluator must give the same verdict and reason
for every packet. Fixed seed; SGCTL_DIFF_EXAMPLES raises the count."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Dict, List

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from controller.policy.evaluator import ARP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Evaluator, Packet, addr
from controller.policy.formats import load_document
from tests.harness import KERNEL_CT_MAX

pytestmark = pytest.mark.kernel

EXAMPLES = int(os.environ.get("SGCTL_DIFF_EXAMPLES", "400"))
MIN_PACKETS = int(os.environ.get("SGCTL_DIFF_MIN_PACKETS", "20000"))
PACKETS_PER_EXAMPLE = (40, 70)

LOCAL4, LOCAL6 = addr("198.18.0.10"), addr("2001:db8::10")
MAC = "02:00:00:00:00:01"
LL = addr("fe80::ff:fe00:1")  # the link-local of MAC
# what an instance may forge as its source, and where traffic may be sent to
# it (1.6): its own, a member's, unspecified, broadcast/multicast, foreign
SOURCES4 = [LOCAL4, LOCAL4, LOCAL4, addr("198.18.3.3"), addr("0.0.0.0"), addr("198.18.0.66")]
SOURCES6 = [LOCAL6, LOCAL6, LL, addr("2001:db8:3::3"), addr("::"), addr("fe80::99")]
DESTS4 = [LOCAL4, LOCAL4, LOCAL4, addr("255.255.255.255"), addr("224.0.0.251"),
          addr("198.18.0.255"), addr("198.18.0.66")]
DESTS6 = [LOCAL6, LOCAL6, LL, addr("ff02::1"), addr("2001:db8::66")]
ND_DESTS = [addr("ff02::1"), addr("ff02::1:ff00:10"), addr("fe80::1"), addr("2001:db8::99"),
            addr("2001:db8:1::1"), LOCAL6, LL]
ND_SOURCES = [LOCAL6, LL, addr("fe80::1"), addr("::"), addr("2001:db8:1::1")]
DHCP_PEERS4 = [addr("255.255.255.255"), addr("198.18.0.1"), addr("198.18.0.66"),
               addr("198.18.1.1")]
DHCP_PEERS6 = [addr("ff02::1:2"), addr("fe80::1"), addr("2001:db8:1::1")]
REMOTES4 = [addr(a) for a in ("198.18.1.1", "198.18.1.200", "198.18.3.3", "198.19.255.1",
                              "169.254.169.254")]
REMOTES6 = [addr(a) for a in ("2001:db8:1::1", "2001:db8:3::3", "2001:db8:ffff::1")]
# nested so that 198.18.1.1 can sit in more prefixes than the datapath checks (4)
PEERS = ["198.18.1.0/24", "198.18.1.1/32", "198.18.0.0/15", "0.0.0.0/0", "::/0",
         "2001:db8:1::/48", "pl-x", "sg-b", "sg-a", "198.18.1.0/26", "198.18.0.0/16"]
PORTS = [0, 1, 22, 53, 79, 80, 81, 443, 1023, 1024, 65535]
PROTOS = ["tcp", "udp", "icmp", "icmpv6", 47, "all"]
FLAGS = [TCP_SYN, TCP_SYN, TCP_SYN | TCP_ACK, TCP_ACK, TCP_ACK, TCP_FIN | TCP_ACK, TCP_RST,
         TCP_RST | TCP_ACK, TCP_SYN | TCP_FIN]
ICMP_TYPES = {1: [0, 3, 5, 8, 11, 13, 14, 135], 58: [1, 2, 128, 129, 135]}
TIME_STEPS = [0, 0, 0, 0, 1, 5, 11, 29, 31, 61, 200]


@st.composite
def rules(draw: Any) -> List[Dict[str, Any]]:
    out: List[Dict[str, Any]] = []
    seen = set()
    for _ in range(draw(st.integers(0, 6))):
        proto = draw(st.sampled_from(PROTOS))
        rule: Dict[str, Any] = {"proto": proto, "peer": draw(st.sampled_from(PEERS))}
        if proto in ("tcp", "udp"):
            lo = draw(st.sampled_from(PORTS))
            hi = draw(st.sampled_from([p for p in PORTS if p >= lo]))
            rule["ports"] = f"{lo}-{hi}"
        elif proto in ("icmp", "icmpv6"):
            typ = draw(st.sampled_from([-1, 0, 3, 8, 13, 5, 128, 129, 2, 135]))
            rule["type"] = typ
            rule["code"] = -1 if typ == -1 else draw(st.sampled_from([-1, 0, 4]))
        key = tuple(sorted(rule.items(), key=str))
        if key not in seen:
            seen.add(key)
            out.append(rule)
    return out


@st.composite
def policy(draw: Any) -> Dict[str, Any]:
    groups: Dict[str, Any] = {
        "sg-a": {"ingress": draw(rules())},
        "sg-b": {"ingress": draw(rules()), "egress": draw(rules())},
    }
    if draw(st.booleans()):
        groups["sg-a"]["egress"] = draw(rules())  # else: the default world egress
    eni_groups = ["sg-a", "sg-b"] if draw(st.booleans()) else ["sg-a"]
    settings: Dict[str, Any] = {}
    if draw(st.integers(0, 3)) == 0:
        settings["dhcp_servers"] = ["198.18.0.1/32", "fe80::1/128"]
    if draw(st.integers(0, 7)) == 0:
        settings["exempt_dhcp"] = False
    return {
        "sgctl": 1, "groups": groups,
        "prefix_lists": {"pl-x": {"family": "ipv4", "max_entries": 3,
                                  "entries": draw(st.lists(st.sampled_from(
                                      ["198.18.1.0/25", "198.19.0.0/16", "198.18.3.3/32"]),
                                      unique=True, max_size=3))}},
        "interfaces": {
            "eni-a": {"groups": eni_groups, "ipv4": [str(LOCAL4)], "ipv6": [str(LOCAL6)],
                      "device": "DEV", "source_dest_check": draw(st.integers(0, 3)) != 0,
                      "mac_address": MAC if draw(st.booleans()) else None},
            "eni-b": {"groups": ["sg-b"], "ipv4": ["198.18.3.3"], "ipv6": ["2001:db8:3::3"]},
        },
        "settings": settings,
    }


@st.composite
def special(draw: Any, direction: str) -> Packet:
    """The shapes an attacker sends (1.3, 1.6): neighbour discovery, ARP,
    DHCP, ICMPv6 of types 133-137 inside IPv4."""
    kind = draw(st.sampled_from(["nd", "nd", "arp", "dhcp", "dhcp", "proto58"]))
    egress = direction == "egress"
    if kind == "nd":
        typ = draw(st.integers(133, 137))
        src = draw(st.sampled_from(ND_SOURCES)) if egress else draw(st.sampled_from(
            [addr("fe80::1"), addr("2001:db8:1::1"), addr("::")]))
        dst = draw(st.sampled_from(ND_DESTS))
        target = draw(st.sampled_from([None, LOCAL6, LL, addr("2001:db8::66")]))
        return Packet(src, dst, 58, icmp_type=typ, icmp_code=draw(st.sampled_from([0, 0, 1])),
                      hop_limit=draw(st.sampled_from([255, 255, 64])),
                      nd_target=target if typ in (135, 136) else None)
    if kind == "arp":
        sender = draw(st.sampled_from([LOCAL4, addr("198.18.3.3"), addr("0.0.0.0")]))
        other = addr("198.18.1.1")
        return Packet(sender, other, ARP) if egress else Packet(other, sender, ARP)
    if kind == "dhcp":
        v6 = draw(st.booleans())
        server_port, client_port = (547, 546) if v6 else (67, 68)
        peer = draw(st.sampled_from(DHCP_PEERS6 if v6 else DHCP_PEERS4))
        local = draw(st.sampled_from([LL, LOCAL6] if v6 else [LOCAL4, addr("0.0.0.0")]))
        sport, dport = draw(st.sampled_from([(client_port, server_port),
                                             (server_port, client_port)]))
        if egress:
            return Packet(local, peer, 17, sport, dport)
        if local == addr("0.0.0.0"):
            local = addr("255.255.255.255")
        return Packet(peer, local, 17, sport, dport)
    local, remote = LOCAL4, addr("198.18.1.1")
    typ = draw(st.sampled_from([135, 136, 134]))
    return (Packet(local, remote, 58, icmp_type=typ, hop_limit=255) if egress
            else Packet(remote, local, 58, icmp_type=typ, hop_limit=255))


@st.composite
def packets(draw: Any) -> List[tuple]:
    out: List[tuple] = []
    for _ in range(draw(st.integers(*PACKETS_PER_EXAMPLE))):
        at = draw(st.sampled_from(TIME_STEPS))
        if out and draw(st.integers(0, 9)) == 0:  # an ICMP error about an earlier packet
            _, direction, prev = draw(st.sampled_from(out))
            if prev.proto in (6, 17, 1, 58, 47):
                proto = 1 if prev.family == 4 else 58
                typ = draw(st.sampled_from([3, 11] if proto == 1 else [1, 2, 3]))
                src, dst = prev.dst, prev.src
                if draw(st.integers(0, 3)) == 0:  # inconsistent: elsewhere, or from elsewhere
                    other = addr("198.18.2.2") if proto == 1 else addr("2001:db8:1::1")
                    src, dst = draw(st.sampled_from([(src, other), (other, dst)]))
                err = Packet(src, dst, proto, icmp_type=typ, icmp_code=0, embedded=prev)
                out.append((at, "ingress" if direction == "egress" else "egress", err))
                continue
        if draw(st.integers(0, 7)) == 0:
            direction = draw(st.sampled_from(["ingress", "egress"]))
            out.append((at, direction, draw(special(direction))))
            continue
        if out and draw(st.integers(0, 15)) == 0:  # an earlier packet from a forged MAC
            at_, direction, prev = draw(st.sampled_from(out))
            out.append((at, direction, replace(prev, src_mac="02:00:00:00:00:99")))
            continue
        if out and draw(st.integers(0, 2)) == 0:  # the reverse of an earlier packet
            _, direction, prev = draw(st.sampled_from(out))
            if prev.embedded is None and not prev.is_arp:
                rev = prev.reversed()
                if prev.proto == 6:
                    rev = Packet(rev.src, rev.dst, 6, rev.sport, rev.dport,
                                 tcp_flags=draw(st.sampled_from(FLAGS)))
                elif prev.query_request:
                    pair = {8: 0, 0: 8, 13: 14, 14: 13, 128: 129, 129: 128}
                    rev = Packet(rev.src, rev.dst, prev.proto, ident=prev.ident,
                                 icmp_type=draw(st.sampled_from(
                                     [pair[prev.icmp_type], prev.icmp_type])))
                out.append((at, "ingress" if direction == "egress" else "egress", rev))
                continue
        v6 = draw(st.integers(0, 3)) == 0
        remote = draw(st.sampled_from(REMOTES6 if v6 else REMOTES4))
        direction = draw(st.sampled_from(["ingress", "egress"]))
        if direction == "ingress":
            local = draw(st.sampled_from(DESTS6 if v6 else DESTS4))
        else:
            local = draw(st.sampled_from(SOURCES6 if v6 else SOURCES4))
        src, dst = (remote, local) if direction == "ingress" else (local, remote)
        l2_multicast = not v6 and direction == "ingress" and draw(st.booleans())
        proto = draw(st.sampled_from([6, 6, 17, 17, 58 if v6 else 1, 47]))
        if proto in (6, 17):
            pkt = Packet(src, dst, proto, draw(st.sampled_from(PORTS)),
                         draw(st.sampled_from(PORTS)), tcp_flags=draw(st.sampled_from(FLAGS)),
                         l2_multicast=l2_multicast)
        elif proto in (1, 58):
            typ = draw(st.sampled_from([t for t in ICMP_TYPES[proto] if t not in (3, 11, 1, 2)]))
            pkt = Packet(src, dst, proto, icmp_type=typ, icmp_code=draw(st.sampled_from([0, 4])),
                         ident=draw(st.sampled_from([1, 2])), l2_multicast=l2_multicast)
        else:
            pkt = Packet(src, dst, proto)
        out.append((at, direction, pkt))
    return out


def test_kernel_agrees_with_evaluator(kernel, test_devs) -> None:
    counted = {"packets": 0, "examples": 0, "allowed": 0, "reasons": set()}

    @seed(20261127)
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(doc=policy(), seq=packets())
    def check(doc: Dict[str, Any], seq: List[tuple]) -> None:
        doc["interfaces"]["eni-a"]["device"] = test_devs[0]
        state = load_document(doc)
        kernel.flush()
        kernel.apply(state)
        now = {"t": 1000}
        oracle = Evaluator(state, clock=lambda: now["t"], ct_max=KERNEL_CT_MAX)
        for i, (at, direction, pkt) in enumerate(seq):
            now["t"] += at
            kernel.set_clock(now["t"])
            want = oracle.packet("eni-a", direction, pkt)
            got = kernel.run("eni-a", direction, pkt)
            assert got == want.reason, (f"packet {i} {direction} {pkt}: kernel {got.name}, "
                                        f"evaluator {want.reason.name}")
            counted["packets"] += 1
            counted["allowed"] += got.allowed
            counted["reasons"].add(got.name)
        counted["examples"] += 1

    check()
    print(f"\ndifferential: {counted['examples']} rule sets, {counted['packets']} packets, "
          f"{counted['allowed']} allowed, reasons seen: {sorted(counted['reasons'])}")
    assert counted["packets"] >= MIN_PACKETS
    assert {"ALLOW_NEW", "ALLOW_ESTABLISHED", "ALLOW_UNTRACKED", "ALLOW_RELATED",
            "ALLOW_EXEMPT", "DROP_NO_RULE", "DROP_SRC_SPOOF", "DROP_DST_FOREIGN",
            "DROP_NEIGH_SPOOF", "DROP_ND_ROUTER"} <= counted["reasons"]
