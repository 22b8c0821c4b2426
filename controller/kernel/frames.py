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


# Offsets in an Ethernet + IPv4 (no options) + TCP frame, as frame() builds one
_IP4_SUM, _IP4_SRC, _TCP_SPORT, _TCP_SUM = 24, 26, 34, 50


def _sum_patched(csum: int, old: bytes, new: bytes) -> int:
    """An Internet checksum after 16-bit-aligned bytes ``old`` became ``new``
    (RFC 1624: HC' = ~(~HC + ~m + m'))."""
    x = ~csum & 0xFFFF
    for i in range(0, len(old), 2):
        x += (~int.from_bytes(old[i:i + 2], "big") & 0xFFFF) + int.from_bytes(new[i:i + 2], "big")
    while x >> 16:
        x = (x & 0xFFFF) + (x >> 16)
    return ~x & 0xFFFF


def tcp4_variant(base: bytes, src: bytes = b"", sport: int = -1) -> bytes:
    """``base`` (an IPv4 TCP frame of frame()) with another source address
    and/or port, both checksums kept right: many distinct frames at the
    cost of a byte patch each instead of a scapy build each."""
    buf = bytearray(base)
    for at, new, sums in ((_IP4_SRC, src, (_IP4_SUM, _TCP_SUM)),
                          (_TCP_SPORT, sport.to_bytes(2, "big") if sport >= 0 else b"",
                           (_TCP_SUM,))):
        if not new:
            continue
        old = bytes(buf[at:at + len(new)])
        buf[at:at + len(new)] = new
        for s in sums:
            buf[s:s + 2] = _sum_patched(int.from_bytes(buf[s:s + 2], "big"), old,
                                        new).to_bytes(2, "big")
    return bytes(buf)
