"""Kernel values of policy objects (pure: built from the model with the
ABI mirror; nothing here touches the kernel)."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from controller import abi
from controller.policy.compiler import FAMILY_INDEX, network_bytes
from controller.policy.model import MODE_HOST, NetworkInterface, Settings, Timeouts, mac_bytes
from controller.reconcile.applied import WorldKey

ExemptEntries = Dict[bytes, Tuple[abi.ExemptKey, int]]  # key bytes -> (key, EXEMPT_* bits)


def endpoint_value(ep_id: int, policy_id: int, mode: str, open_all: int,
                   world: Dict[WorldKey, int], timeouts: Timeouts,
                   source_dest_check: bool = True, mac: Optional[str] = None,
                   ring: Tuple[int, int] = (0, 0),
                   inline: Tuple[bytes, bytes] = (b"", b""), ct_limit: int = 0) -> abi.Endpoint:
    """The sg_endpoints value; ``world``: (dir index, family) -> world class;
    ``ring``: its half-open allowance (first slot, slots); ``inline``: the
    IPv4 and IPv6 address the value holds (``inline_addresses``);
    ``ct_limit``: the connections it may hold in all."""
    val = abi.Endpoint(ep_id=ep_id, policy_id=policy_id, ring_base=ring[0], ring_size=ring[1],
                       ct_limit=ct_limit,
                       mode=abi.MODE_HOST if mode == MODE_HOST else abi.MODE_WORKLOAD,
                       open_all=open_all, addr_id=ep_id,
                       flags=(abi.EP_SRC_CHECK if source_dest_check else 0) |
                       (abi.EP_MAC if mac else 0))
    if mac:
        val.mac[:] = mac_bytes(mac)
    v4, v6 = inline
    if v4:
        val.addr4 = abi.addr_words(v4)[0]
    if v6:
        val.addr6[:] = list(abi.addr_words(v6))
    for (d, fam), cls in world.items():
        val.world_class[d * 2 + FAMILY_INDEX[fam]] = cls
    for i, tname in enumerate(abi.TO_NAMES):
        val.timeouts[i] = getattr(timeouts, tname)
    return val


def inline_addresses(eni: NetworkInterface) -> Tuple[bytes, bytes]:
    """Its first IPv4 and first IPv6 address (b"": none), which the address
    check compares before it looks in sg_local_addrs (each is also there)."""
    v6 = eni.ipv6[0] if eni.ipv6 else eni.link_local()
    return (eni.ipv4[0].packed if eni.ipv4 else b"", v6.packed if v6 is not None else b"")


def local_keys_of(eni: NetworkInterface, ep_id: int) -> Dict[bytes, abi.LocalKey]:
    """An interface's sg_local_addrs keys: its own addresses and IPv6 /64s."""
    keys = [abi.LocalKey(addr_id=ep_id, family=a.version, kind=abi.LOCAL_ADDR,
                         addr=abi.addr_words(a.packed)) for a in eni.own_addresses()]
    keys += [abi.LocalKey(addr_id=ep_id, family=6, kind=abi.LOCAL_ONLINK64,
                          addr=abi.addr_words(n.network_address.packed[:8]))
             for n in eni.onlink64()]
    return {bytes(k): k for k in keys}


def exempt_entries(settings: Settings) -> ExemptEntries:
    """sg_exempt_lpm: infrastructure services and DHCP servers. A prefix's
    value holds its own bits and those of every prefix containing it, so the
    longest match answers for all of them."""
    nets = [(n, abi.EXEMPT_SERVICE) for n in settings.exempt] + \
           [(n, abi.EXEMPT_DHCP_SERVER) for n in settings.dhcp_servers]
    want: ExemptEntries = {}
    for net, _ in nets:
        bits = 0
        for other, bit in nets:
            if other.version == net.version and net.subnet_of(other):  # type: ignore[arg-type]
                bits |= bit
        key = abi.ExemptKey(prefixlen=32 + net.prefixlen, family=net.version,
                            addr=abi.addr_words(network_bytes(net)))
        want[bytes(key)] = (key, bits)
    return want


def dhcp_flags(settings: Settings) -> int:
    """The sg_config flags the DHCP settings set."""
    return (abi.CFG_EXEMPT_DHCP if settings.exempt_dhcp else 0) | \
        (abi.CFG_DHCP_SERVERS if settings.dhcp_servers else 0)
