"""How ``sgctl status`` and ``sgctl conntrack`` print (``-o table``)."""

from __future__ import annotations

import time
from typing import Any, Dict, List


def print_status(out: Dict[str, Any]) -> None:
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
    if "fleet" in out:
        f = out["fleet"]
        stale = f" -- etcd unreachable since {f['stale_since']}: {f['error']}" \
            if f.get("stale_since") else ""
        print(f"fleet: node {f['node']}, revision {f['revision']}{stale}")
        for name, n in sorted(f.get("nodes", {}).items()):
            seen = time.strftime("%H:%M:%S", time.gmtime(n.get("seen", 0)))
            print(f"  node {name:<20} {len(n.get('interfaces', [])):>5} interfaces bound, "
                  f"last seen {seen} UTC, revision {n.get('revision')}")
    if "flow_logs" in out:
        f = out["flow_logs"]
        recs = ", ".join(f"{n} {s}" for s, n in sorted(f["records"].items()))
        print(f"flow logs: to {', '.join(f['outputs'])}, {f['window']} s windows, "
              f"{f['encoding']}; records: {recs}; events {f['events']}, skipped {f['skipped']}")


def print_connections(rows: List[Dict[str, Any]]) -> None:
    print(f"{'INTERFACE':<18} {'PROTO':<6} {'LOCAL':<28} {'REMOTE':<28} {'STATE':<12} "
          f"{'ORIGIN':<8} {'IDLE':>6} {'TIMEOUT':>8}")
    for r in rows:
        print(f"{r['interface'] or '-':<18} {r['protocol']:<6} {r['local'] + ':' + str(r['lport']):<28}"
              f" {r['remote'] + ':' + str(r['rport']):<28} {r['state']:<12} {r['origin']:<8} "
              f"{r['idle']:>6} {r['timeout']:>8}")
