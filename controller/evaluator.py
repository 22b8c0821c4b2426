"""The reference evaluator: DESIGN.md section 1, written to be read.

This is the oracle of the differential tests and the engine of ``explain``.
It works on abstract, well-formed packets (``Packet``); malformed frames are
the datapath's business and are covered by fixture tables.

Where the contract leaves a choice, the choice is made here and the datapath
follows it:
- a UDP flow becomes a *stream* when a packet is seen after the reply
  direction has been seen once ("seen both ways more than once");
- a TCP entry whose first packet was not a SYN starts half-open all the same;
- an ICMP error is never tracked itself; when it relates to no connection it
  is judged by the ICMP rules like any other ICMP packet;
- a non-first fragment is allowed if the first fragment of the same datagram
  (addresses, protocol, IP id) was allowed in the last FRAG_TIMEOUT seconds;
- the conntrack table counts every entry until it is collected, expired or
  not (the kernel map does); an expired entry is reused by its own key.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Tuple

from .model import (
    EGRESS,
    INGRESS,
    PROTO_ALL,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    IPAddress,
    NetworkInterface,
    Rule,
    State,
)
from .reasons import Reason

TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK, TCP_URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20

# Valid TCP flag combinations, PSH/ECE/CWR ignored (as Linux nf_conntrack).
TCP_VALID_FLAGS = frozenset({
    TCP_SYN, TCP_SYN | TCP_URG, TCP_SYN | TCP_ACK, TCP_RST, TCP_RST | TCP_ACK,
    TCP_FIN | TCP_ACK, TCP_FIN | TCP_ACK | TCP_URG, TCP_ACK, TCP_ACK | TCP_URG,
})

ICMP4_ERRORS = frozenset({3, 11, 12})  # dest-unreachable, time-exceeded, parameter-problem
ICMP6_ERRORS = frozenset({1, 2, 3, 4})  # + packet-too-big
ICMP4_ECHO = frozenset({8, 0})
ICMP6_ECHO = frozenset({128, 129})
ND_TYPES = frozenset(range(133, 138))
DHCP_PORTS = {4: (67, 68), 6: (547, 546)}  # (server, client)
FRAG_TIMEOUT = 30

# conntrack entry states (bpf/lib/conntrack.h)
CT_NEW, CT_ESTABLISHED, CT_STREAM, CT_CLOSING = 1, 2, 3, 4


def tcp_flags_valid(flags: int) -> bool:
    return (flags & 0x37) in TCP_VALID_FLAGS


def reverse(direction: str) -> str:
    return EGRESS if direction == INGRESS else INGRESS


@dataclass(frozen=True)
class Packet:
    """An IP packet as the rules see it. ``ident`` is the ICMP echo id."""

    src: IPAddress
    dst: IPAddress
    proto: int
    sport: int = 0
    dport: int = 0
    icmp_type: int = 0
    icmp_code: int = 0
    ident: int = 0
    tcp_flags: int = TCP_SYN
    embedded: Optional[Packet] = None  # the header inside an ICMP error
    frag_id: Optional[int] = None  # set for fragments
    frag_offset: int = 0
    more_fragments: bool = False

    @property
    def family(self) -> int:
        return self.src.version

    @property
    def is_icmp(self) -> bool:
        return self.proto in (PROTO_ICMP, PROTO_ICMPV6)

    @property
    def is_icmp_error(self) -> bool:
        if self.proto == PROTO_ICMP:
            return self.icmp_type in ICMP4_ERRORS
        return self.proto == PROTO_ICMPV6 and self.icmp_type in ICMP6_ERRORS

    @property
    def is_echo(self) -> bool:
        return (self.proto == PROTO_ICMP and self.icmp_type in ICMP4_ECHO) or (
            self.proto == PROTO_ICMPV6 and self.icmp_type in ICMP6_ECHO)

    @property
    def port_key(self) -> int:
        """What a rule's port range is compared with: destination port, or type<<8|code."""
        if self.proto in (PROTO_TCP, PROTO_UDP):
            return self.dport
        if self.is_icmp:
            return (self.icmp_type << 8) | self.icmp_code
        return 0

    def reversed(self) -> Packet:
        return replace(self, src=self.dst, dst=self.src, sport=self.dport, dport=self.sport)


@dataclass
class Verdict:
    reason: Reason
    rules: List[Rule] = field(default_factory=list)  # rules that allow it (step 3)
    tracked: bool = False

    @property
    def allowed(self) -> bool:
        return self.reason.allowed


CtKey = Tuple[str, int, int, IPAddress, IPAddress, int, int]


@dataclass
class CtEntry:
    origin: str  # direction of the first packet
    state: int
    last_seen: int
    fin: int = 0  # bit 0: FIN from origin side, bit 1: from reply side
    reply_seen: bool = False


def local_remote(pkt: Packet, direction: str) -> Tuple[IPAddress, IPAddress, int, int]:
    """(local addr, remote addr, local port, remote port) of a packet on an interface."""
    if direction == INGRESS:
        return pkt.dst, pkt.src, pkt.dport, pkt.sport
    return pkt.src, pkt.dst, pkt.sport, pkt.dport


def ct_key(eni_id: str, pkt: Packet, direction: str) -> CtKey:
    """TCP/UDP: 5-tuple; ICMP echo: addresses + id; anything else: addresses + protocol."""
    local, remote, lport, rport = local_remote(pkt, direction)
    if pkt.proto in (PROTO_TCP, PROTO_UDP):
        return (eni_id, pkt.family, pkt.proto, local, remote, lport, rport)
    if pkt.is_echo:
        return (eni_id, pkt.family, pkt.proto, local, remote, pkt.ident, 0)
    return (eni_id, pkt.family, pkt.proto, local, remote, 0, 0)


class Evaluator:
    """Holds a State and the conntrack table; ``packet()`` decides one packet."""

    def __init__(self, state: State, clock: Callable[[], int] = lambda: 0,
                 ct_max: int = 1 << 20) -> None:
        self.state = state
        self.clock = clock
        self.ct_max = ct_max
        self.ct: Dict[CtKey, CtEntry] = {}
        self.frags: Dict[tuple, int] = {}

    def set_state(self, state: State) -> None:
        """A policy change: conntrack survives (1.4), except on interfaces with
        ``revalidate``, where connections the new policy would not let open
        are cut."""
        self.state = state
        for key, entry in list(self.ct.items()):
            eni = state.interfaces.get(key[0])
            if eni is not None and eni.revalidate and not self.would_open(key, entry.origin):
                del self.ct[key]

    def would_open(self, key: CtKey, origin: str) -> bool:
        """Would the current policy let the connection of ``key`` open now?
        Its first packet is rebuilt from the key; an ICMP connection is
        judged as an echo request (the key does not hold the type)."""
        eni_id, family, proto, local, remote, lport, rport = key
        eni = self.state.interfaces.get(eni_id)
        if eni is None:
            return False
        src, dst = (remote, local) if origin == INGRESS else (local, remote)
        sport, dport = (rport, lport) if origin == INGRESS else (lport, rport)
        if proto in (PROTO_TCP, PROTO_UDP):
            pkt = Packet(src, dst, proto, sport=sport, dport=dport)
        elif proto in (PROTO_ICMP, PROTO_ICMPV6):
            pkt = Packet(src, dst, proto, icmp_type=8 if proto == PROTO_ICMP else 128, ident=lport)
        else:
            pkt = Packet(src, dst, proto)
        return self.exempt(origin, pkt) or bool(self.matching_rules(eni, origin, pkt))

    # ---------------------------------------------------------------- rules

    def remote_in_peer(self, rule: Rule, remote: IPAddress) -> bool:
        return any(remote.version == net.version and remote in net
                   for net in self.state.peer_networks(rule.peer))

    @staticmethod
    def rule_matches_l4(rule: Rule, pkt: Packet) -> bool:
        if rule.protocol != PROTO_ALL and rule.protocol != pkt.proto:
            return False
        if rule.protocol in (PROTO_TCP, PROTO_UDP):
            return rule.from_port <= pkt.dport <= rule.to_port
        if rule.protocol in (PROTO_ICMP, PROTO_ICMPV6):
            if rule.from_port != -1 and rule.from_port != pkt.icmp_type:
                return False
            return rule.to_port == -1 or rule.to_port == pkt.icmp_code
        return True

    def matching_rules(self, eni: NetworkInterface, direction: str, pkt: Packet) -> List[Rule]:
        _, remote, _, _ = local_remote(pkt, direction)
        return [r for r in self.state.rules_of(eni, direction)
                if self.rule_matches_l4(r, pkt) and self.remote_in_peer(r, remote)]

    def open_to_world(self, eni: NetworkInterface, direction: str, family: int, proto: int) -> bool:
        """Does ``direction`` have a 0.0.0.0/0 (::/0) rule for ``proto`` on all ports?"""
        for r in self.state.rules_of(eni, direction):
            if not r.peer.is_world() or r.peer.network.version != family:
                continue
            if r.protocol == PROTO_ALL:
                return True
            if r.protocol == proto and r.from_port == 0 and r.to_port == 65535:
                return True
        return False

    def untracked(self, eni: NetworkInterface, direction: str, pkt: Packet,
                  rules: List[Rule]) -> bool:
        """1.4: a TCP/UDP flow allowed by a world rule whose other direction is
        world-open on all ports is untracked -- seen from either end of the flow."""
        if pkt.proto not in (PROTO_TCP, PROTO_UDP):
            return False
        back = reverse(direction)
        if any(r.peer.is_world() for r in rules) and self.open_to_world(
                eni, back, pkt.family, pkt.proto):
            return True
        if self.open_to_world(eni, direction, pkt.family, pkt.proto):
            return any(r.peer.is_world()
                       for r in self.matching_rules(eni, back, pkt.reversed()))
        return False

    # ---------------------------------------------------------------- conntrack

    def timeout(self, eni: NetworkInterface, proto: int, entry: CtEntry) -> int:
        t = eni.timeouts
        if proto == PROTO_TCP:
            return {CT_NEW: t.tcp_syn, CT_CLOSING: t.tcp_closing}.get(entry.state,
                                                                     t.tcp_established)
        if proto == PROTO_UDP:
            return t.udp_stream if entry.state == CT_STREAM else t.udp_other
        if proto in (PROTO_ICMP, PROTO_ICMPV6):
            return t.icmp
        return t.other

    def live_entry(self, eni: NetworkInterface, key: CtKey) -> Optional[CtEntry]:
        entry = self.ct.get(key)
        if entry is None or self.clock() - entry.last_seen > self.timeout(eni, key[2], entry):
            return None
        return entry

    def ct_update(self, entry: CtEntry, direction: str, pkt: Packet) -> None:
        """State transitions for one packet of a tracked connection."""
        reply = direction != entry.origin
        if pkt.proto == PROTO_TCP:
            if pkt.tcp_flags & TCP_RST:
                entry.state = CT_CLOSING
            elif entry.state != CT_CLOSING:
                if pkt.tcp_flags & TCP_FIN:
                    entry.fin |= 2 if reply else 1
                if entry.fin == 3:
                    entry.state = CT_CLOSING
                elif reply and entry.state == CT_NEW:
                    entry.state = CT_ESTABLISHED
        elif reply and entry.state == CT_NEW:
            entry.state = CT_ESTABLISHED
        elif entry.state == CT_ESTABLISHED and pkt.proto == PROTO_UDP:
            entry.state = CT_STREAM
        entry.last_seen = self.clock()

    # ---------------------------------------------------------------- verdict

    def exempt(self, direction: str, pkt: Packet) -> bool:
        """Traffic security groups never filter (1.3)."""
        if pkt.proto == PROTO_ICMPV6 and pkt.icmp_type in ND_TYPES:
            return True
        settings = self.state.settings
        _, remote, lport, rport = local_remote(pkt, direction)
        if settings.exempt_dhcp and pkt.proto == PROTO_UDP:
            server, client = DHCP_PORTS[pkt.family]
            if {lport, rport} == {server, client}:
                return True
        if direction == EGRESS:
            return any(pkt.dst.version == n.version and pkt.dst in n for n in settings.exempt)
        return any(pkt.src.version == n.version and pkt.src in n for n in settings.exempt)

    def packet(self, eni_id: str, direction: str, pkt: Packet) -> Verdict:
        eni = self.state.interfaces.get(eni_id)
        if eni is None:
            return Verdict(Reason.PASS_UNBOUND)
        if pkt.proto == PROTO_TCP and not tcp_flags_valid(pkt.tcp_flags):
            return Verdict(Reason.DROP_TCP_FLAGS)
        if pkt.is_icmp_error and pkt.embedded is None and pkt.frag_offset == 0:
            return Verdict(Reason.DROP_ICMP_EMBEDDED)  # an error must carry the header it is about
        frag_key = None
        if pkt.frag_id is not None:
            frag_key = (eni_id, pkt.family, pkt.proto, pkt.src, pkt.dst, pkt.frag_id)
            if pkt.frag_offset != 0:
                seen = self.frags.get(frag_key)
                if seen is not None and self.clock() - seen <= FRAG_TIMEOUT:
                    return Verdict(Reason.ALLOW_FRAGMENT)
                return Verdict(Reason.DROP_FRAG_UNKNOWN)
        verdict = self._decide(eni, direction, pkt)
        if frag_key is not None and verdict.allowed:
            self.frags[frag_key] = self.clock()
        return verdict

    def _decide(self, eni: NetworkInterface, direction: str, pkt: Packet) -> Verdict:
        # 1. a tracked connection of this interface, either direction
        key = ct_key(eni.eni_id, pkt, direction)
        entry = None if pkt.is_icmp_error else self.live_entry(eni, key)
        fresh_syn = (entry is not None and pkt.proto == PROTO_TCP and entry.state == CT_CLOSING
                     and pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN)
        if entry is not None and not fresh_syn:
            self.ct_update(entry, direction, pkt)
            return Verdict(Reason.ALLOW_ESTABLISHED, tracked=True)
        # 2. an ICMP error about a tracked connection
        if pkt.is_icmp_error:
            assert pkt.embedded is not None
            inner_key = ct_key(eni.eni_id, pkt.embedded, reverse(direction))
            if self.live_entry(eni, inner_key) is not None:
                return Verdict(Reason.ALLOW_RELATED, tracked=True)
        # infrastructure traffic is never filtered (checked after conntrack, which is
        # cheaper for established flows; exempt traffic itself is never tracked)
        if self.exempt(direction, pkt):
            return Verdict(Reason.ALLOW_EXEMPT)
        # 3. the rules
        rules = self.matching_rules(eni, direction, pkt)
        if not rules:
            return Verdict(Reason.DROP_NO_RULE)
        if pkt.is_icmp_error:
            return Verdict(Reason.ALLOW_NEW, rules, tracked=False)
        if self.untracked(eni, direction, pkt, rules):
            return Verdict(Reason.ALLOW_UNTRACKED, rules, tracked=False)
        if key not in self.ct and len(self.ct) >= self.ct_max:
            return Verdict(Reason.DROP_CT_FULL, rules)
        entry = CtEntry(origin=direction, state=CT_NEW, last_seen=self.clock())
        self.ct[key] = entry
        self.ct_update(entry, direction, pkt)
        return Verdict(Reason.ALLOW_NEW, rules, tracked=True)


def addr(text: str) -> IPAddress:
    return ipaddress.ip_address(text)
