"""Exempt traffic: infrastructure services and DHCP, as clients and servers."""

from typing import List

from controller.abi.reasons import Reason as R
from controller.policy.evaluator import addr
from tests.kernel.packets import (
    BCAST4,
    DNS,
    LL,
    LL_PEER,
    LOCAL,
    LOCAL6,
    MAC,
    METADATA,
    OTHER6,
    REMOTE,
    REMOTE6,
    SERVER,
    SOLICITED,
    ZERO4,
    Case,
    E,
    I,
    icmp,
    nd,
    tin,
    uin,
    uout,
)

CASES: List[Case] = [
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
]
