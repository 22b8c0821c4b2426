"""The status report shared by the one-shot CLI and the daemon."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from controller import abi
from controller.kernel import netlink
from controller.kernel.conntrack import allowance
from controller.kernel.counters import endpoint_counters
from controller.kernel.dataplane import Dataplane
from controller.reconcile.applied import Applied


def report(dp: Dataplane, applied: Applied, live: Optional[Dict[int, int]] = None) -> Dict[str, Any]:
    """Bindings, attachment, counters (and allowance figures when ``live``,
    the per-endpoint conntrack counts of the last GC, is known)."""

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
            row.update(allowance(dp, live, ep.ep_id, counters))
        rows.append(row)
    desired = applied.desired or {}
    return {"interfaces": rows,
            "exempt": desired.get("settings", {}).get("exempt", []),
            "exempt_dhcp": desired.get("settings", {}).get("exempt_dhcp", True),
            "dhcp_servers": desired.get("settings", {}).get("dhcp_servers", []),
            "stale_rules": desired.get("stale_rules", []),
            "policies": {name: p.as_json() for name, p in applied.policies.items()}}


ARRAY_MAPS = {"sg_config", "sg_verdicts", "sg_rule_hits", "sg_flow_skips"}  # arrays are always "full"


def map_fill(dp: Dataplane, conntrack_live: Optional[int] = None) -> List[Dict[str, Any]]:
    """Entries and capacity of every pinned map (conntrack: the last GC's
    count when known, else a batch scan)."""
    out = []
    for name in abi.MAPS:
        m = dp.map(name)
        cap = m.max_entries
        if name in ARRAY_MAPS:
            n = cap
        elif name == "sg_conntrack":
            n = conntrack_live if conntrack_live is not None else sum(1 for _ in m.batch_items())
        else:
            n = len(m.keys())
        out.append({"map": name, "entries": n, "capacity": cap,
                    "fill": round(n / cap, 4) if cap else 0.0})
    return out


def print_table(out: Dict[str, Any]) -> None:
    print(f"{'INTERFACE':<18} {'DEVICE':<14} {'MODE':<9} {'IN':>5} {'OUT':>5} "
          f"{'POLICY':>6}  {'XDP':<8} {'SRCDST':<6} GROUPS")
    for r in out["interfaces"]:
        xdp = r["attached"].get("xdp_mode", "gone") if r["attached"] else "gone"
        if r.get("pending"):
            xdp = "pending"
        print(f"{r['interface']:<18} {r['device']:<14} {r['mode']:<9} "
              f"{r['rules_ingress']:>5} {r['rules_egress']:>5} {r['policy_id']:>6}  "
              f"{xdp:<8} {'check' if r.get('source_dest_check', True) else 'off':<6} "
              f"{','.join(r['groups'])}")
    servers = out.get("dhcp_servers") or []
    print(f"exempt destinations: {', '.join(out['exempt']) or 'none'}; DHCP client "
          f"{'exempt' if out['exempt_dhcp'] else 'filtered'}"
          f"{' (servers ' + ', '.join(servers) + ')' if servers else ''}")
    for rid in out["stale_rules"]:
        print(f"stale rule {rid}: references a group that does not exist")
    if "maps" in out:
        print(f"{'MAP':<16} {'ENTRIES':>10} {'CAPACITY':>10} {'FILL':>7}")
        for m in out["maps"]:
            print(f"{m['map']:<16} {m['entries']:>10} {m['capacity']:>10} {m['fill']:>7.2%}")
    if "daemon" in out:
        d = out["daemon"]
        print(f"daemon: pid {d['pid']}, generation {d['generation']}, programs {d['programs']}, "
              f"conntrack {d['conntrack_entries']}/{d['conntrack_max']}")
    if "flow_logs" in out:
        f = out["flow_logs"]
        recs = ", ".join(f"{n} {s}" for s, n in sorted(f["records"].items()))
        print(f"flow logs: to {', '.join(f['outputs'])}, {f['window']} s windows, "
              f"{f['encoding']}; records: {recs}; events {f['events']}, skipped {f['skipped']}")
