"""ctypes mirror of bpf/lib/types.h -- every struct that crosses the boundary.

``tests/test_abi.py`` compares each struct here with the layout bcc derives
from the C header (sizes, field names, offsets), so the two cannot drift.
"""

from __future__ import annotations

import ctypes as ct

DIR_INGRESS, DIR_EGRESS = 0, 1
CT_NEW, CT_ESTABLISHED, CT_STREAM, CT_CLOSING = 1, 2, 3, 4  # SG_CT_*
MODE_WORKLOAD, MODE_HOST = 0, 1
PROTO_ANY = 256
FLAG_WORLD = 0x1
CFG_EXEMPT_DHCP, CFG_FLOW_LOG, CFG_DHCP_SERVERS = 0x1, 0x2, 0x4  # SG_CFG_*: sg_config.flags
EXEMPT_SERVICE, EXEMPT_DHCP_SERVER = 0x1, 0x2  # SG_EXEMPT_*: sg_exempt_lpm values
LOCAL_ADDR, LOCAL_ONLINK64 = 0, 1  # SG_LOCAL_*: sg_local_key.kind
CT_F_EXEMPT, CT_F_DHCP, CT_F_REPLIED = 0x1, 0x2, 0x4  # SG_CT_F_*: sg_ct_entry.flags
PLEN_SLOTS, CHAIN_MAX, SEGS_INLINE, SEGS_LPM = 129, 4, 8, 0xFF
PLEN4_SLOTS = 33
TO_NAMES = ("tcp_established", "udp_stream", "udp_other", "tcp_syn", "tcp_closing", "icmp",
            "other")  # order of enum sg_timeout
COUNTER_SLOTS = 1024
EP_PROBE, EP_SRC_CHECK, EP_MAC = 0x1, 0x2, 0x4  # SG_EP_*: sg_endpoint.flags
EP_INDEX_TRIES = 8  # index entries ifindex + 0 .. TRIES - 1 hold a device's (endpoint.h)
PROBE_EP_ID = COUNTER_SLOTS - 1  # reserved for `sgctl explain`: its own counter slot
RULE_SLOTS = 65536  # rule numbers below get their own hit counters
REASON_MAX = 32



def ct_ring_slots(ct_max: int) -> int:
    """sg_ct_ring's size (SG_CT_RING): the half of the conntrack table that
    the interfaces' half-open allowances share."""
    return max(1, ct_max // 2)


def hook_is_xdp(mode: int, direction: int) -> bool:
    """Which program sees a direction (sgctl.c's entry points): XDP is the
    device's receive side -- a host interface's ingress, an instance's
    egress (the host end of its veth/tap); tc egress sees the other."""
    return direction == (DIR_INGRESS if mode == MODE_HOST else DIR_EGRESS)


u8, u16, u32, u64 = ct.c_uint8, ct.c_uint16, ct.c_uint32, ct.c_uint64
Addr = ct.c_uint32 * 4  # __be32[4]


class Endpoint(ct.Structure):
    _fields_ = [("ep_id", u32), ("policy_id", u32), ("mode", u8), ("flags", u8),
                ("open_all", u16), ("world_class", u32 * 4), ("timeouts", u32 * 7),
                ("addr_id", u32), ("mac", u8 * 6), ("pad", u16), ("ring_base", u32),
                ("ring_size", u32), ("addr4", u32), ("addr6", u32 * 4), ("ct_limit", u32)]


class EpRef(ct.Structure):
    _fields_ = [("ifindex", u32), ("slot", u32)]


class LocalKey(ct.Structure):
    _fields_ = [("addr_id", u32), ("family", u8), ("kind", u8), ("pad", u16), ("addr", Addr)]


class Peer4Key(ct.Structure):
    _fields_ = [("policy_id", u32), ("dir", u8), ("plen", u8), ("pad", u16), ("addr", u32)]


class PeerKey(ct.Structure):
    _fields_ = [("policy_id", u32), ("dir", u8), ("family", u8), ("plen", u8), ("pad", u8),
                ("addr", Addr)]


class PlensKey(ct.Structure):
    _fields_ = [("policy_id", u32), ("dir", u8), ("family", u8), ("pad", u16)]


class Plen(ct.Structure):
    _fields_ = [("mask", Addr), ("plen", u8), ("pad", u8 * 3)]


TOP16_WORDS = 1024


class Plens(ct.Structure):
    _fields_ = [("n", u32), ("len", Plen * PLEN_SLOTS), ("top16", u64 * TOP16_WORDS)]


class Seg(ct.Structure):
    _fields_ = [("lo", u16), ("hi", u16), ("rule_index", u32), ("flags", u32)]


class PortsKey(ct.Structure):
    _fields_ = [("cls", u32), ("proto", u16), ("pad", u16)]


class Ports(ct.Structure):
    _fields_ = [("n", u32), ("seg", Seg * SEGS_INLINE)]


class PortKey(ct.Structure):
    _fields_ = [("prefixlen", u32), ("cls", u32), ("proto", u16), ("port", u16)]


class PortVal(ct.Structure):
    _fields_ = [("rule_index", u32), ("flags", u32)]


class CtKey(ct.Structure):
    _fields_ = [("ep_id", u32), ("family", u8), ("proto", u8), ("pad", u16),
                ("local", Addr), ("remote", Addr), ("lport", u16), ("rport", u16)]


class CtEntry(ct.Structure):
    _fields_ = [("last_seen", u64), ("rule_index", u32), ("policy_id", u32), ("state", u8),
                ("origin", u8), ("fin", u8), ("flags", u8), ("tcp_flags", u8 * 2),
                ("icmp_type", u8), ("icmp_code", u8), ("slot", u32), ("pad", u32),
                ("packets", u64 * 2), ("bytes", u64 * 2)]


class CtQuota(ct.Structure):
    _fields_ = [("next", u64), ("evicted", u64), ("created", u64)]


class FragKey(ct.Structure):
    _fields_ = [("ep_id", u32), ("family", u8), ("proto", u8), ("pad", u16),
                ("src", Addr), ("dst", Addr), ("id", u32)]


class FragSlot(ct.Structure):
    _fields_ = [("key", FragKey), ("pad", u32), ("seen", u64)]


FRAG_PER_EP = 64  # sg_frags entries per endpoint slot (types.h)
FRAG_TIMEOUT = 30  # seconds a first fragment lets its datagram's others through (frags.h)
FRAG_HASH_MUL = 0x01000193


def frag_hash(proto: int, frag_id: int, src: bytes, dst: bytes) -> int:
    """Which of its endpoint's sg_frags entries a datagram takes (frags.h
    frag_index, less the endpoint's region): addresses as 16 bytes each."""
    h = (frag_id ^ proto) & 0xFFFFFFFF
    for i in range(4):
        for addr in (src, dst):
            h = ((h ^ int.from_bytes(addr[4 * i:4 * i + 4], "little")) * FRAG_HASH_MUL) \
                & 0xFFFFFFFF
    return (h ^ (h >> 16)) & (FRAG_PER_EP - 1)


class ExemptKey(ct.Structure):
    _fields_ = [("prefixlen", u32), ("family", u32), ("addr", Addr)]


class Config(ct.Structure):
    _fields_ = [("now_override", u64), ("flags", u32), ("pad", u32), ("flow_cost_ns", u64),
                ("flow_burst_ns", u64), ("flow_ep_cost_ns", u64), ("flow_ep_burst_ns", u64)]


class Counter(ct.Structure):
    _fields_ = [("packets", u64), ("bytes", u64)]


class RuleHit(ct.Structure):
    _fields_ = [("packets", u64), ("bytes", u64), ("last_seen", u64)]


class FlowEvent(ct.Structure):
    _fields_ = [("ts_ns", u64), ("ep_id", u32), ("rule_index", u32), ("bytes", u32),
                ("dir", u8), ("reason", u8), ("family", u8), ("proto", u8), ("tcp_flags", u8),
                ("icmp_type", u8), ("icmp_code", u8), ("tracked", u8), ("sport", u16),
                ("dport", u16), ("src", Addr), ("dst", Addr)]


# map name -> (key type, value type); the C side is bpf/lib/maps.h
MAPS = {
    "sg_endpoints": (u32, Endpoint),
    "sg_ep_index": (u32, EpRef),
    "sg_ep_slots": (u32, Endpoint),
    "sg_plens": (PlensKey, Plens),
    "sg_peers": (PeerKey, u32),
    "sg_peers4": (Peer4Key, u32),
    "sg_ports": (PortsKey, Ports),
    "sg_ports_lpm": (PortKey, PortVal),
    "sg_conntrack": (CtKey, CtEntry),
    "sg_ct_ring": (u32, CtKey),
    "sg_ct_quota": (u32, CtQuota),
    "sg_ct_removed": (u32, u64),
    "sg_frags": (u32, FragSlot),
    "sg_exempt_lpm": (ExemptKey, u8),
    "sg_local_addrs": (LocalKey, u8),
    "sg_config": (u32, Config),
    "sg_verdicts": (u32, Counter),
    "sg_rule_hits": (u32, RuleHit),
    "sg_flow_skips": (u32, u64),
}
PERCPU_MAPS = {"sg_verdicts", "sg_rule_hits", "sg_flow_skips"}
RING_MAPS = {"sg_flow_events": FlowEvent}  # ring buffers: name -> record type


def addr_words(packed: bytes) -> ct.Array[ct.c_uint32]:
    """4 or 16 address bytes (network order) -> the __be32[4] field."""
    raw = packed.ljust(16, b"\0")
    return Addr.from_buffer_copy(raw)


def words_bytes(words: ct.Array[ct.c_uint32], family: int) -> bytes:
    return bytes(words)[: 4 if family == 4 else 16]

# <linux/if_arp.h>: device link types. sgctl filters Ethernet frames (veth and tap are).
ARPHRD_ETHER = 1
ARPHRD_NAMES = {1: "ethernet", 772: "loopback", 65534: "none (tun, wireguard: layer 3)",
                778: "gre", 768: "ipip", 769: "ip6ip6", 776: "sit", 823: "ip6gre"}
