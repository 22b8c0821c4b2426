"""Malformed and unusual frames: every one dropped with its named reason, or parsed right."""

from typing import List

from scapy.layers.inet import UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from controller.abi.reasons import Reason as R
from controller.kernel.frames import DST_MAC, SRC_MAC
from tests.kernel.packets import (
    LL_PEER,
    LOCAL,
    LOCAL6,
    MAC,
    OPEN80,
    OTHER,
    REMOTE,
    REMOTE6,
    Case,
    E,
    I,
    icmp,
    nd,
    padded_l4_ipv4,
    padded_nd,
    tin,
    tout,
    uin,
)

CASES: List[Case] = [
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
