"""Writers of the per-device maps: ``sg_endpoints`` (one value per bound
device: its policy, mode, address id, timeouts; the record) and what the
datapath reads of it (``sg_ep_index``, ``sg_ep_slots``), ``sg_local_addrs`` (the
addresses each endpoint owns) and ``sg_exempt_lpm`` (infrastructure services
and DHCP servers). Each writes only what differs from what this process
wrote last (``Dataplane.written``)."""

from __future__ import annotations

import ctypes as ct
import os
import sys
from typing import Dict, List, Optional, Set, Tuple

from controller import abi
from controller.kernel import bpfsys, netlink
from controller.kernel.dataplane import Dataplane
from controller.policy.errors import EnforcementError


def _ref(ifindex: int, slot: int) -> int:
    return int.from_bytes(bytes(abi.EpRef(ifindex, slot)), sys.byteorder)


def _unref(word: int) -> abi.EpRef:
    return abi.EpRef.from_buffer_copy(word.to_bytes(8, sys.byteorder))


def _entries(index: bpfsys.MappedWords, idx: int) -> List[int]:
    """The index entries device ``idx`` may sit in (bpf/lib/endpoint.h)."""
    return [(idx + k) % index.entries for k in range(abi.EP_INDEX_TRIES)]


def _find(index: bpfsys.MappedWords, idx: int) -> Optional[int]:
    return next((e for e in _entries(index, idx) if _unref(index[e]).ifindex == idx), None)


def point(dp: Dataplane, idx: int, val: abi.Endpoint) -> None:
    """Make the datapath see ``val`` for device ``idx``: the slot of the
    pair the index does not name, then the index entry's one store."""
    index, slots = dp.ep_index(), dp.map("sg_ep_slots")
    pair = 2 * int(val.ep_id)
    if pair + 1 >= slots.max_entries:
        raise EnforcementError(f"endpoint id {val.ep_id} has no slots (at most "
                               f"{slots.max_entries // 2 - 1} endpoints)")
    entry = _find(index, idx)
    old = None if entry is None else _unref(index[entry]).slot
    if entry is None:
        entry = next((e for e in _entries(index, idx) if _unref(index[e]).ifindex == 0), None)
        if entry is None:
            raise EnforcementError(
                f"device {idx}: the {abi.EP_INDEX_TRIES} endpoint-index entries it may use "
                f"are all held by other devices")
    slot = pair + 1 if old == pair else pair
    dp.await_free(slot)
    slots.update(ct.c_uint32(slot), val)
    index[entry] = _ref(idx, slot)
    if old is not None:
        dp.retire_slot(old)


def unpoint(dp: Dataplane, idx: int) -> None:
    """The datapath no longer finds device ``idx`` (it passes its packets)."""
    index = dp.ep_index()
    entry = _find(index, idx)
    if entry is not None:
        old = _unref(index[entry]).slot
        index[entry] = 0
        dp.retire_slot(old)


def write_endpoint(dp: Dataplane, idx: int, val: abi.Endpoint) -> bool:
    """Switch device ``idx`` to its endpoint value: the record in
    sg_endpoints, then what the datapath reads (``point``). A packet sees the
    old value or the new one. False when that value is already there."""
    raw = bytes(val)
    if dp.written.endpoints.get(idx) == raw:
        return False
    dp.map("sg_endpoints").update(ct.c_uint32(idx), val)
    point(dp, idx, val)
    dp.written.endpoints[idx] = raw
    return True


def kernel_endpoints(dp: Dataplane) -> Dict[int, abi.Endpoint]:
    """ifindex -> endpoint value, as the kernel holds them (none before the
    first load)."""
    if not os.path.exists(f"{dp.pin_dir}/sg_endpoints"):
        return {}
    return {int(k.value): v for k, v in dp.map("sg_endpoints").items()}  # type: ignore[attr-defined]


def unbind(dp: Dataplane, idx: int, ours: Set[int]) -> None:
    """Detach our programs from a device and forget its endpoint."""
    netlink.detach(idx, ours)
    unpoint(dp, idx)
    dp.map("sg_endpoints").delete(ct.c_uint32(idx))
    dp.written.attached.pop(idx, None)
    dp.written.endpoints.pop(idx, None)


def _local_have(dp: Dataplane) -> Dict[bytes, abi.LocalKey]:
    if dp.written.local is None:
        dp.written.local = {bytes(k): k for k in dp.map("sg_local_addrs").keys()}
    return dp.written.local


def add_local(dp: Dataplane, want: Dict[bytes, abi.LocalKey]) -> None:
    """Before the endpoints switch: the addresses they will check."""
    have, m = _local_have(dp), dp.map("sg_local_addrs")
    for raw, key in want.items():
        if raw not in have:
            m.update(key, ct.c_uint8(1))
            have[raw] = key


def remove_local(dp: Dataplane, want: Dict[bytes, abi.LocalKey]) -> None:
    """After the switch: addresses no interface has any more."""
    have, m = _local_have(dp), dp.map("sg_local_addrs")
    for raw in [r for r in have if r not in want]:
        m.delete(have.pop(raw))


def sync_exempt(dp: Dataplane, want: Dict[bytes, Tuple[abi.ExemptKey, int]], flags: int) -> None:
    """Make sg_exempt_lpm hold exactly ``want`` and set the DHCP flags."""
    m = dp.map("sg_exempt_lpm")
    for old in m.keys():
        if bytes(old) not in want:
            m.delete(old)
    for key, bits in want.values():
        m.update(key, ct.c_uint8(bits))
    dp.set_config(abi.CFG_EXEMPT_DHCP | abi.CFG_DHCP_SERVERS, flags)
