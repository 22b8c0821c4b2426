"""Abstract packets (evaluator.Packet) <-> Ethernet frames built with scapy."""

from __future__ import annotations

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    ICMPv6ParamProblem,
    ICMPv6TimeExceeded,
    ICMPv6Unknown,
    IPv6,
    IPv6ExtHdrFragment,
)
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet as ScapyPacket
from scapy.packet import Raw

from controller.policy.evaluator import ND_NA, ND_NS, Packet
from controller.policy.evaluator import SRC_MAC as SRC_MAC  # frames' default source, for the tests
from controller.policy.model import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP

DST_MAC = "02:00:00:00:00:02"
BROADCAST_MAC = "ff:ff:ff:ff:ff:ff"
_ICMP6 = {1: ICMPv6DestUnreach, 2: ICMPv6PacketTooBig, 3: ICMPv6TimeExceeded,
          4: ICMPv6ParamProblem, 128: ICMPv6EchoRequest, 129: ICMPv6EchoReply}


def l3(pkt: Packet) -> ScapyPacket:
    """The IP packet (no Ethernet)."""
    if pkt.family == 4:
        ip: ScapyPacket = IP(src=str(pkt.src), dst=str(pkt.dst), proto=pkt.proto,
                             ttl=pkt.hop_limit)
        if pkt.frag_id is not None:
            ip.id = pkt.frag_id
            ip.frag = pkt.frag_offset // 8
            ip.flags = "MF" if pkt.more_fragments else 0
    else:
        if pkt.frag_id is None:
            ip = IPv6(src=str(pkt.src), dst=str(pkt.dst), nh=pkt.proto, hlim=pkt.hop_limit)
        else:
            frag = IPv6ExtHdrFragment(id=pkt.frag_id, offset=pkt.frag_offset // 8,
                                      m=int(pkt.more_fragments), nh=pkt.proto)
            ip = IPv6(src=str(pkt.src), dst=str(pkt.dst), hlim=pkt.hop_limit) / frag
    if pkt.frag_id is not None and pkt.frag_offset:
        return ip / Raw(b"\0" * 16)
    if pkt.proto == PROTO_TCP:
        return ip / TCP(sport=pkt.sport, dport=pkt.dport, flags=pkt.tcp_flags)
    if pkt.proto == PROTO_UDP:
        return ip / UDP(sport=pkt.sport, dport=pkt.dport) / Raw(b"x" * 8)
    if pkt.proto == PROTO_ICMP:
        icmp = ICMP(type=pkt.icmp_type, code=pkt.icmp_code)
        if pkt.query_request:
            icmp.id = pkt.ident
        body = l3(pkt.embedded) if pkt.embedded is not None else Raw(b"\0" * 8)
        return ip / icmp / body
    if pkt.proto == PROTO_ICMPV6 and pkt.family == 4:  # not ICMPv6 at all: just its bytes
        return ip / Raw(bytes([pkt.icmp_type, pkt.icmp_code]) + b"\0" * 6)
    if pkt.proto == PROTO_ICMPV6:
        cls = _ICMP6.get(pkt.icmp_type)
        if pkt.icmp_type in (ND_NS, ND_NA) and pkt.nd_target is not None:
            icmp6: ScapyPacket = ICMPv6Unknown(type=pkt.icmp_type, code=pkt.icmp_code,
                                               msgbody=b"\0" * 4 + pkt.nd_target.packed)
        elif cls is None:
            icmp6 = ICMPv6Unknown(type=pkt.icmp_type, code=pkt.icmp_code, msgbody=b"\0" * 4)
        else:
            icmp6 = cls(code=pkt.icmp_code)
            if pkt.is_echo:
                icmp6.id = pkt.ident
        body = l3(pkt.embedded) if pkt.embedded is not None else Raw(b"")
        return ip / icmp6 / body
    return ip / Raw(b"\0" * 8)


def frame(pkt: Packet) -> bytes:
    dst = BROADCAST_MAC if pkt.l2_multicast else DST_MAC
    if pkt.is_arp:  # an ARP reply: sender pkt.src, target pkt.dst
        return bytes(Ether(src=pkt.src_mac, dst=dst) / ARP(
            op=2, hwsrc=pkt.src_mac, psrc=str(pkt.src), hwdst=DST_MAC, pdst=str(pkt.dst)))
    return bytes(Ether(src=pkt.src_mac, dst=dst) / l3(pkt))
