"""Validated security-group objects.

Everything here is pure Python. Every error names the object and the field
that is wrong: ``ValidationError("sg-123 ingress[2]", "FromPort", "...")``.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import ipaddress
import operator
import re
import weakref
from dataclasses import dataclass, field, replace
from typing import Dict, Iterable, List, Optional, Tuple, Union

from controller.abi import CT_CLOSING, CT_NEW, CT_STREAM
from controller.policy.errors import ValidationError
from controller.policy.vocabulary import TAG_DEVICE, TAG_MODE, TAG_NODE

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

INGRESS = "ingress"
EGRESS = "egress"
DIRECTIONS = (INGRESS, EGRESS)

PROTO_ALL = -1
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58

PROTOCOL_NAMES = {
    "all": PROTO_ALL,
    "-1": PROTO_ALL,
    "icmp": PROTO_ICMP,
    "tcp": PROTO_TCP,
    "udp": PROTO_UDP,
    "icmpv6": PROTO_ICMPV6,
    "ipv6-icmp": PROTO_ICMPV6,
}
PROTOCOL_LABELS = {PROTO_ALL: "all", PROTO_ICMP: "icmp", PROTO_TCP: "tcp",
                   PROTO_UDP: "udp", PROTO_ICMPV6: "icmpv6"}

MODE_WORKLOAD = "workload"
MODE_HOST = "host"
MODES = (MODE_WORKLOAD, MODE_HOST)

DEFAULT_GROUP_NAME = "default"
DEFAULT_GROUP_ID = "sg-default"

WORLD4 = ipaddress.ip_network("0.0.0.0/0")
WORLD6 = ipaddress.ip_network("::/0")

# whole-string matches (\A...\Z): "$" would also accept a trailing newline
_ID_RE = {kind: re.compile(rf"\A{kind}-[A-Za-z0-9][A-Za-z0-9-]{{0,62}}\Z")
          for kind in ("sg", "sgr", "pl", "eni")}
_DEV_RE = re.compile(r"\A[A-Za-z0-9_.:@-]{1,15}\Z")
_NODE_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")  # a host name
# what EC2 accepts in a group's or a rule's description (AWS formats and the API)
_AWS_TEXT_RE = re.compile(r"\A[A-Za-z0-9 ._\-:/()#,@\[\]+=&;{}!$*]*\Z")
_MAC_RE = re.compile(r"\A[0-9a-f]{2}(:[0-9a-f]{2}){5}\Z")


def mac_bytes(mac: str) -> bytes:
    """A canonical MAC (``parse_mac``) as its 6 bytes."""
    return bytes.fromhex(mac.replace(":", ""))


def parse_mac(value: object, obj: str, fieldname: str = "MacAddress") -> str:
    """``02:AA:...`` -> ``02:aa:...``; a unicast Ethernet address."""
    text = value.strip().lower().replace("-", ":") if isinstance(value, str) else None
    if text is None or not _MAC_RE.match(text):
        raise ValidationError(obj, fieldname, f"{value!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    if int(text[:2], 16) & 1:
        raise ValidationError(obj, fieldname, f"{text} is a multicast address")
    return text


def check_id(kind: str, value: object, obj: str, fieldname: str) -> str:
    if not isinstance(value, str) or not _ID_RE[kind].match(value):
        raise ValidationError(obj, fieldname, f"{value!r} is not a valid {kind}- id")
    return value


def parse_protocol(value: object, obj: str, fieldname: str = "IpProtocol") -> int:
    """``tcp``/``6``/``"6"`` -> 6, ``-1``/``all`` -> -1; anything else is an error."""
    if isinstance(value, bool):
        raise ValidationError(obj, fieldname, f"{value!r} is not a protocol")
    if isinstance(value, int):
        num = value
    elif isinstance(value, str):
        key = value.strip().lower()
        if key in PROTOCOL_NAMES:
            return PROTOCOL_NAMES[key]
        if not re.fullmatch(r"-?\d{1,4}", key):
            raise ValidationError(obj, fieldname, f"unknown protocol name {value!r}")
        num = int(key)
    else:
        raise ValidationError(obj, fieldname, f"{value!r} is not a protocol")
    if num == PROTO_ALL or 0 <= num <= 255:
        return num
    raise ValidationError(obj, fieldname, f"protocol number {num} is outside 0-255 (or -1)")


def protocol_label(proto: int) -> str:
    return PROTOCOL_LABELS.get(proto, str(proto))


def check_aws_text(value: str, obj: str, fieldname: str) -> str:
    """EC2's character set for descriptions (a-z A-Z 0-9 space ._-:/()#,@[]+=&;{}!$*)."""
    if not _AWS_TEXT_RE.match(value):
        bad = sorted({c for c in value if not _AWS_TEXT_RE.match(c)})
        raise ValidationError(obj, fieldname, f"characters EC2 does not accept: {bad!r}")
    return value


def parse_cidr(value: object, obj: str, fieldname: str, family: Optional[int] = None,
               strict: bool = False) -> IPNetwork:
    """Canonical network: ``10.1.2.3/16`` -> ``10.1.0.0/16``. ``strict`` (the
    AWS formats) requires the prefix length, as EC2 does."""
    if not isinstance(value, str):
        raise ValidationError(obj, fieldname, f"{value!r} is not a CIDR")
    if "%" in value:
        raise ValidationError(obj, fieldname, f"{value!r}: a zone index (%) is not an address")
    if strict and "/" not in value:
        raise ValidationError(obj, fieldname, f"{value!r} has no prefix length (/32, /128...)")
    try:
        net = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError as exc:
        raise ValidationError(obj, fieldname, f"bad CIDR {value!r}: {exc}") from None
    if family is not None and net.version != family:
        raise ValidationError(obj, fieldname, f"{value!r} is not an IPv{family} CIDR")
    return net


def parse_address(value: object, obj: str, fieldname: str, family: Optional[int] = None) -> IPAddress:
    if not isinstance(value, str):
        raise ValidationError(obj, fieldname, f"{value!r} is not an IP address")
    if "%" in value:
        raise ValidationError(obj, fieldname, f"{value!r}: a zone index (%) is not an address")
    try:
        addr = ipaddress.ip_address(value.strip())
    except ValueError:
        raise ValidationError(obj, fieldname, f"bad IP address {value!r}") from None
    if family is not None and addr.version != family:
        raise ValidationError(obj, fieldname, f"{value!r} is not an IPv{family} address")
    return addr


def parse_bool(value: object, obj: str, fieldname: str, strings: bool = False) -> bool:
    """A boolean is true or false. ``strings``: also "true"/"false", where
    AWS accepts them (CloudFormation properties)."""
    if isinstance(value, bool):
        return value
    if strings and isinstance(value, str) and value in ("true", "false"):
        return value == "true"
    raise ValidationError(obj, fieldname, f"{value!r} is not true or false")


def parse_int(value: object, obj: str, fieldname: str) -> int:
    if isinstance(value, bool):
        raise ValidationError(obj, fieldname, f"{value!r} is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d{1,10}", value.strip()):
        return int(value)
    raise ValidationError(obj, fieldname, f"{value!r} is not an integer")


# --------------------------------------------------------------------------- peers


@functools.lru_cache(maxsize=1 << 18)
def _parse_network(text: str) -> IPNetwork:
    """Canonical CIDR text -> network (parsed once: compiles are hot)."""
    return ipaddress.ip_network(text)


@dataclass(frozen=True, order=True)
class Peer:
    """Exactly one of: a CIDR, a managed prefix list, a security group."""

    kind: str  # "cidr" | "pl" | "sg"
    value: str  # canonical CIDR text, pl- id or sg- id

    @staticmethod
    def cidr(net: IPNetwork) -> Peer:
        return Peer("cidr", str(net))

    @property
    def network(self) -> IPNetwork:
        assert self.kind == "cidr"
        return _parse_network(self.value)

    def is_world(self) -> bool:
        """True for the literal peers 0.0.0.0/0 and ::/0 (untracked eligibility, 1.4)."""
        return self.kind == "cidr" and self.value in ("0.0.0.0/0", "::/0")

    def __str__(self) -> str:
        return self.value


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """One allow rule with one peer. Ports are canonical (see ``make_rule``)."""

    group_id: str
    direction: str
    protocol: int
    from_port: int
    to_port: int
    peer: Peer
    description: str = ""
    rule_id: str = ""
    tags: Tuple[Tuple[str, str], ...] = ()  # (key, value) sorted: a rule stays hashable

    def identity(self) -> Tuple[str, str, int, int, int, str, str]:
        """What makes two rules duplicates (1.1). Plain strings and ints, so
        hashing it stays in C (it keys dicts of every rule on each change)."""
        return (self.group_id, self.direction, self.protocol, self.from_port, self.to_port,
                self.peer.kind, self.peer.value)

    @property
    def has_ports(self) -> bool:
        return self.protocol in (PROTO_TCP, PROTO_UDP)

    @property
    def has_type_code(self) -> bool:
        return self.protocol in (PROTO_ICMP, PROTO_ICMPV6)

    def describe_ports(self) -> str:
        if self.has_ports:
            return (str(self.from_port) if self.from_port == self.to_port
                    else f"{self.from_port}-{self.to_port}")
        if self.has_type_code:
            if self.from_port == -1:
                return "all"
            return f"type {self.from_port}" + ("" if self.to_port == -1 else f" code {self.to_port}")
        return "all"


def rule_id_for(group_id: str, direction: str, protocol: int, from_port: int, to_port: int,
                peer: Peer) -> str:
    digest = hashlib.sha256(
        f"{group_id}|{direction}|{protocol}|{from_port}|{to_port}|{peer.kind}|{peer.value}".encode()
    ).hexdigest()
    return "sgr-" + digest[:17]


def make_rule(group_id: str, direction: str, protocol: object, from_port: object,
              to_port: object, peer: Peer, description: object = "", rule_id: object = None,
              obj: str = "rule", strict: bool = False) -> Rule:
    """Validate and canonicalise one rule. ``strict``: EC2's own answers
    (the AWS formats): tcp/udp ports -1 and icmp without a type/code pair
    are errors, and the description must use EC2's characters.

    tcp/udp: ``from_port..to_port`` inclusive within 0-65535 (both required).
    icmp/icmpv6: ``from_port`` = type (-1 all), ``to_port`` = code (-1 all);
    type -1 with a code other than -1 is "code without type".
    anything else: ports ignored and stored as -1/-1.
    """
    if direction not in DIRECTIONS:
        raise ValidationError(obj, "direction", f"{direction!r} is not ingress or egress")
    proto = parse_protocol(protocol, obj)
    if proto in (PROTO_TCP, PROTO_UDP):
        if from_port is None or to_port is None:
            raise ValidationError(obj, "FromPort" if from_port is None else "ToPort",
                                  f"required for protocol {protocol_label(proto)}")
        lo = parse_int(from_port, obj, "FromPort")
        hi = parse_int(to_port, obj, "ToPort")
        if lo == -1 and hi == -1 and not strict:  # lenient: -1/-1 means all ports
            lo, hi = 0, 65535
        for name, val in (("FromPort", lo), ("ToPort", hi)):
            if not 0 <= val <= 65535:
                raise ValidationError(obj, name, f"port {val} is outside 0-65535")
        if lo > hi:
            raise ValidationError(obj, "ToPort", f"port range {lo}-{hi} is reversed")
    elif proto in (PROTO_ICMP, PROTO_ICMPV6):
        if strict and (from_port is None or to_port is None):
            raise ValidationError(obj, "FromPort" if from_port is None else "ToPort",
                                  f"required for protocol {protocol_label(proto)} "
                                  "(the ICMP type and code; -1 for all)")
        lo = -1 if from_port is None else parse_int(from_port, obj, "FromPort")
        hi = -1 if to_port is None else parse_int(to_port, obj, "ToPort")
        if not -1 <= lo <= 255:
            raise ValidationError(obj, "FromPort", f"ICMP type {lo} is outside -1..255")
        if not -1 <= hi <= 255:
            raise ValidationError(obj, "ToPort", f"ICMP code {hi} is outside -1..255")
        if lo == -1 and hi != -1:
            raise ValidationError(obj, "ToPort", f"ICMP code {hi} given without a type")
    else:
        lo = hi = -1
    desc = "" if description is None else description
    if not isinstance(desc, str):
        raise ValidationError(obj, "Description", "must be a string")
    if len(desc) > 255:
        raise ValidationError(obj, "Description", f"{len(desc)} characters, at most 255")
    if strict:
        check_aws_text(desc, obj, "Description")
    rid = rule_id or rule_id_for(group_id, direction, proto, lo, hi, peer)
    check_id("sgr", rid, obj, "SecurityGroupRuleId")
    return Rule(group_id, direction, proto, lo, hi, peer, desc, str(rid))


# --------------------------------------------------------------------------- objects


@dataclass
class SecurityGroup:
    group_id: str
    name: str
    description: str = ""
    tags: Dict[str, str] = field(default_factory=dict)
    rules: List[Rule] = field(default_factory=list)
    vpc_id: str = ""  # as given (EC2's VpcId); sgctl has no VPCs, tools read it back

    def rules_in(self, direction: str) -> List[Rule]:
        return [r for r in self.rules if r.direction == direction]


@dataclass
class PrefixListEntry:
    cidr: IPNetwork
    description: str = ""


@dataclass
class PrefixList:
    prefix_list_id: str
    name: str
    family: int  # 4 or 6
    max_entries: int
    entries: List[PrefixListEntry] = field(default_factory=list)
    version: int = 1
    tags: Dict[str, str] = field(default_factory=dict)


TIMEOUT_MAX = 432000  # seconds: the longest idle timeout any setting allows (5 days, as AWS)


@dataclass
class Timeouts:
    """Idle timeouts in seconds (1.4). The first three are the AWS
    ConnectionTrackingConfiguration; the rest are ours and documented."""

    tcp_established: int = TIMEOUT_MAX
    udp_stream: int = 180
    udp_other: int = 30
    tcp_syn: int = 60
    tcp_closing: int = 10
    icmp: int = 30
    other: int = 600

    RANGES = {"tcp_established": (60, TIMEOUT_MAX), "udp_stream": (60, 180), "udp_other": (30, 60)}

    def validate(self, obj: str) -> None:
        for name, (lo, hi) in self.RANGES.items():
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or not lo <= val <= hi:
                raise ValidationError(obj, name, f"{val!r} is outside {lo}-{hi} seconds")
        for name in ("tcp_syn", "tcp_closing", "icmp", "other"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or not 1 <= val <= TIMEOUT_MAX:
                raise ValidationError(obj, name, f"{val!r} is outside 1-{TIMEOUT_MAX} seconds")

    def of(self, proto: int, state: int) -> int:
        """The idle timeout of a connection of ``proto`` in ``state``
        (abi.CT_*): the choice ct_timeout() in bpf/lib/conntrack.h makes."""
        if proto == PROTO_TCP:
            if state == CT_NEW:
                return self.tcp_syn
            return self.tcp_closing if state == CT_CLOSING else self.tcp_established
        if proto == PROTO_UDP:
            return self.udp_stream if state == CT_STREAM else self.udp_other
        if proto in (PROTO_ICMP, PROTO_ICMPV6):
            return self.icmp
        return self.other


@dataclass
class NetworkInterface:
    eni_id: str
    groups: List[str]
    ipv4: List[ipaddress.IPv4Address] = field(default_factory=list)
    ipv6: List[ipaddress.IPv6Address] = field(default_factory=list)
    timeouts: Timeouts = field(default_factory=Timeouts)
    device: Optional[str] = None  # local Linux device; None = remote member
    mode: str = MODE_WORKLOAD
    description: str = ""
    tags: Dict[str, str] = field(default_factory=dict)
    watch_addresses: bool = False  # addresses follow the device's (daemon, netlink)
    revalidate: bool = False  # a policy change cuts tracked connections it no longer allows
    source_dest_check: bool = True  # 1.6: only its own addresses, in and out (AWS default)
    mac_address: Optional[str] = None  # the instance's MAC: gives its IPv6 link-local
    node: Optional[str] = None  # the host whose agent binds ``device`` (None: this host)

    def addresses(self) -> List[IPAddress]:
        """What group references match: the private addresses (1.1)."""
        return [*self.ipv4, *self.ipv6]

    def link_local(self) -> Optional[ipaddress.IPv6Address]:
        """fe80::/64 + the modified EUI-64 of ``mac_address`` (RFC 4291)."""
        if self.mac_address is None:
            return None
        mac = mac_bytes(self.mac_address)
        iid = bytes([mac[0] ^ 0x02]) + mac[1:3] + b"\xff\xfe" + mac[3:6]
        return ipaddress.IPv6Address(b"\xfe\x80" + b"\0" * 6 + iid)

    def own_addresses(self) -> List[IPAddress]:
        """What the source/destination check accepts as the interface's (1.6)."""
        ll = self.link_local()
        return [*self.ipv4, *self.ipv6, *([ll] if ll is not None and ll not in self.ipv6 else [])]

    def onlink64(self) -> List[ipaddress.IPv6Network]:
        """The /64s of its IPv6 addresses: where its neighbours are."""
        nets = {ipaddress.IPv6Network((int(a) >> 64 << 64, 64)) for a in self.ipv6
                if not a.is_link_local}
        return sorted(nets)


DEFAULT_EXEMPT = (
    "169.254.169.254/32",  # instance metadata
    "169.254.169.123/32",  # time sync
    "169.254.169.253/32",  # DNS resolver
    "fd00:ec2::254/128",
    "fd00:ec2::123/128",
    "fd00:ec2::253/128",
)


EXEMPT_WIDEST = {4: 8, 6: 32}  # shortest exempt prefix accepted without exempt_force


@dataclass
class Settings:
    """Host-wide configuration. Quotas are limits, not design limits (1.2)."""

    exempt: List[IPNetwork] = field(
        default_factory=lambda: [ipaddress.ip_network(c) for c in DEFAULT_EXEMPT])
    exempt_dhcp: bool = True
    dhcp_servers: List[IPNetwork] = field(default_factory=list)  # empty: any server that answers
    exempt_force: bool = False  # allow exempt entries wider than EXEMPT_WIDEST
    max_groups_per_interface: int = 16
    max_rules_per_interface: int = 100000
    # half-open connections each interface may hold (0: the host's half-open
    # share of the table divided among the bound interfaces)
    conntrack_allowance: int = 0
    # connections each interface may hold in all (0: half the table, the
    # whole of it for a lone interface)
    conntrack_limit: int = 0

    def connection_limit(self, ct_max: int, interfaces: int) -> int:
        """Connections each of ``interfaces`` bound interfaces may hold: no
        one interface fills the table the others need (never above it)."""
        if self.conntrack_limit:
            return min(self.conntrack_limit, ct_max)
        return ct_max if interfaces <= 1 else ct_max // 2

    def half_open_allowance(self, slots: int, interfaces: int) -> int:
        """Each of ``interfaces`` bound interfaces' share of ``slots``
        half-open slots, or ``conntrack_allowance`` when that asks for less
        (never more: all must fit)."""
        share = slots // max(1, interfaces)
        return min(self.conntrack_allowance, share) if self.conntrack_allowance else share


_RULE_ID = operator.attrgetter("rule_id")


def _unbound(eni: NetworkInterface) -> NetworkInterface:
    """``eni`` as a member elsewhere (a shallow copy: ``replace`` costs ten
    times more, and a fleet's states hold 100k interfaces)."""
    out = copy.copy(eni)
    out.device = None
    return out


@dataclass
class State:
    """The whole desired state: what ``sgctl apply -f`` replaces."""

    groups: Dict[str, SecurityGroup] = field(default_factory=dict)
    prefix_lists: Dict[str, PrefixList] = field(default_factory=dict)
    interfaces: Dict[str, NetworkInterface] = field(default_factory=dict)
    settings: Settings = field(default_factory=Settings)
    stale_rules: List[Rule] = field(default_factory=list)  # filled by validate()
    warnings: List[str] = field(default_factory=list)  # where a loader departed from AWS
    # for_node's answers (a state is not changed once validated and shared)
    _localised: Dict[Optional[str], State] = field(default_factory=dict, repr=False,
                                                   compare=False)
    _base: Optional[weakref.ReferenceType] = field(default=None, repr=False, compare=False)

    def patched_from(self, base: State) -> None:
        """This state is ``base`` with a few objects replaced (keyspace.patch):
        for_node reuses what it made of ``base`` for the objects they share."""
        self._base = weakref.ref(base)

    def _patched_from(self) -> Optional[State]:
        return self._base() if self._base is not None else None

    def for_node(self, node: Optional[str]) -> State:
        """The state as the agent of ``node`` enforces it: an interface of
        another node is a member elsewhere (its device is not bound here).
        Interfaces that name no node are this host's. The result shares
        everything else with this state (copy it before changing it)."""
        done = self._localised.get(node)
        if done is not None:
            return done
        foreign = {eid for eid, e in self.interfaces.items()
                   if e.device and e.node is not None and e.node != node}
        base = self._patched_from() if foreign else None
        was = base._localised.get(node) if base is not None else None
        if was is not None and base is not None:  # unchanged interfaces keep their copies
            old, old_local = base.interfaces, was.interfaces
            ifaces = {eid: (old_local[eid] if old.get(eid) is e else _unbound(e))
                      if eid in foreign else e for eid, e in self.interfaces.items()}
        else:
            ifaces = {eid: _unbound(e) if eid in foreign else e
                      for eid, e in self.interfaces.items()}
        out = self if not foreign else replace(self, interfaces=ifaces, _localised={},
                                               _base=None)
        self._localised[node] = out
        return out

    def copy(self) -> State:
        """A copy whose objects can be changed without touching this one
        (rules and addresses are immutable and shared)."""
        return State(
            groups={k: replace(g, tags=dict(g.tags), rules=list(g.rules))
                    for k, g in self.groups.items()},
            prefix_lists={k: replace(p, entries=list(p.entries), tags=dict(p.tags))
                          for k, p in self.prefix_lists.items()},
            interfaces={k: replace(e, groups=list(e.groups), ipv4=list(e.ipv4), ipv6=list(e.ipv6),
                                   timeouts=replace(e.timeouts), tags=dict(e.tags))
                        for k, e in self.interfaces.items()},
            settings=replace(self.settings, exempt=list(self.settings.exempt),
                             dhcp_servers=list(self.settings.dhcp_servers)),
            stale_rules=list(self.stale_rules), warnings=list(self.warnings))

    # -- lookups used by the evaluator and compiler
    def members_of(self, group_id: str) -> List[NetworkInterface]:
        return [eni for eni in self.interfaces.values() if group_id in eni.groups]

    def peer_networks(self, peer: Peer) -> List[IPNetwork]:
        """The CIDRs a peer stands for right now."""
        if peer.kind == "cidr":
            return [peer.network]
        if peer.kind == "pl":
            pl = self.prefix_lists.get(peer.value)
            return [e.cidr for e in pl.entries] if pl else []
        nets: List[IPNetwork] = []
        for eni in self.members_of(peer.value):
            nets.extend(ipaddress.ip_network(a) for a in eni.addresses())
        return nets

    def rules_of(self, eni: NetworkInterface, direction: str) -> List[Rule]:
        out: List[Rule] = []
        for gid in eni.groups:
            out.extend(self.groups[gid].rules_in(direction))
        return out

    def bound_interfaces(self) -> List[NetworkInterface]:
        return [e for e in self.interfaces.values() if e.device]

    def uses_ipv6(self) -> bool:
        return any(e.ipv6 for e in self.interfaces.values())


# --------------------------------------------------------------------------- defaults


def default_egress(group_id: str, ipv6: bool) -> List[Rule]:
    """A new group: egress all to 0.0.0.0/0 (and ::/0 where IPv6 is in use)."""
    rules = [make_rule(group_id, EGRESS, PROTO_ALL, None, None, Peer.cidr(WORLD4))]
    if ipv6:
        rules.append(make_rule(group_id, EGRESS, PROTO_ALL, None, None, Peer.cidr(WORLD6)))
    return rules


def default_group(group_id: str = DEFAULT_GROUP_ID) -> SecurityGroup:
    """The ``default`` group: ingress all from itself, egress all to 0/0 and ::/0."""
    rules = [make_rule(group_id, INGRESS, PROTO_ALL, None, None, Peer("sg", group_id))]
    rules += default_egress(group_id, ipv6=True)
    return SecurityGroup(group_id, DEFAULT_GROUP_NAME, "default VPC security group", {}, rules)


# --------------------------------------------------------------------------- validation


def validate(state: State, since: Optional[State] = None) -> State:
    """Check cross-object consistency; raise ValidationError naming the culprit.
    ``since``: a validated state whose interface objects ``state`` shares
    (keyspace.patch): those are not checked on their own again.

    Adds the ``default`` group when absent, gives group-less interfaces the
    default group, and records stale group references in ``state.stale_rules``.
    """
    s = state.settings
    if not s.exempt_force:
        for i, net in enumerate(s.exempt):
            if net.prefixlen < EXEMPT_WIDEST[net.version]:
                raise ValidationError(f"settings exempt[{i}]", "exempt",
                                      f"{net} would exempt everything the interfaces send to it "
                                      f"from their rules; entries must be /{EXEMPT_WIDEST[4]} or "
                                      f"longer (IPv4), /{EXEMPT_WIDEST[6]} or longer (IPv6), "
                                      "unless exempt_force is true")
    dflt = state.groups.get(DEFAULT_GROUP_ID)
    if dflt is not None and dflt.name != DEFAULT_GROUP_NAME:
        raise ValidationError(DEFAULT_GROUP_ID, "GroupId",
                              f"{DEFAULT_GROUP_ID} is the id of the {DEFAULT_GROUP_NAME!r} group; "
                              f"a group named {dflt.name!r} needs another id")
    if not any(g.name == DEFAULT_GROUP_NAME for g in state.groups.values()):
        state.groups[DEFAULT_GROUP_ID] = default_group()
    default_id = next(g.group_id for g in state.groups.values() if g.name == DEFAULT_GROUP_NAME)

    names: Dict[str, str] = {}
    for gid, group in state.groups.items():
        check_id("sg", gid, gid, "GroupId")
        if group.name in names:
            raise ValidationError(gid, "GroupName",
                                  f"{group.name!r} is already used by {names[group.name]}")
        names[group.name] = gid
        n = len(group.rules)  # hot on every change: set sizes first, the loop only when wrong
        if len(set(map(Rule.identity, group.rules))) == n and \
                len(set(map(_RULE_ID, group.rules))) == n:
            continue
        seen: Dict[tuple, str] = {}
        ids: Dict[str, Rule] = {}
        for i, rule in enumerate(group.rules):
            ident = rule.identity()
            if ident in seen:
                raise ValidationError(f"{gid} {rule.direction}[{i}]", "IpPermissions",
                                      f"duplicate rule: same as {seen[ident]} "
                                      f"({protocol_label(rule.protocol)} "
                                      f"{rule.describe_ports()} {rule.peer})",
                                      "InvalidPermission.Duplicate")
            seen[ident] = rule.rule_id
            if rule.rule_id in ids:
                raise ValidationError(f"{gid} {rule.direction}[{i}]", "SecurityGroupRuleId",
                                      f"{rule.rule_id} is used twice")
            ids[rule.rule_id] = rule
    state.stale_rules = []
    for gid, group in state.groups.items():
        for i, rule in enumerate(group.rules):
            kind = rule.peer.kind
            if kind == "cidr":
                continue
            if kind == "pl" and rule.peer.value not in state.prefix_lists:
                raise ValidationError(f"{gid} {rule.direction}[{i}]", "PrefixListId",
                                      f"unknown prefix list {rule.peer.value}")
            if kind == "sg" and rule.peer.value not in state.groups:
                state.stale_rules.append(rule)

    for plid, pl in state.prefix_lists.items():
        check_id("pl", plid, plid, "PrefixListId")
        if pl.family not in (4, 6):
            raise ValidationError(plid, "AddressFamily", f"{pl.family!r} is not IPv4 or IPv6")
        if not isinstance(pl.max_entries, int) or pl.max_entries < 1:
            raise ValidationError(plid, "MaxEntries", f"{pl.max_entries!r} must be >= 1")
        if len(pl.entries) > pl.max_entries:
            raise ValidationError(plid, "Entries",
                                  f"{len(pl.entries)} entries exceed MaxEntries {pl.max_entries}")
        seen_cidrs = set()
        for j, entry in enumerate(pl.entries):
            if entry.cidr.version != pl.family:
                raise ValidationError(f"{plid} entry[{j}]", "Cidr",
                                      f"{entry.cidr} is not IPv{pl.family}")
            if entry.cidr in seen_cidrs:
                raise ValidationError(f"{plid} entry[{j}]", "Cidr", f"duplicate entry {entry.cidr}")
            seen_cidrs.add(entry.cidr)

    devices: Dict[Tuple[Optional[str], str], str] = {}  # (node, device) -> eni
    known = since.interfaces if since is not None else {}
    for eid, eni in state.interfaces.items():
        if known.get(eid) is not eni:
            _check_interface(eid, eni)
        if not eni.groups:
            eni.groups = [default_id]
        if len(eni.groups) > s.max_groups_per_interface:
            raise ValidationError(eid, "Groups", f"{len(eni.groups)} groups, at most "
                                  f"{s.max_groups_per_interface} allowed",
                                  "SecurityGroupsPerInterfaceLimitExceeded")
        if len(set(eni.groups)) != len(eni.groups):
            raise ValidationError(eid, "Groups", "a group is listed twice")
        for gid in eni.groups:
            if gid not in state.groups:
                raise ValidationError(eid, "Groups", f"unknown group {gid}")
        if eni.device is not None:
            where = (eni.node, eni.device)  # device names repeat across hosts
            if where in devices:
                raise ValidationError(eid, TAG_DEVICE,
                                      f"device {eni.device} is already bound to {devices[where]}")
            devices[where] = eid
        nrules = sum(len(state.groups[g].rules) for g in eni.groups)
        if nrules > s.max_rules_per_interface:
            raise ValidationError(eid, "Groups", f"{nrules} rules, at most "
                                  f"{s.max_rules_per_interface} per interface allowed",
                                  "RulesPerSecurityGroupLimitExceeded")
    return state


def _check_interface(eid: str, eni: NetworkInterface) -> None:
    """What an interface must be on its own (validate checks it against the rest)."""
    check_id("eni", eid, eid, "NetworkInterfaceId")
    if eni.mode not in MODES:
        raise ValidationError(eid, TAG_MODE, f"{eni.mode!r} is not workload or host")
    if eni.node is not None and not _NODE_RE.match(eni.node):
        raise ValidationError(eid, TAG_NODE, f"{eni.node!r} is not a node name")
    if eni.device is not None and not _DEV_RE.match(eni.device):
        raise ValidationError(eid, TAG_DEVICE, f"{eni.device!r} is not a device name")
    if eni.mac_address is not None:
        eni.mac_address = parse_mac(eni.mac_address, eid)
    eni.timeouts.validate(eid)


def all_rules(state: State) -> Iterable[Rule]:
    for g in state.groups.values():
        yield from g.rules
