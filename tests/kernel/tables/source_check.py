"""SourceDestCheck: an instance sends only from its own addresses and MAC, ARP and ND included."""

from dataclasses import replace
from typing import List

from scapy.layers.l2 import ARP

from controller.abi.reasons import Reason as R
from controller.policy.evaluator import TCP_ACK, addr
from tests.kernel.packets import (
    BCAST4,
    LL,
    LOCAL,
    LOCAL6,
    MAC,
    OTHER,
    OTHER6,
    OTHER_MAC,
    REMOTE,
    REMOTE6,
    SOLICITED,
    ZERO4,
    ZERO6,
    Case,
    E,
    I,
    arp,
    icmp,
    nd,
    raw_eth,
    tin,
    tout,
    uin,
    uout,
)

CASES: List[Case] = [
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
]
