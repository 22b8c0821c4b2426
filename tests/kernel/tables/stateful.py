"""Tracking: TCP, UDP and other protocols in both directions, timeouts, world and group peers."""

from dataclasses import replace
from typing import List

from scapy.layers.inet import IP, TCP, IPOption_RR
from scapy.layers.inet6 import ICMPv6ND_NS, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether

from controller.abi.reasons import Reason as R
from controller.kernel.frames import DST_MAC, SRC_MAC, l3
from controller.policy.evaluator import TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, TCP_URG, addr
from controller.policy.evaluator import Packet as P
from tests.kernel.packets import (
    LOCAL,
    LOCAL6,
    OPEN80,
    OTHER,
    REMOTE,
    REMOTE6,
    SA,
    WORLD80,
    Case,
    E,
    I,
    icmp,
    icmp_error_truncated_inner,
    ip4_bytes,
    nd,
    raw_eth,
    tin,
    tout,
    truncated_l4_ipv4,
    uin,
    uout,
)

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

]
