"""The reference evaluator: the AWS security-group semantics, written to be read.

This is the oracle of the differential tests and the engine of ``explain``.
It works on abstract, well-formed packets (``Packet``); malformed frames are
the datapath's business and are covered by fixture tables.

Where the contract leaves a choice, the choice is made here and the datapath
follows it:
- a UDP flow becomes a *stream* at the reply of its second transaction
  (request, reply, request, reply);
- an ICMP reply never opens a connection; ICMP other than queries and
  their replies is judged per packet, untracked;
- a TCP entry whose first packet was not a SYN starts half-open all the same;
- an ICMP error is never tracked itself; when it relates to no connection
  (or is inconsistent with it) it is judged by the ICMP rules like any
  other ICMP packet;
- infrastructure services and the DHCP client's requests open connections
  (marked exempt) so that exactly their replies come back;
- with the source/destination check on, an unspecified source is accepted
  only for DHCP discovery (UDP 68->67) and IPv6 DAD (NS, MLDv2 report);
- a non-first fragment is allowed if the first fragment of the same datagram
  (addresses, protocol, IP id) was allowed in the last FRAG_TIMEOUT seconds
  and no newer datagram of the interface took its entry (abi.frag_hash);
- the conntrack table counts every entry until it is collected, expired or
  not (the kernel map does); an expired entry is reused by its own key.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Tuple

from controller.abi import (
    CT_CLOSING,
    CT_ESTABLISHED,
    CT_NEW,
    CT_STREAM,
    FRAG_TIMEOUT,
    ct_ring_slots,
    frag_hash,
)
from controller.abi.reasons import Reason
from controller.policy.model import (
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
# query/reply pairs (1.4): request type -> reply type
ICMP4_QUERIES = {8: 0, 13: 14, 15: 16, 17: 18}
ICMP6_QUERIES = {128: 129}
ND_TYPES = frozenset(range(133, 138))
ND_RS, ND_RA, ND_NS, ND_NA, ND_REDIRECT, MLD2_REPORT = 133, 134, 135, 136, 137, 143
ND_HOP_LIMIT = 255
DHCP_PORTS = {4: (67, 68), 6: (547, 546)}  # (server, client)
DHCP_GROUP = {4: ipaddress.ip_address("255.255.255.255"), 6: ipaddress.ip_address("ff02::1:2")}
SRC_MAC = "02:00:00:00:00:01"  # the Ethernet source of a Packet unless it says otherwise
ARP = 0x806  # Packet.proto of an ARP frame (IPv4 over Ethernet): src/dst = sender/target
LINK_LOCAL6 = ipaddress.ip_network("fe80::/10")
MCAST_LINK6 = ipaddress.ip_network("ff02::/16")

# conntrack entry states (bpf/lib/conntrack.h)


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
    hop_limit: int = 64  # IPv6 hop limit (IPv4 TTL)
    nd_target: Optional[IPAddress] = None  # NS/NA target
    l2_multicast: bool = False  # Ethernet destination is broadcast/multicast
    src_mac: str = SRC_MAC  # Ethernet source (and an ARP packet's sender hardware address)

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
    def query_request(self) -> int:
        """The request type of the ICMP query/reply pair this is part of, or 0."""
        queries = (ICMP4_QUERIES if self.proto == PROTO_ICMP else
                   ICMP6_QUERIES if self.proto == PROTO_ICMPV6 else {})
        for req, rep in queries.items():
            if self.icmp_type in (req, rep):
                return req
        return 0

    @property
    def trackable(self) -> bool:
        """Can it belong to a connection? ICMP: queries and their replies only."""
        return not self.is_icmp or self.query_request != 0

    @property
    def opens(self) -> bool:
        """Can it open one? Not an ICMP reply (nor an error, nor another type)."""
        return not self.is_icmp or (self.query_request != 0
                                    and self.query_request == self.icmp_type)

    @property
    def is_arp(self) -> bool:
        return self.proto == ARP

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


# the evaluator's connection key: (interface, family, protocol, local, remote,
# local port, remote port) -- its model of sg_ct_key, not the kernel's struct
TrackKey = Tuple[str, int, int, IPAddress, IPAddress, int, int]


@dataclass
class Tracked:
    """A connection the evaluator tracks (its model of sg_ct_entry)."""

    origin: str  # direction of the first packet
    state: int
    last_seen: int
    fin: int = 0  # TCP: bit 0 FIN from origin side, bit 1 from reply side; UDP: UDP_ASKED
    exempt: bool = False  # opened by exempt traffic (never revalidated)
    dhcp: bool = False  # the DHCP client's pseudo-connection (answers only look it up)
    icmp_type: int = 0  # ICMP: what opened it
    icmp_code: int = 0
    replied: bool = False  # TCP: the reply side answered; the origin's next packet establishes
    slot: int = 0  # 1 + its slot in its interface's half-open ring while new (0: none)


UDP_ASKED = 0x1  # Tracked.fin of UDP: the origin spoke again after the reply
DIR_NUMBER = {INGRESS: 0, EGRESS: 1}  # abi.DIR_*


def local_remote(pkt: Packet, direction: str) -> Tuple[IPAddress, IPAddress, int, int]:
    """(local addr, remote addr, local port, remote port) of a packet on an interface."""
    if direction == INGRESS:
        return pkt.dst, pkt.src, pkt.dport, pkt.sport
    return pkt.src, pkt.dst, pkt.sport, pkt.dport


def ct_key(eni_id: str, pkt: Packet, direction: str) -> TrackKey:
    """TCP/UDP: 5-tuple; ICMP query/reply: addresses + id + (request type,
    the side that asked); anything else: addresses + protocol."""
    local, remote, lport, rport = local_remote(pkt, direction)
    if pkt.proto in (PROTO_TCP, PROTO_UDP):
        return (eni_id, pkt.family, pkt.proto, local, remote, lport, rport)
    if pkt.is_icmp:
        req = pkt.query_request
        asker = direction if pkt.icmp_type == req else reverse(direction)
        return (eni_id, pkt.family, pkt.proto, local, remote, pkt.ident,
                req | DIR_NUMBER[asker] << 8)
    return (eni_id, pkt.family, pkt.proto, local, remote, 0, 0)


def dhcp_key(eni_id: str, family: int) -> TrackKey:
    """The DHCP client's pseudo-connection: refreshed by its requests, it
    lets the answers in whatever server address they come from."""
    server, client = DHCP_PORTS[family]
    zero = ipaddress.ip_address(0 if family == 4 else "::")
    return (eni_id, family, PROTO_UDP, zero, zero, client, server)


class Evaluator:
    """Holds a State and the conntrack table; ``packet()`` decides one packet."""

    def __init__(self, state: State, clock: Callable[[], int] = lambda: 0,
                 ct_max: int = 1 << 20) -> None:
        self.state = state
        self.clock = clock
        self.ct_max = ct_max
        self.ct: Dict[TrackKey, Tracked] = {}
        # its model of sg_frags: (interface, entry of its region) -> (datagram, time)
        self.frags: Dict[Tuple[str, int], Tuple[tuple, int]] = {}
        # each interface's half-open ring (bpf/lib/types.h, sg_ct_quota):
        # slot -> key, slots taken, connections evicted
        self.rings: Dict[str, Dict[int, TrackKey]] = {}
        self.taken: Dict[str, int] = {}
        self.evicted: Dict[str, int] = {}

    def set_state(self, state: State) -> None:
        """A policy change: conntrack survives (1.4), except on interfaces with
        ``revalidate``, where connections the new policy would not let open
        are cut, and connections on a local address a source-checked
        interface does not have (any more) are cut."""
        self.state = state
        for key, entry in list(self.ct.items()):
            eni = state.interfaces.get(key[0])
            if eni is None:
                continue
            if eni.source_dest_check and not entry.dhcp and key[3] not in eni.own_addresses():
                del self.ct[key]  # an address it lost, or opened while the check was off
            elif (eni.revalidate and not entry.exempt and not self.would_open(
                    key, entry.origin, entry.icmp_type, entry.icmp_code)):
                del self.ct[key]

    def would_open(self, key: TrackKey, origin: str, icmp_type: int = 0, icmp_code: int = 0) -> bool:
        """Would the current policy let the connection of ``key`` open now?
        Its first packet is rebuilt from the key and, for ICMP, the type and
        code that opened it."""
        eni_id, family, proto, local, remote, lport, rport = key
        eni = self.state.interfaces.get(eni_id)
        if eni is None:
            return False
        src, dst = (remote, local) if origin == INGRESS else (local, remote)
        sport, dport = (rport, lport) if origin == INGRESS else (lport, rport)
        if proto in (PROTO_TCP, PROTO_UDP):
            pkt = Packet(src, dst, proto, sport=sport, dport=dport)
        elif proto in (PROTO_ICMP, PROTO_ICMPV6):
            pkt = Packet(src, dst, proto, icmp_type=icmp_type, icmp_code=icmp_code, ident=lport)
        else:
            pkt = Packet(src, dst, proto)
        return (origin == EGRESS and self.service(pkt.dst)) or bool(
            self.matching_rules(eni, origin, pkt))

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

    def timeout(self, eni: NetworkInterface, proto: int, entry: Tracked) -> int:
        return eni.timeouts.of(proto, entry.state)

    def live_entry(self, eni: NetworkInterface, key: TrackKey) -> Optional[Tracked]:
        entry = self.ct.get(key)
        if entry is None or self.clock() - entry.last_seen > self.timeout(eni, key[2], entry):
            return None
        return entry

    def ct_update(self, entry: Tracked, direction: str, pkt: Packet) -> None:
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
                elif entry.state == CT_NEW and reply:
                    entry.replied = True
                elif entry.state == CT_NEW and entry.replied:
                    entry.state = CT_ESTABLISHED  # the handshake's ACK
        elif reply and entry.state == CT_NEW:
            entry.state = CT_ESTABLISHED
        elif entry.state == CT_ESTABLISHED and pkt.proto == PROTO_UDP:
            # a stream: more than one request-response transaction
            if not reply:
                entry.fin |= UDP_ASKED
            elif entry.fin & UDP_ASKED:
                entry.state = CT_STREAM
        entry.last_seen = self.clock()

    # ---------------------------------------------------------------- verdict

    # ---------------------------------------------------------------- addresses (1.6)

    def address_check(self, eni: NetworkInterface, direction: str, pkt: Packet) -> Optional[Reason]:
        """SourceDestCheck: None, or why the packet is dropped."""
        if not eni.source_dest_check:
            return None
        own = eni.own_addresses()
        if pkt.is_arp:
            if direction == INGRESS or int(pkt.src) == 0 or pkt.src in own:
                return None
            return Reason.DROP_NEIGH_SPOOF
        if direction == INGRESS:
            if pkt.dst in own or pkt.dst.is_multicast or (pkt.family == 4 and (
                    int(pkt.dst) == 0xFFFFFFFF or pkt.l2_multicast)):
                return None
            return Reason.DROP_DST_FOREIGN
        if pkt.src not in own and not (int(pkt.src) == 0 and self.unspecified_ok(pkt)):
            return Reason.DROP_SRC_SPOOF
        if pkt.proto == PROTO_ICMPV6 and pkt.family == 6 and pkt.frag_id is None:
            if pkt.icmp_type in (ND_RA, ND_REDIRECT):
                return Reason.DROP_ND_ROUTER
            if pkt.icmp_type == ND_NA and pkt.nd_target not in own:
                return Reason.DROP_NEIGH_SPOOF
        return None

    @staticmethod
    def unspecified_ok(pkt: Packet) -> bool:
        """DHCP discovery and IPv6 duplicate address detection start from 0.0.0.0 / ::."""
        if pkt.frag_id is not None:
            return False
        if pkt.family == 4:
            return pkt.proto == PROTO_UDP and (pkt.sport, pkt.dport) == (68, 67)
        return pkt.proto == PROTO_ICMPV6 and pkt.icmp_type in (ND_NS, MLD2_REPORT)

    # ---------------------------------------------------------------- exemptions (1.3)

    @staticmethod
    def nd_exempt(eni: NetworkInterface, pkt: Packet) -> bool:
        """IPv6 neighbour discovery on the link: hop limit 255, code 0, router
        messages from link-local, to link-local / link-scope multicast / one
        of the interface's /64s."""
        if (pkt.family != 6 or pkt.proto != PROTO_ICMPV6 or pkt.icmp_type not in ND_TYPES
                or pkt.icmp_code != 0 or pkt.frag_id is not None
                or pkt.hop_limit != ND_HOP_LIMIT):
            return False
        if pkt.icmp_type in (ND_RA, ND_REDIRECT) and pkt.src not in LINK_LOCAL6:
            return False
        return (pkt.dst in LINK_LOCAL6 or pkt.dst in MCAST_LINK6
                or any(pkt.dst in n for n in eni.onlink64()))

    def service(self, addr: IPAddress) -> bool:
        """An infrastructure service address (exempt as a destination)."""
        return any(addr.version == n.version and addr in n for n in self.state.settings.exempt)

    def dhcp_server(self, addr: IPAddress) -> bool:
        return any(addr.version == n.version and addr in n
                   for n in self.state.settings.dhcp_servers)

    def dhcp_kind(self, direction: str, pkt: Packet) -> str:
        """"request" (the client asks), "reply" (an answer it may take) or ""."""
        if not self.state.settings.exempt_dhcp or pkt.proto != PROTO_UDP or pkt.frag_id is not None:
            return ""
        server, client = DHCP_PORTS[pkt.family]
        if direction == EGRESS:
            if (pkt.sport, pkt.dport) == (client, server) and (
                    pkt.dst == DHCP_GROUP[pkt.family] or self.dhcp_server(pkt.dst)):
                return "request"
            return ""
        if (pkt.sport, pkt.dport) != (server, client):
            return ""
        if self.state.settings.dhcp_servers and not self.dhcp_server(pkt.src):
            return ""
        return "reply"

    def related(self, eni: NetworkInterface, direction: str, pkt: Packet) -> bool:
        """1.3 step 2 with 1.4's consistency: the error goes to the embedded
        packet's source, and leaving a source-checked instance comes from its
        destination; the embedded packet belongs to a live connection."""
        inner = pkt.embedded
        assert inner is not None
        if pkt.dst != inner.src:
            return False
        if direction == EGRESS and eni.source_dest_check and pkt.src != inner.dst:
            return False
        return self.live_entry(eni, ct_key(eni.eni_id, inner, reverse(direction))) is not None

    # ---------------------------------------------------------------- verdict

    def packet(self, eni_id: str, direction: str, pkt: Packet) -> Verdict:
        eni = self.state.interfaces.get(eni_id)
        if eni is None:
            return Verdict(Reason.PASS_UNBOUND)
        if pkt.proto == PROTO_TCP and not tcp_flags_valid(pkt.tcp_flags):
            return Verdict(Reason.DROP_TCP_FLAGS)
        if pkt.is_icmp_error and pkt.embedded is None and pkt.frag_offset == 0:
            return Verdict(Reason.DROP_ICMP_EMBEDDED)  # an error must carry the header it is about
        if (direction == EGRESS and eni.source_dest_check and eni.mac_address is not None
                and pkt.src_mac != eni.mac_address):  # every frame, connection or not
            return Verdict(Reason.DROP_NEIGH_SPOOF if pkt.is_arp else Reason.DROP_SRC_SPOOF)
        if pkt.is_arp:  # never filtered by the rules; only its claim is checked
            return Verdict(self.address_check(eni, direction, pkt) or Reason.ALLOW_EXEMPT)
        frag_key: tuple = ()
        slot = None
        if pkt.frag_id is not None:
            frag_key = (pkt.family, pkt.proto, pkt.src, pkt.dst, pkt.frag_id)
            slot = (eni_id, frag_hash(pkt.proto, pkt.frag_id, pkt.src.packed.ljust(16, b"\0"),
                                      pkt.dst.packed.ljust(16, b"\0")))
            if pkt.frag_offset != 0:
                held = self.frags.get(slot)
                if held is not None and held[0] == frag_key and \
                        self.clock() - held[1] <= FRAG_TIMEOUT:
                    return Verdict(Reason.ALLOW_FRAGMENT)
                return Verdict(self.address_check(eni, direction, pkt)
                               or Reason.DROP_FRAG_UNKNOWN)
        verdict = self._decide(eni, direction, pkt)
        if slot is not None and verdict.allowed:
            self.frags[slot] = (frag_key, self.clock())  # a newer datagram replaces an older
        return verdict

    def _open(self, key: TrackKey, direction: str, pkt: Packet, exempt: bool,
              dhcp: bool = False) -> bool:
        """Start tracking (False: the interface holds its limit of
        connections, or the table is full). The connection first takes the
        next slot of its interface's half-open ring, deleting the slot's
        connection if that is still half-open."""
        slot = self._claim_slot(key)
        if key not in self.ct and sum(k[0] == key[0] for k in self.ct) >= self.limit():
            return False
        if key not in self.ct and len(self.ct) >= self.ct_max:
            return False
        entry = Tracked(origin=direction, state=CT_NEW, last_seen=self.clock(), exempt=exempt,
                        dhcp=dhcp, slot=slot)
        if pkt.is_icmp:
            entry.icmp_type, entry.icmp_code = pkt.icmp_type, pkt.icmp_code
        self.ct[key] = entry
        self.ct_update(entry, direction, pkt)
        return True

    def limit(self) -> int:
        """Connections each interface may hold in all (as plan gives it)."""
        return self.state.settings.connection_limit(self.ct_max,
                                                    len(self.state.bound_interfaces()))

    def allowance(self) -> int:
        """Half-open connections each interface may hold (as plan.rings gives them)."""
        return self.state.settings.half_open_allowance(ct_ring_slots(self.ct_max),
                                                       len(self.state.bound_interfaces()))

    def _claim_slot(self, key: TrackKey) -> int:
        size = self.allowance()
        if not size:
            return 0
        eni_id = key[0]
        taken = self.taken.get(eni_id, 0)
        self.taken[eni_id] = taken + 1
        slot = taken % size
        ring = self.rings.setdefault(eni_id, {})
        held = ring.get(slot)
        old = self.ct.get(held) if held is not None else None
        if held is not None and old is not None and old.slot == slot + 1 and old.state == CT_NEW:
            del self.ct[held]
            self.evicted[eni_id] = self.evicted.get(eni_id, 0) + 1
        ring[slot] = key
        return slot + 1

    def _decide(self, eni: NetworkInterface, direction: str, pkt: Packet) -> Verdict:
        # 1. a tracked connection of this interface, either direction
        # (its addresses passed the source/destination check when it opened)
        key = ct_key(eni.eni_id, pkt, direction)
        entry = None if pkt.is_icmp_error or not pkt.trackable else self.live_entry(eni, key)
        fresh_syn = (entry is not None and pkt.proto == PROTO_TCP and entry.state == CT_CLOSING
                     and pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN)
        if entry is not None and not fresh_syn and not entry.dhcp:
            self.ct_update(entry, direction, pkt)
            return Verdict(Reason.ALLOW_ESTABLISHED, tracked=True)
        # SourceDestCheck: nothing new from or to an address not the interface's
        bad = self.address_check(eni, direction, pkt)
        if bad is not None:
            return Verdict(bad)
        # 2. an ICMP error about a tracked connection
        if pkt.is_icmp_error and self.related(eni, direction, pkt):
            return Verdict(Reason.ALLOW_RELATED, tracked=True)
        # exemptions nobody can borrow (after conntrack, which is cheaper for
        # established flows)
        if self.nd_exempt(eni, pkt):
            return Verdict(Reason.ALLOW_EXEMPT)
        dhcp = self.dhcp_kind(direction, pkt)
        if dhcp == "request":
            ok = self._open(dhcp_key(eni.eni_id, pkt.family), direction, pkt, exempt=True,
                            dhcp=True)
            return Verdict(Reason.ALLOW_EXEMPT if ok else Reason.DROP_CT_FULL, tracked=ok)
        if dhcp == "reply" and self.live_entry(eni, dhcp_key(eni.eni_id, pkt.family)):
            return Verdict(Reason.ALLOW_EXEMPT)
        if direction == EGRESS and self.service(pkt.dst):
            if not pkt.opens:
                return Verdict(Reason.ALLOW_EXEMPT)
            ok = self._open(key, direction, pkt, exempt=True)
            return Verdict(Reason.ALLOW_EXEMPT if ok else Reason.DROP_CT_FULL, tracked=ok)
        # 3. the rules
        rules = self.matching_rules(eni, direction, pkt)
        if not rules:
            return Verdict(Reason.DROP_NO_RULE)
        if not pkt.opens:  # ICMP errors, replies, other types: judged per packet
            return Verdict(Reason.ALLOW_UNTRACKED, rules, tracked=False)
        if self.untracked(eni, direction, pkt, rules):
            return Verdict(Reason.ALLOW_UNTRACKED, rules, tracked=False)
        if not self._open(key, direction, pkt, exempt=False):
            return Verdict(Reason.DROP_CT_FULL, rules)
        return Verdict(Reason.ALLOW_NEW, rules, tracked=True)


def addr(text: str) -> IPAddress:
    return ipaddress.ip_address(text)
