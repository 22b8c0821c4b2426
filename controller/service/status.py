"""The status report shared by the one-shot CLI and the daemon."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from controller import abi
from controller.kernel import bpfsys, netlink
from controller.kernel.conntrack import allowance
from controller.kernel.counters import endpoint_counters
from controller.kernel.dataplane import Dataplane
from controller.reconcile.applied import Applied


def report(dp: Dataplane, applied: Applied, live: Optional[Dict[int, int]] = None,
           half_open: Optional[Dict[int, int]] = None) -> Dict[str, Any]:
    """Bindings, attachment, counters (and allowance figures when ``live``
    and ``half_open``, the per-endpoint conntrack counts of the last GC, are
    known)."""

    rows = []
    for eni_id, s in sorted(applied.summary.items()):
        ep = applied.endpoints.get(eni_id)
        idx = ep.ifindex if ep else None
        att = netlink.attached(idx) if idx and s.device and netlink.ifindex(s.device) == idx else {}
        counters = endpoint_counters(dp, ep.ep_id) if ep else {}
        row = {"interface": eni_id, **s.as_json(), "ifindex": idx, "ep_id": ep.ep_id if ep else None,
               "attached": att,
               "counters": {f"{d}/{r}": {"packets": p, "bytes": b}
                            for (d, r), (p, b) in sorted(counters.items())}}
        if live is not None and ep:
            row.update(allowance(dp, live, half_open or {}, ep.ep_id, ep.ring, counters,
                                 ep.ct_limit))
        rows.append(row)
    desired = applied.desired or {}
    return {"interfaces": rows,
            "exempt": desired.get("settings", {}).get("exempt", []),
            "exempt_dhcp": desired.get("settings", {}).get("exempt_dhcp", True),
            "dhcp_servers": desired.get("settings", {}).get("dhcp_servers", []),
            "stale_rules": desired.get("stale_rules", []),
            "policies": {name: p.as_json() for name, p in applied.policies.items()}}


ARRAY_TYPES = (bpfsys.BPF_MAP_TYPE_ARRAY, bpfsys.BPF_MAP_TYPE_PERCPU_ARRAY)


def map_fill(dp: Dataplane, conntrack_live: Optional[int] = None) -> List[Dict[str, Any]]:
    """Entries and capacity of every pinned map (conntrack: the last GC's
    count when known, else a batch scan); ``array``: an array map, always
    full (its entries are not counted)."""
    out = []
    for name in abi.MAPS:
        m = dp.map(name)
        info = bpfsys.map_info(m.fd)
        cap, array = info.max_entries, info.type in ARRAY_TYPES
        if array:
            n = cap
        elif name == "sg_conntrack":
            n = conntrack_live if conntrack_live is not None else sum(1 for _ in m.batch_items())
        else:
            n = len(m.keys())
        out.append({"map": name, "entries": n, "capacity": cap, "array": array,
                    "fill": round(n / cap, 4) if cap else 0.0})
    return out


