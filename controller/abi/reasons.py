"""Verdict reasons, shared with the datapath (bpf/lib/reasons.h).

The numbers are part of the kernel ABI (counter indexes); ``tests/test_abi.py``
checks this table against the C header so they never drift.
"""

from __future__ import annotations

import enum


class Reason(enum.IntEnum):
    # allowed
    ALLOW_ESTABLISHED = 0  # packet of a tracked connection
    ALLOW_RELATED = 1  # ICMP error about a tracked connection
    ALLOW_NEW = 2  # allowed by a rule, connection now tracked
    ALLOW_UNTRACKED = 3  # allowed by a rule, untracked flow (1.4)
    ALLOW_EXEMPT = 4  # ARP, neighbour discovery, DHCP client, infrastructure service
    ALLOW_FRAGMENT = 5  # later fragment of an allowed datagram
    PASS_UNBOUND = 6  # device is not bound to an interface
    # dropped
    DROP_NO_RULE = 16  # no rule of any group allows it
    DROP_L2_MALFORMED = 17  # truncated Ethernet or VLAN header
    DROP_VLAN_DEPTH = 18  # more VLAN tags than VLAN_MAX_DEPTH
    DROP_L3_UNSUPPORTED = 19  # neither IPv4, IPv6 nor ARP
    DROP_IPV4_MALFORMED = 20  # bad version/IHL/total length, truncated header
    DROP_IPV6_MALFORMED = 21  # truncated header or extension header
    DROP_EXTHDR_LIMIT = 22  # more extension headers than IPV6_EXT_MAX
    DROP_L4_TRUNCATED = 23  # TCP/UDP/ICMP header cut short
    DROP_TCP_FLAGS = 24  # illegal TCP flag combination
    DROP_FRAG_UNKNOWN = 25  # non-first fragment of a datagram never allowed
    DROP_ICMP_EMBEDDED = 26  # ICMP error whose embedded header is truncated
    DROP_CT_FULL = 27  # new connection but the conntrack table is full
    DROP_SRC_SPOOF = 28  # from the instance, source not its address (SourceDestCheck)
    DROP_DST_FOREIGN = 29  # to the instance, destination not its address (SourceDestCheck)
    DROP_NEIGH_SPOOF = 30  # ARP/ND from the instance claiming an address not its own
    DROP_ND_ROUTER = 31  # router advertisement or redirect from an instance

    @property
    def allowed(self) -> bool:
        return self.value < 16

    @property
    def label(self) -> str:
        return self.name.lower()


REASON_MAX = 32
