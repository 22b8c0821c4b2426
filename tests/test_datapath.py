"""The real programs on scapy-built frames (BPF_PROG_TEST_RUN), Katran style:
tables of {description, packets, expected verdicts}. Each case runs against
a fresh conntrack table with a frozen clock, and every verdict is also
checked against the reference evaluator so the fixtures and the oracle
cannot disagree silently."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Union

import pytest
from scapy.layers.inet import IP, TCP, UDP, IPOption_RR
from scapy.layers.inet6 import (
    ICMPv6ND_NS,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Raw

from controller.abi.reasons import Reason as R
from controller.kernel.frames import DST_MAC, SRC_MAC, frame, l3
from controller.policy.evaluator import ARP as ARP_PROTO
from controller.policy.evaluator import TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, TCP_URG, Evaluator, addr
from controller.policy.evaluator import Packet as P
from controller.policy.formats import load_document
from controller.policy.model import State
from tests.states import one_interface

pytestmark = pytest.mark.kernel

LOCAL, REMOTE, OTHER = addr("198.18.0.10"), addr("198.18.1.1"), addr("198.18.2.2")
LOCAL6, REMOTE6 = addr("2001:db8::10"), addr("2001:db8:1::1")
OTHER6 = addr("2001:db8::66")
MAC = "02:00:00:00:00:01"  # the instance's (SRC_MAC, every frame's default): its link-local is LL
OTHER_MAC = "02:00:00:00:00:99"
LL, LL_PEER = addr("fe80::ff:fe00:1"), addr("fe80::1")
SOLICITED = addr("ff02::1:ff00:10")  # LOCAL6's solicited-node group
ZERO4, ZERO6, BCAST4 = addr("0.0.0.0"), addr("::"), addr("255.255.255.255")
SERVER = addr("198.18.0.1")  # a DHCP server on the link
METADATA, DNS = addr("169.254.169.254"), addr("169.254.169.253")
SA = TCP_SYN | TCP_ACK


def tin(sport: int, dport: int, flags: int = TCP_SYN, src=REMOTE, dst=LOCAL) -> P:
    return P(src, dst, 6, sport, dport, tcp_flags=flags)


def tout(sport: int, dport: int, flags: int = TCP_SYN, src=LOCAL, dst=REMOTE) -> P:
    return P(src, dst, 6, sport, dport, tcp_flags=flags)


def uin(sport: int, dport: int, src=REMOTE, dst=LOCAL) -> P:
    return P(src, dst, 17, sport, dport)


def uout(sport: int, dport: int, src=LOCAL, dst=REMOTE) -> P:
    return P(src, dst, 17, sport, dport)


def icmp(src, dst, typ: int, code: int = 0, ident: int = 0, inner: Optional[P] = None,
         proto: int = 1) -> P:
    return P(src, dst, proto, icmp_type=typ, icmp_code=code, ident=ident, embedded=inner)


def nd(src, dst, typ: int, target=None, hop: int = 255, code: int = 0) -> P:
    """An ICMPv6 neighbour-discovery message (NS/NA carry ``target``)."""
    return P(src, dst, 58, icmp_type=typ, icmp_code=code, hop_limit=hop, nd_target=target)


def arp(sender, target) -> P:
    """An ARP reply: ``sender`` claims its address."""
    return P(sender, target, ARP_PROTO)


Frame = Union[P, bytes]


@dataclass
class Step:
    direction: str
    pkt: Frame
    want: R
    at: int = 0  # seconds after the case's start
    oracle: bool = True  # also ask the evaluator (only for abstract packets)


@dataclass
class Case:
    desc: str
    steps: List[Step]
    state: Dict[str, Any] = field(default_factory=dict)


def I(pkt: Frame, want: R, at: int = 0) -> Step:  # noqa: E743
    return Step("ingress", pkt, want, at)


def E(pkt: Frame, want: R, at: int = 0) -> Step:
    return Step("egress", pkt, want, at)


OPEN80 = {"ingress": [{"proto": "tcp", "ports": 80, "from": "198.18.1.0/24"}], "egress": []}
WORLD80 = {"ingress": [{"proto": "tcp", "ports": 80, "from": "0.0.0.0/0"}]}  # default egress


def raw_eth(payload: bytes, ethertype: int = 0x0800) -> bytes:
    return bytes(Ether(src=SRC_MAC, dst=DST_MAC, type=ethertype)) + payload


def ip4_bytes(pkt: P) -> bytes:
    return bytes(l3(pkt))


def truncated_l4_ipv4(n: int) -> bytes:
    """A TCP SYN whose IP total length says it ends after n bytes of TCP header."""
    ip = bytearray(ip4_bytes(tin(5000, 80)))
    ip = ip[: 20 + n]
    struct.pack_into("!H", ip, 2, len(ip))
    return raw_eth(bytes(ip))


def padded_l4_ipv4(pkt: P, keep: int) -> bytes:
    """The IP packet cut to ``keep`` bytes after its header (total length
    says so), the rest of the original left behind it as link padding."""
    ip = bytearray(ip4_bytes(pkt))
    struct.pack_into("!H", ip, 2, 20 + keep)
    struct.pack_into("!H", ip, 10, 0)
    return raw_eth(bytes(ip) + b"\0" * 8)


def padded_nd(pkt: P) -> bytes:
    """An NS/NA whose payload length ends before the target address."""
    raw = bytearray(bytes(l3(pkt)))
    struct.pack_into("!H", raw, 4, 8)  # ICMPv6 header only; the target becomes padding
    return raw_eth(bytes(raw), 0x86DD)


def icmp_error_truncated_inner(keep: int) -> bytes:
    """ICMP dest-unreachable whose embedded header is cut to ``keep`` bytes."""
    inner = bytes(l3(tout(80, 5000)))[:keep]
    pkt = IP(src=str(REMOTE), dst=str(LOCAL), proto=1) / Raw(bytes([3, 1, 0, 0, 0, 0, 0, 0]) + inner)
    return bytes(Ether(src=SRC_MAC, dst=DST_MAC) / pkt)


CASES: List[Case] = [
    Case("tracked TCP: SYN in by rule, replies and later packets by conntrack", [
        I(tin(5000, 80), R.ALLOW_NEW),
        E(tout(80, 5000, SA), R.ALLOW_ESTABLISHED),
        I(tin(5000, 80, TCP_ACK), R.ALLOW_ESTABLISHED),
        E(tout(80, 5001, SA), R.DROP_NO_RULE),  # no connection, no egress rule
        I(tin(5000, 81), R.DROP_NO_RULE),
        I(tin(5000, 80, src=OTHER), R.DROP_NO_RULE),
    ], OPEN80),
    Case("stateful in the other direction: egress rule, inbound replies", [
        E(uout(4000, 53), R.ALLOW_NEW),
        I(uin(53, 4000), R.ALLOW_ESTABLISHED),
        I(uin(53, 4001), R.DROP_NO_RULE),
        I(uin(53, 4000, src=OTHER), R.DROP_NO_RULE),
    ], {"ingress": [], "egress": [{"proto": "udp", "ports": 53, "to": "198.18.1.1/32"}]}),
    Case("untracked: world rule + default world egress (1.4)", [
        I(tin(5000, 80), R.ALLOW_UNTRACKED),
        E(tout(80, 5000, SA), R.ALLOW_UNTRACKED),  # reply side is untracked too
        I(tin(5000, 80, TCP_ACK), R.ALLOW_UNTRACKED),
    ], WORLD80),
    Case("port range edges 1000-2000", [
        I(tin(1, 999), R.DROP_NO_RULE), I(tin(1, 1000), R.ALLOW_NEW),
        I(tin(2, 2000), R.ALLOW_NEW), I(tin(1, 2001), R.DROP_NO_RULE),
    ], {"ingress": [{"proto": "tcp", "ports": "1000-2000", "from": "198.18.1.1/32"}],
        "egress": []}),
    Case("ICMP type/code: echo allowed, other codes and types not", [
        I(icmp(REMOTE, LOCAL, 8, 0, ident=7), R.ALLOW_NEW),
        E(icmp(LOCAL, REMOTE, 0, 0, ident=7), R.ALLOW_ESTABLISHED),
        I(icmp(REMOTE, LOCAL, 8, 1, ident=8), R.DROP_NO_RULE),
        I(icmp(REMOTE, LOCAL, 13, 0), R.DROP_NO_RULE),
        I(icmp(REMOTE, LOCAL, 3, 3, inner=tout(1, 2)), R.ALLOW_UNTRACKED),  # any code, per packet
        I(icmp(REMOTE, LOCAL, 3, 9, inner=tout(1, 2)), R.ALLOW_UNTRACKED),
        I(icmp(REMOTE, LOCAL, 3, 9), R.DROP_ICMP_EMBEDDED),  # an error without its header
    ], {"ingress": [{"proto": "icmp", "type": 8, "code": 0, "from": "0.0.0.0/0"},
                    {"proto": "icmp", "type": 3, "code": -1, "from": "0.0.0.0/0"}],
        "egress": []}),
    Case("related ICMP errors: allowed for tracked flows only", [
        E(tout(5000, 443), R.ALLOW_NEW),
        I(icmp(OTHER, LOCAL, 3, 4, inner=tout(5000, 443)), R.ALLOW_RELATED),
        I(icmp(OTHER, LOCAL, 11, 0, inner=tout(5000, 444)), R.DROP_NO_RULE),
        E(tout(5000, 443, src=LOCAL6, dst=REMOTE6), R.ALLOW_NEW),
        I(icmp(REMOTE6, LOCAL6, 2, 0, inner=tout(5000, 443, src=LOCAL6, dst=REMOTE6),
               proto=58), R.ALLOW_RELATED),
        I(icmp(REMOTE6, LOCAL6, 1, 0, inner=tout(5001, 443, src=LOCAL6, dst=REMOTE6),
               proto=58), R.DROP_NO_RULE),
    ], {"ingress": [], "egress": [{"proto": "tcp", "ports": 443, "to": "0.0.0.0/0"},
                                  {"proto": "tcp", "ports": 443, "to": "::/0"}]}),
    Case("IPv4 peers never match IPv6 and vice versa", [
        I(tin(5000, 22), R.ALLOW_NEW),
        I(tin(5000, 22, src=REMOTE6, dst=LOCAL6), R.DROP_NO_RULE),
    ], {"ingress": [{"proto": "tcp", "ports": 22, "from": "0.0.0.0/0"}], "egress": []}),
    Case("IPv6 rules", [
        I(tin(5000, 22, src=REMOTE6, dst=LOCAL6), R.ALLOW_NEW),
        E(tout(22, 5000, SA, src=LOCAL6, dst=REMOTE6), R.ALLOW_ESTABLISHED),
        I(tin(5000, 22, src=addr("2001:db8:2::1"), dst=LOCAL6), R.DROP_NO_RULE),
        I(icmp(REMOTE6, LOCAL6, 128, ident=3, proto=58), R.ALLOW_NEW),
    ], {"ingress": [{"proto": "tcp", "ports": 22, "from": "2001:db8:1::/48"},
                    {"proto": "icmpv6", "from": "::/0"}], "egress": []}),
    Case("exempt: ARP, neighbour discovery, DHCP, metadata", [
        E(raw_eth(bytes(ARP(psrc=str(LOCAL), pdst=str(REMOTE))), 0x0806), R.ALLOW_EXEMPT),
        I(raw_eth(bytes(IPv6(src=str(REMOTE6), dst=str(LOCAL6), hlim=255) /
                        ICMPv6ND_NS(tgt=str(LOCAL6))), 0x86DD), R.ALLOW_EXEMPT),
        I(nd(REMOTE6, LOCAL6, 136, target=REMOTE6), R.ALLOW_EXEMPT),
        E(uout(68, 67, dst=addr("255.255.255.255")), R.ALLOW_EXEMPT),
        E(tout(5000, 80, dst=addr("169.254.169.254")), R.ALLOW_EXEMPT),
        I(tin(80, 5000, SA, src=addr("169.254.169.254")), R.ALLOW_ESTABLISHED),  # its reply
        E(tout(5000, 80, dst=addr("169.254.169.250")), R.DROP_NO_RULE),
    ], {"ingress": [], "egress": []}),
    Case("exempt addresses from settings: a /8, a /32, IPv6; their neighbours are not", [
        E(tout(5000, 80, dst=addr("10.200.1.1")), R.ALLOW_EXEMPT),  # /8: many top-16 values
        I(tin(80, 5000, SA, src=addr("10.0.0.1")), R.DROP_NO_RULE),  # a source is not exempt
        E(tout(5000, 80, dst=addr("11.0.0.1")), R.DROP_NO_RULE),
        E(tout(5000, 80, dst=addr("203.0.113.7")), R.ALLOW_EXEMPT),
        E(tout(5000, 80, dst=addr("203.0.113.8")), R.DROP_NO_RULE),  # same top 16 bits
        E(tout(5000, 80, src=LOCAL6, dst=addr("2001:db8:ff::1")), R.ALLOW_EXEMPT),
        E(tout(5000, 80, src=LOCAL6, dst=addr("2001:db8:fe::1")), R.DROP_NO_RULE),
        E(tout(5000, 80, dst=addr("169.254.169.254")), R.DROP_NO_RULE),  # not in this list
        I(tin(5000, 22, src=addr("198.18.1.5")), R.ALLOW_NEW),
    ], {"ingress": [{"proto": "tcp", "ports": 22, "from": "198.18.1.0/24"}], "egress": [],
        "settings": {"exempt": ["10.0.0.0/8", "203.0.113.7/32", "2001:db8:ff::/48"]}}),
    Case("IPv4 fragments: later fragments follow the first", [
        I(replace(uin(5000, 53), frag_id=77, more_fragments=True), R.ALLOW_NEW),
        I(replace(uin(5000, 53), frag_id=77, frag_offset=1480), R.ALLOW_FRAGMENT),
        I(replace(uin(5000, 53), frag_id=78, frag_offset=1480), R.DROP_FRAG_UNKNOWN),
        I(replace(uin(5000, 54), frag_id=79, more_fragments=True), R.DROP_NO_RULE),
        I(replace(uin(5000, 54), frag_id=79, frag_offset=8), R.DROP_FRAG_UNKNOWN),
        I(replace(uin(5000, 53), frag_id=77, frag_offset=2960), R.DROP_FRAG_UNKNOWN, at=31),
    ], {"ingress": [{"proto": "udp", "ports": 53, "from": "0.0.0.0/0"}], "egress": []}),
    Case("IPv6 fragments", [
        I(replace(uin(5000, 53, src=REMOTE6, dst=LOCAL6), frag_id=9, more_fragments=True),
          R.ALLOW_NEW),
        I(replace(uin(5000, 53, src=REMOTE6, dst=LOCAL6), frag_id=9, frag_offset=1232),
          R.ALLOW_FRAGMENT),
        I(replace(uin(5000, 53, src=REMOTE6, dst=LOCAL6), frag_id=10, frag_offset=1232),
          R.DROP_FRAG_UNKNOWN),
    ], {"ingress": [{"proto": "udp", "ports": 53, "from": "::/0"}], "egress": []}),
    Case("IPv4 options are skipped, the rules still decide", [
        I(bytes(Ether(src=SRC_MAC, dst=DST_MAC) / IP(src=str(REMOTE), dst=str(LOCAL),
                                                     options=[IPOption_RR()]) /
                TCP(sport=5000, dport=80, flags="S")), R.ALLOW_NEW),
        I(bytes(Ether(src=SRC_MAC, dst=DST_MAC) / IP(src=str(REMOTE), dst=str(LOCAL),
                                                     options=[IPOption_RR()]) /
                TCP(sport=5000, dport=81, flags="S")), R.DROP_NO_RULE),
    ], OPEN80),
    Case("802.1Q and 802.1ad tags are walked; a third tag is dropped", [
        I(bytes(Ether(src=SRC_MAC, dst=DST_MAC) / Dot1Q(vlan=5) / l3(tin(5000, 80))), R.ALLOW_NEW),
        I(bytes(Ether(src=SRC_MAC, dst=DST_MAC) / Dot1AD(vlan=6) / Dot1Q(vlan=5) /
                l3(tin(5001, 81))), R.DROP_NO_RULE),
        I(bytes(Ether(src=SRC_MAC, dst=DST_MAC) / Dot1AD(vlan=6) / Dot1Q(vlan=5) /
                l3(tin(5002, 80))), R.ALLOW_NEW),
        I(bytes(Ether(src=SRC_MAC, dst=DST_MAC) / Dot1AD(vlan=7) / Dot1Q(vlan=6) / Dot1Q(vlan=5)
                / l3(tin(5003, 80))), R.DROP_VLAN_DEPTH),
    ], OPEN80),
    Case("IPv6 extension headers: walked up to the bound", [
        I(bytes(Ether(src=SRC_MAC, dst=DST_MAC) / IPv6(src=str(REMOTE6), dst=str(LOCAL6)) /
                IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / IPv6ExtHdrRouting() /
                TCP(sport=5000, dport=22, flags="S")), R.ALLOW_NEW),
        I(bytes(Ether(src=SRC_MAC, dst=DST_MAC) / IPv6(src=str(REMOTE6), dst=str(LOCAL6)) /
                IPv6ExtHdrHopByHop() / TCP(sport=5000, dport=23, flags="S")), R.DROP_NO_RULE),
        I(bytes(Ether(src=SRC_MAC, dst=DST_MAC) / IPv6(src=str(REMOTE6), dst=str(LOCAL6)) /
                IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() /
                IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() /
                IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() /
                TCP(sport=5000, dport=22, flags="S")), R.DROP_EXTHDR_LIMIT),
    ], {"ingress": [{"proto": "tcp", "ports": 22, "from": "::/0"}], "egress": []}),
    Case("illegal TCP flag combinations are dropped before any rule", [
        I(tin(5000, 80, TCP_SYN | TCP_FIN), R.DROP_TCP_FLAGS),
        I(tin(5000, 80, 0), R.DROP_TCP_FLAGS),
        I(tin(5000, 80, TCP_FIN | TCP_PSH | TCP_URG), R.DROP_TCP_FLAGS),
        I(tin(5000, 80, TCP_SYN | TCP_RST), R.DROP_TCP_FLAGS),
        I(tin(5000, 80, TCP_FIN), R.DROP_TCP_FLAGS),
        I(tin(5000, 80, TCP_SYN | TCP_PSH), R.ALLOW_NEW),
    ], OPEN80),
    Case("ICMP errors with a truncated embedded header", [
        I(icmp_error_truncated_inner(10), R.DROP_ICMP_EMBEDDED),
        I(icmp_error_truncated_inner(20), R.DROP_ICMP_EMBEDDED),
        I(icmp_error_truncated_inner(27), R.DROP_ICMP_EMBEDDED),
        I(icmp_error_truncated_inner(28), R.DROP_NO_RULE),
    ], OPEN80),
    Case("unsupported and malformed L3", [
        I(raw_eth(b"\0" * 40, 0x88CC), R.DROP_L3_UNSUPPORTED),
        I(raw_eth(b"\x46" + ip4_bytes(tin(5000, 80))[1:]), R.DROP_L4_TRUNCATED),  # IHL 6: TCP short
        I(raw_eth(b"\x44" + ip4_bytes(tin(5000, 80))[1:]), R.DROP_IPV4_MALFORMED),  # IHL 4
        I(raw_eth(b"\x65" + ip4_bytes(tin(5000, 80))[1:]), R.DROP_IPV4_MALFORMED),  # version 6
        I(raw_eth(bytes(l3(tin(5000, 80, src=REMOTE6, dst=LOCAL6)))[:50], 0x86DD),
          R.DROP_IPV6_MALFORMED),
        I(truncated_l4_ipv4(19), R.DROP_L4_TRUNCATED),
        I(truncated_l4_ipv4(20), R.ALLOW_NEW),
    ], OPEN80),
    Case("UDP timeouts: other 30 s; stream (request, reply, request, reply) 180 s", [
        E(uout(4000, 53), R.ALLOW_NEW),
        I(uin(53, 4000), R.ALLOW_ESTABLISHED, at=30),
        E(uout(4001, 53), R.ALLOW_NEW, at=30),
        I(uin(53, 4001), R.DROP_NO_RULE, at=61),  # 31 s idle, not a stream
        E(uout(4000, 53), R.ALLOW_ESTABLISHED, at=60),  # second request: not yet a stream
        I(uin(53, 4000), R.ALLOW_ESTABLISHED, at=61),  # its reply: a stream now
        I(uin(53, 4000), R.ALLOW_ESTABLISHED, at=240),
        I(uin(53, 4000), R.DROP_NO_RULE, at=421),
        E(uout(4002, 53), R.ALLOW_NEW, at=500),
        I(uin(53, 4002), R.ALLOW_ESTABLISHED, at=500),
        I(uin(53, 4002), R.ALLOW_ESTABLISHED, at=501),  # replies alone: one transaction
        E(uout(4002, 53), R.ALLOW_ESTABLISHED, at=502),  # a second request, no reply
        I(uin(53, 4002), R.DROP_NO_RULE, at=533),  # still 30 s
    ], {"ingress": [], "egress": [{"proto": "udp", "ports": 53, "to": "0.0.0.0/0"}]}),
    Case("TCP: half-open 60 s, RST closes (10 s), SYN reopens", [
        I(tin(5000, 80), R.ALLOW_NEW),
        E(tout(80, 5000, SA), R.DROP_NO_RULE, at=61),
        I(tin(5001, 80), R.ALLOW_NEW, at=100),
        E(tout(80, 5001, SA), R.ALLOW_ESTABLISHED, at=100),
        E(tout(80, 5001, TCP_RST | TCP_ACK), R.ALLOW_ESTABLISHED, at=101),
        I(tin(5001, 80, TCP_ACK), R.ALLOW_ESTABLISHED, at=111),
        E(tout(80, 5001, TCP_ACK), R.DROP_NO_RULE, at=122),
        I(tin(5001, 80), R.ALLOW_NEW, at=123),
    ], OPEN80),
    Case("TCP: FIN both ways closes", [
        I(tin(5000, 80), R.ALLOW_NEW),
        E(tout(80, 5000, SA), R.ALLOW_ESTABLISHED),
        I(tin(5000, 80, TCP_FIN | TCP_ACK), R.ALLOW_ESTABLISHED, at=1),
        E(tout(80, 5000, TCP_FIN | TCP_ACK), R.ALLOW_ESTABLISHED, at=1),
        I(tin(5000, 80, TCP_ACK), R.ALLOW_ESTABLISHED, at=11),
        E(tout(80, 5000, TCP_ACK), R.DROP_NO_RULE, at=22),
    ], OPEN80),
    Case("other protocols are tracked by addresses (600 s)", [
        E(P(LOCAL, REMOTE, 47), R.ALLOW_NEW),
        I(P(REMOTE, LOCAL, 47), R.ALLOW_ESTABLISHED, at=599),
        I(P(OTHER, LOCAL, 47), R.DROP_NO_RULE),
        I(P(REMOTE, LOCAL, 47), R.DROP_NO_RULE, at=1300),
    ], {"ingress": [], "egress": [{"proto": 47, "to": "198.18.1.0/24"}]}),
    Case("interface timeouts apply (UDP 60 s stream)", [
        E(uout(4000, 53), R.ALLOW_NEW),
        I(uin(53, 4000), R.ALLOW_ESTABLISHED),
        E(uout(4000, 53), R.ALLOW_ESTABLISHED),
        I(uin(53, 4000), R.ALLOW_ESTABLISHED),  # a stream
        I(uin(53, 4000), R.ALLOW_ESTABLISHED, at=60),
        I(uin(53, 4000), R.DROP_NO_RULE, at=121),
    ], {"ingress": [], "egress": [{"proto": "udp", "ports": 53, "to": "0.0.0.0/0"}],
        "timeouts": {"udp_stream": 60}}),
    Case("host mode: XDP is ingress, tc is egress", [
        I(tin(5000, 80), R.ALLOW_NEW),
        E(tout(80, 5000, SA), R.ALLOW_ESTABLISHED),
        E(tout(5000, 22), R.DROP_NO_RULE),
    ], dict(OPEN80, mode="host")),
    Case("two groups: the union of their rules", [
        I(tin(5000, 80), R.ALLOW_NEW), I(tin(5000, 443), R.ALLOW_NEW),
        I(tin(5000, 22), R.DROP_NO_RULE),
    ], dict(OPEN80, eni_groups=["sg-a", "sg-b"],
            extra_groups={"sg-b": {"ingress": [{"proto": "tcp", "ports": 443, "from": "0.0.0.0/0"}],
                                   "egress": []}})),
    Case("group reference: members' addresses, not their rules", [
        I(tin(5000, 5432, src=addr("198.18.3.3")), R.ALLOW_NEW),
        I(tin(5000, 5432, src=addr("198.18.3.4")), R.DROP_NO_RULE),
        I(tin(5000, 5432, src=addr("2001:db8:3::3"), dst=LOCAL6), R.ALLOW_NEW),
    ], {"ingress": [{"proto": "tcp", "ports": 5432, "from": "sg-b"}], "egress": [],
        "extra_groups": {"sg-b": {"ingress": []}},
        "others": {"eni-b": {"groups": ["sg-b"], "ipv4": ["198.18.3.3"], "ipv6": ["2001:db8:3::3"]}}}),
    Case("prefix list entries", [
        I(tin(5000, 22, src=addr("198.18.9.200")), R.ALLOW_NEW),
        I(tin(5000, 22, src=addr("198.18.8.1")), R.DROP_NO_RULE),
    ], {"ingress": [{"proto": "tcp", "ports": 22, "from": "pl-x"}], "egress": [],
        "prefix_lists": {"pl-x": {"family": "ipv4", "max_entries": 4,
                                  "entries": ["198.18.9.0/24"]}}}),

    # ------------------------------------------------------------ SourceDestCheck (1.6)
    Case("source check: the instance sends only from its own addresses", [
        E(tout(5000, 80, src=OTHER), R.DROP_SRC_SPOOF),  # a forged member address
        E(tout(5000, 80, src=OTHER6, dst=REMOTE6), R.DROP_SRC_SPOOF),
        E(tout(5000, 80), R.ALLOW_NEW),
        E(uout(68, 67, src=ZERO4, dst=BCAST4), R.ALLOW_EXEMPT),  # DHCP discovery
        E(uout(5000, 53, src=ZERO4), R.DROP_SRC_SPOOF),  # nothing else from 0.0.0.0
        E(icmp(LL, addr("fe80::1"), 128, ident=4, proto=58), R.ALLOW_NEW),  # its link-local
        E(icmp(addr("fe80::99"), addr("fe80::1"), 128, ident=4, proto=58), R.DROP_SRC_SPOOF),
        E(nd(ZERO6, SOLICITED, 135, target=LOCAL6), R.ALLOW_EXEMPT),  # duplicate address detection
        E(uout(5000, 53, src=ZERO6, dst=REMOTE6), R.DROP_SRC_SPOOF),
        E(replace(uout(5000, 53, src=OTHER), frag_id=5, frag_offset=8), R.DROP_SRC_SPOOF),
    ], {"ingress": [], "eni": {"mac_address": MAC}}),
    Case("source check: the instance receives only at its own addresses", [
        I(tin(5000, 22, dst=OTHER), R.DROP_DST_FOREIGN),  # an address it configured itself
        I(tin(5000, 22, src=REMOTE6, dst=OTHER6), R.DROP_DST_FOREIGN),
        I(tin(5000, 22), R.ALLOW_NEW),
        I(uin(5000, 53, dst=BCAST4), R.DROP_NO_RULE),  # broadcast: the rules decide
        I(uin(5000, 5353, dst=addr("224.0.0.251")), R.DROP_NO_RULE),
        I(replace(uin(5000, 53, dst=addr("198.18.0.255")), l2_multicast=True), R.DROP_NO_RULE),
        I(uin(5000, 53, dst=addr("198.18.0.255")), R.DROP_DST_FOREIGN),  # unicast frame
        I(uin(5000, 53, src=REMOTE6, dst=addr("ff02::fb")), R.DROP_NO_RULE),
        I(replace(uin(5000, 53, src=REMOTE6, dst=OTHER6), l2_multicast=True),
          R.DROP_DST_FOREIGN),  # no broadcast in IPv6
        I(tin(5000, 22, src=REMOTE6, dst=LL), R.ALLOW_NEW),
    ], {"ingress": [{"proto": "tcp", "ports": 22, "from": "0.0.0.0/0"},
                    {"proto": "tcp", "ports": 22, "from": "::/0"}], "egress": [],
        "eni": {"mac_address": MAC}}),
    Case("source check off (a router instance): addresses are the rules' business", [
        E(tout(5000, 80, src=OTHER), R.ALLOW_NEW),
        I(tin(5000, 22, dst=OTHER), R.ALLOW_NEW),
        E(nd(LL, addr("ff02::1"), 134), R.ALLOW_EXEMPT),  # its router advertisements
        E(nd(LOCAL6, addr("2001:db8::99"), 136, target=OTHER6), R.ALLOW_EXEMPT),
        E(arp(OTHER, REMOTE), R.ALLOW_EXEMPT),
        E(icmp(OTHER, REMOTE, 3, 3, inner=tin(5000, 22, dst=OTHER)), R.ALLOW_RELATED),
    ], {"ingress": [{"proto": "tcp", "ports": 22, "from": "198.18.1.0/24"}],
        "eni": {"source_dest_check": False, "mac_address": MAC}}),
    Case("a declared MAC: every frame from the instance carries it", [
        E(replace(tout(5000, 80), src_mac=OTHER_MAC), R.DROP_SRC_SPOOF),
        E(tout(5000, 80), R.ALLOW_NEW),
        E(replace(tout(5000, 80, TCP_ACK), src_mac=OTHER_MAC), R.DROP_SRC_SPOOF),  # connection or not
        E(tout(5000, 80, TCP_ACK), R.ALLOW_ESTABLISHED),
        E(replace(arp(LOCAL, REMOTE), src_mac=OTHER_MAC), R.DROP_NEIGH_SPOOF),
        E(raw_eth(bytes(ARP(op=2, hwsrc=OTHER_MAC, psrc=str(LOCAL), pdst=str(REMOTE))), 0x0806),
          R.DROP_NEIGH_SPOOF),  # the right frame source, another sender in the ARP body
        I(replace(tin(5001, 22), src_mac=OTHER_MAC), R.ALLOW_NEW),  # others' MACs: not ours
    ], {"ingress": [{"proto": "tcp", "ports": 22, "from": "0.0.0.0/0"}],
        "egress": [{"proto": "tcp", "ports": 80, "to": "0.0.0.0/0"}],
        "eni": {"mac_address": MAC}}),
    Case("no declared MAC, or the check off: any MAC", [
        E(replace(tout(5000, 80), src_mac=OTHER_MAC), R.ALLOW_NEW),
    ], {"ingress": [], "eni": {"mac_address": MAC, "source_dest_check": False}}),
    Case("ARP from the instance claims only its own address", [
        E(arp(LOCAL, REMOTE), R.ALLOW_EXEMPT),
        E(arp(OTHER, REMOTE), R.DROP_NEIGH_SPOOF),  # poisoning a neighbour's table
        E(arp(ZERO4, LOCAL), R.ALLOW_EXEMPT),  # address probe
        I(arp(OTHER, LOCAL), R.ALLOW_EXEMPT),  # what others claim is their own check
        E(raw_eth(bytes(ARP(hwtype=6, psrc=str(LOCAL), pdst=str(REMOTE))), 0x0806),
          R.DROP_NEIGH_SPOOF),  # not IPv4 over Ethernet: nothing to check it by
        E(raw_eth(bytes(ARP(psrc=str(LOCAL), pdst=str(REMOTE)))[:20], 0x0806),
          R.DROP_L2_MALFORMED),
    ], {"ingress": [], "egress": []}),
    # ------------------------------------------------------------ exemptions (1.3)
    Case("neighbour discovery: IPv6 only, hop limit 255, on the link", [
        I(icmp(REMOTE, LOCAL, 135, proto=58), R.DROP_NO_RULE),  # IPv4 protocol 58 is not ND
        E(icmp(LOCAL, REMOTE, 135, proto=58), R.DROP_NO_RULE),
        I(nd(REMOTE6, LOCAL6, 135, target=LOCAL6, hop=64), R.DROP_NO_RULE),  # routed: not ND
        I(nd(REMOTE6, SOLICITED, 135, target=LOCAL6), R.ALLOW_EXEMPT),
        E(nd(LOCAL6, addr("2001:db8::99"), 136, target=LOCAL6), R.ALLOW_EXEMPT),  # same /64
        E(nd(LOCAL6, addr("2001:db8:5::1"), 136, target=LOCAL6), R.DROP_NO_RULE),  # off the link
        E(nd(LOCAL6, addr("2001:db8:5::1"), 135, target=LOCAL6), R.DROP_NO_RULE),
        E(nd(LL, SOLICITED, 135, target=LOCAL6, code=1), R.DROP_NO_RULE),  # code must be 0
        E(nd(LOCAL6, LL_PEER, 136, target=OTHER6), R.DROP_NEIGH_SPOOF),
        E(nd(LOCAL6, LL_PEER, 136), R.DROP_NEIGH_SPOOF),  # an NA without its target
        E(nd(LL, addr("ff02::1"), 134), R.DROP_ND_ROUTER),  # instances are not routers
        E(nd(LL, LL_PEER, 137), R.DROP_ND_ROUTER),
        E(nd(LL, addr("ff02::2"), 133), R.ALLOW_EXEMPT),  # router solicitation
        I(nd(LL_PEER, addr("ff02::1"), 134), R.ALLOW_EXEMPT),  # the router's advertisement
        I(nd(REMOTE6, addr("ff02::1"), 134), R.DROP_NO_RULE),  # not from a link-local
        I(nd(REMOTE6, LOCAL6, 137), R.DROP_NO_RULE),  # a redirect from anywhere
        I(nd(LL_PEER, LL, 137), R.ALLOW_EXEMPT),
    ], {"ingress": [], "egress": [], "eni": {"mac_address": MAC}}),
    Case("DHCP: the client side only", [
        I(uin(67, 68, src=SERVER, dst=BCAST4), R.DROP_NO_RULE),  # a rogue offer, never asked
        E(uout(68, 67, src=ZERO4, dst=BCAST4), R.ALLOW_EXEMPT),
        I(uin(67, 68, src=SERVER, dst=BCAST4), R.ALLOW_EXEMPT),  # the answer
        I(uin(67, 68, src=SERVER), R.ALLOW_EXEMPT, at=30),
        I(uin(67, 68, src=SERVER), R.DROP_NO_RULE, at=61),  # 31 s after the last request
        E(uout(68, 67, dst=REMOTE), R.DROP_NO_RULE),  # port 68 is no tunnel to the world
        I(uin(68, 67), R.DROP_NO_RULE),  # server traffic towards the instance
        E(uout(67, 68, dst=BCAST4), R.DROP_NO_RULE),  # the instance as a DHCP server
        E(uout(546, 547, src=LL, dst=addr("ff02::1:2")), R.ALLOW_EXEMPT, at=100),
        I(uin(547, 546, src=LL_PEER, dst=LL), R.ALLOW_EXEMPT, at=100),
        I(uin(547, 546, src=LL_PEER, dst=LOCAL6), R.ALLOW_EXEMPT, at=100),
    ], {"ingress": [], "egress": [], "eni": {"mac_address": MAC}}),
    Case("DHCP servers configured: only they answer, requests go only to them", [
        E(uout(68, 67, src=ZERO4, dst=BCAST4), R.ALLOW_EXEMPT),
        I(uin(67, 68, src=addr("198.18.0.66"), dst=BCAST4), R.DROP_NO_RULE),
        I(uin(67, 68, src=SERVER, dst=BCAST4), R.ALLOW_EXEMPT),
        E(uout(68, 67, dst=SERVER), R.ALLOW_EXEMPT),  # renewal, unicast
        E(uout(68, 67, dst=addr("198.18.0.66")), R.DROP_NO_RULE),
    ], {"ingress": [], "egress": [], "settings": {"dhcp_servers": ["198.18.0.1/32"]}}),
    Case("infrastructure services: exempt as destinations, and their replies only", [
        I(tin(5000, 22, src=METADATA), R.DROP_NO_RULE),  # a forged exempt source
        I(uin(53, 4000, src=DNS), R.DROP_NO_RULE),  # an answer nobody asked for
        E(uout(4000, 53, dst=DNS), R.ALLOW_EXEMPT),
        I(uin(53, 4000, src=DNS), R.ALLOW_ESTABLISHED),
        I(uin(53, 4001, src=DNS), R.DROP_NO_RULE),
        E(icmp(LOCAL, METADATA, 8, ident=9), R.ALLOW_EXEMPT),
        I(icmp(METADATA, LOCAL, 0, ident=9), R.ALLOW_ESTABLISHED),
        I(icmp(METADATA, LOCAL, 8, ident=9), R.DROP_NO_RULE),
        E(icmp(LOCAL, METADATA, 0, ident=9), R.ALLOW_EXEMPT),  # a reply to it: not tracked
        I(uin(53, 4000, src=DNS), R.DROP_NO_RULE, at=31),
    ], {"ingress": [], "egress": []}),
    # ------------------------------------------------------------ ICMP (1.4)
    Case("ICMP queries: a reply answers only its own request", [
        I(icmp(REMOTE, LOCAL, 13, ident=1), R.ALLOW_NEW),  # timestamp request
        E(icmp(LOCAL, REMOTE, 0, ident=1), R.DROP_NO_RULE),  # an echo reply is no answer
        E(icmp(LOCAL, REMOTE, 14, ident=1), R.ALLOW_ESTABLISHED),
        E(icmp(LOCAL, REMOTE, 13, ident=1), R.DROP_NO_RULE),  # nor its own request back
        E(icmp(LOCAL, REMOTE, 5, 1), R.DROP_NO_RULE),  # nor any other type
        E(icmp(LOCAL, REMOTE, 14, ident=2), R.DROP_NO_RULE),
        I(icmp(REMOTE, LOCAL, 13, ident=1), R.ALLOW_ESTABLISHED, at=29),
        E(icmp(LOCAL, REMOTE, 14, ident=1), R.DROP_NO_RULE, at=60),
    ], {"ingress": [{"proto": "icmp", "type": 13, "code": -1, "from": "0.0.0.0/0"}],
        "egress": []}),
    Case("ICMP other types and replies are judged per packet, never tracked", [
        I(icmp(REMOTE, LOCAL, 5, 1), R.ALLOW_UNTRACKED),  # allowed here...
        E(icmp(LOCAL, REMOTE, 5, 1), R.DROP_NO_RULE),  # ...opens nothing
        E(icmp(LOCAL, REMOTE, 8, ident=3), R.DROP_NO_RULE),
        I(icmp(REMOTE, LOCAL, 0, ident=3), R.ALLOW_UNTRACKED),  # an echo reply opens nothing
        E(icmp(LOCAL, REMOTE, 8, ident=3), R.DROP_NO_RULE),
    ], {"ingress": [{"proto": "icmp", "type": 5, "code": -1, "from": "0.0.0.0/0"},
                    {"proto": "icmp", "type": 0, "code": -1, "from": "0.0.0.0/0"}],
        "egress": []}),
    Case("related ICMP errors must be consistent with their connection", [
        I(tin(5000, 80), R.ALLOW_NEW),
        E(icmp(LOCAL, REMOTE, 3, 3, inner=tin(5000, 80)), R.ALLOW_RELATED),
        E(icmp(LOCAL, OTHER, 3, 3, inner=tin(5000, 80)), R.DROP_NO_RULE),  # not to its source
        E(icmp(LOCAL, REMOTE, 3, 3, inner=tin(5000, 81)), R.DROP_NO_RULE),
        E(tout(6000, 443), R.ALLOW_NEW),
        I(icmp(OTHER, LOCAL, 3, 4, inner=tout(6000, 443)), R.ALLOW_RELATED),  # a router on the path
        I(icmp(OTHER, LOCAL, 3, 4, inner=tout(6000, 443, src=OTHER)), R.DROP_NO_RULE),
    ], {"ingress": [{"proto": "tcp", "ports": 80, "from": "198.18.1.0/24"}],
        "egress": [{"proto": "tcp", "ports": 443, "to": "0.0.0.0/0"}]}),
    # ------------------------------------------------------------ parsing (1.5)
    Case("IPv6 fragments: extension headers after the Fragment header", [
        I(bytes(Ether(src=SRC_MAC, dst=DST_MAC) / IPv6(src=str(REMOTE6), dst=str(LOCAL6)) /
                IPv6ExtHdrFragment(id=11, m=1, nh=60) / IPv6ExtHdrDestOpt() /
                UDP(sport=5000, dport=53) / Raw(b"x" * 16)), R.ALLOW_NEW),
        I(bytes(Ether(src=SRC_MAC, dst=DST_MAC) / IPv6(src=str(REMOTE6), dst=str(LOCAL6)) /
                IPv6ExtHdrFragment(id=11, offset=4, nh=60) / Raw(b"y" * 16)), R.ALLOW_FRAGMENT),
        I(bytes(Ether(src=SRC_MAC, dst=DST_MAC) / IPv6(src=str(REMOTE6), dst=str(LOCAL6)) /
                IPv6ExtHdrFragment(id=12, offset=4, nh=60) / Raw(b"y" * 16)),
          R.DROP_FRAG_UNKNOWN),
    ], {"ingress": [{"proto": "udp", "ports": 53, "from": "::/0"}], "egress": []}),
    Case("headers are never read from the Ethernet padding", [
        I(padded_l4_ipv4(tin(5000, 80), 10), R.DROP_L4_TRUNCATED),
        I(padded_l4_ipv4(uin(5000, 53), 4), R.DROP_L4_TRUNCATED),
        I(padded_l4_ipv4(icmp(REMOTE, LOCAL, 8, ident=1), 4), R.DROP_L4_TRUNCATED),
        I(padded_l4_ipv4(icmp(OTHER, LOCAL, 3, 4, inner=tout(5000, 80)), 8 + 20 + 4),
          R.DROP_ICMP_EMBEDDED),
        I(padded_l4_ipv4(tin(5000, 80), 20), R.ALLOW_NEW),
        E(padded_nd(nd(LOCAL6, LL_PEER, 136, target=LOCAL6)), R.DROP_NEIGH_SPOOF),
    ], dict(OPEN80, eni={"mac_address": MAC})),
]


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
    """A full table drops new flows (counted), never evicts live ones."""
    from tests.harness import KERNEL_CT_MAX

    kernel.apply(one_interface(device=test_devs[0], ingress=[], egress=[
        {"proto": "udp", "ports": "1-65535", "to": "198.18.1.0/24"}]))
    for port in range(1, KERNEL_CT_MAX + 1):
        assert kernel.run("eni-a", "egress", uout(10000, port)) == R.ALLOW_NEW
    assert kernel.run("eni-a", "egress", uout(10000, KERNEL_CT_MAX + 1)) == R.DROP_CT_FULL
    assert kernel.run("eni-a", "ingress", uin(1, 10000)) == R.ALLOW_ESTABLISHED
    # once expired, an entry's own key may be reused, others still cannot enter
    kernel.set_clock(1000 + 31)
    assert kernel.run("eni-a", "egress", uout(10000, 2)) == R.ALLOW_NEW
    assert kernel.run("eni-a", "egress", uout(10000, KERNEL_CT_MAX + 2)) == R.DROP_CT_FULL


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
    from controller.policy.compiler import class_segments, compile_state

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
            raw = bytes(k.addr)[:4 if k.family == 4 else 16]
            got[(k.dir, k.family, k.plen, int.from_bytes(raw, "big"))] = content_of[v.value]
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
            events.append("overwrite" if dp._grace is None and dp._quiet else "UNSAFE overwrite")
        return real_write(pid, new, old)

    def delete(pid):  # type: ignore[no-untyped-def]
        events.append("delete" if dp._grace is None and dp._quiet else "UNSAFE delete")
        return real_delete(pid)

    def barrier() -> None:
        real_barrier()
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
