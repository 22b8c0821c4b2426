"""Frames and the fixture-table shapes of the kernel tests: {description,
packets, expected verdicts} (tables/ holds one file per feature)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from scapy.layers.inet import IP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from controller.abi.reasons import Reason as R
from controller.kernel.frames import DST_MAC, SRC_MAC, l3
from controller.policy.evaluator import ARP as ARP_PROTO
from controller.policy.evaluator import TCP_ACK, TCP_SYN, addr
from controller.policy.evaluator import Packet as P

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
