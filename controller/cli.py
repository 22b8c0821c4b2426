"""The ``sgctl`` command line (one-shot: no daemon needed)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from .model import ValidationError

EXIT_OK, EXIT_FAIL, EXIT_INVALID = 0, 1, 2


def _dataplane(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .dataplane import Dataplane

    return Dataplane(pin_dir=args.pin_dir, state_dir=args.state_dir, ct_max=args.conntrack_max)


def cmd_apply(args: argparse.Namespace) -> int:
    from .formats import load_file

    state = load_file(args.file)  # raises ValidationError before anything changes
    for rule in state.stale_rules:
        print(f"warning: {rule.group_id} {rule.rule_id}: references group {rule.peer.value}, "
              "which does not exist (stale: matches nothing)", file=sys.stderr)
    dp = _dataplane(args)
    try:
        applied = dp.apply(state)
    finally:
        dp.close()
    bound = len(applied.endpoints)
    rules = sum(len(g.rules) for g in state.groups.values())
    print(f"applied {args.file}: {len(state.groups)} groups, {rules} rules, "
          f"{len(state.interfaces)} interfaces ({bound} bound here)")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from . import netlink
    from .dataplane import endpoint_counters

    dp = _dataplane(args)
    try:
        if not os.path.exists(f"{args.pin_dir}/sg_endpoints"):
            print(f"nothing applied (no pinned maps under {args.pin_dir})")
            return EXIT_OK
        applied = dp.load_applied()
        rows = []
        for eni_id, s in sorted(applied.summary.items()):
            ep = applied.endpoints.get(eni_id, {})
            idx = ep.get("ifindex")
            att = netlink.attached(idx) if idx and netlink.ifindex(s["device"]) == idx else {}
            counters = endpoint_counters(dp, ep["ep_id"]) if ep else {}
            rows.append({"interface": eni_id, **s, "ifindex": idx, "ep_id": ep.get("ep_id"),
                         "attached": att,
                         "counters": {f"{d}/{r}": {"packets": p, "bytes": b}
                                      for (d, r), (p, b) in sorted(counters.items())}})
        desired = applied.desired or {}
        out = {"interfaces": rows,
               "exempt": desired.get("settings", {}).get("exempt", []),
               "exempt_dhcp": desired.get("settings", {}).get("exempt_dhcp", True),
               "stale_rules": desired.get("stale_rules", []),
               "policies": applied.policies}
        if args.output == "json":
            print(json.dumps(out, indent=2))
            return EXIT_OK
        print(f"{'INTERFACE':<18} {'DEVICE':<14} {'MODE':<9} {'IN':>5} {'OUT':>5} "
              f"{'POLICY':>6}  {'XDP':<8} GROUPS")
        for r in rows:
            xdp = r["attached"].get("xdp_mode", "gone") if r["attached"] else "gone"
            print(f"{r['interface']:<18} {r['device']:<14} {r['mode']:<9} "
                  f"{r['rules_ingress']:>5} {r['rules_egress']:>5} {r['policy_id']:>6}  "
                  f"{xdp:<8} {','.join(r['groups'])}")
        print(f"exempt: {', '.join(out['exempt']) or 'none'}; DHCP "
              f"{'exempt' if out['exempt_dhcp'] else 'filtered'}")
        for rid in out["stale_rules"]:
            print(f"stale rule {rid}: references a group that does not exist")
        return EXIT_OK
    finally:
        dp.close()


def cmd_reset(args: argparse.Namespace) -> int:
    dp = _dataplane(args)
    done = dp.reset()
    print(f"detached from {len(done)} device(s); removed {args.pin_dir}")
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    from .formats import load_file

    state = load_file(args.file)
    rules = sum(len(g.rules) for g in state.groups.values())
    print(f"{args.file}: valid: {len(state.groups)} groups, {rules} rules, "
          f"{len(state.prefix_lists)} prefix lists, {len(state.interfaces)} interfaces")
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sgctl", description="AWS-style security groups, in eBPF")
    p.add_argument("--pin-dir", default=os.environ.get("SGCTL_PIN_DIR", "/sys/fs/bpf/sgctl"),
                   help="bpffs directory of the pinned maps and programs")
    p.add_argument("--state-dir", default=os.environ.get("SGCTL_STATE_DIR", "/var/lib/sgctl"),
                   help="where the last applied state is kept")
    p.add_argument("--conntrack-max", type=int,
                   default=int(os.environ.get("SGCTL_CONNTRACK_MAX", 1 << 20)),
                   help="conntrack table size (fixed when the maps are first created)")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("apply", help="replace the whole desired state with a file's content")
    a.add_argument("-f", "--file", required=True)
    a.set_defaults(fn=cmd_apply)
    s = sub.add_parser("status", help="what is bound where")
    s.add_argument("-o", "--output", choices=("table", "json"), default="table")
    s.set_defaults(fn=cmd_status)
    r = sub.add_parser("reset", help="detach everything and remove the pins")
    r.set_defaults(fn=cmd_reset)
    v = sub.add_parser("validate", help="check a file without applying it")
    v.add_argument("-f", "--file", required=True)
    v.set_defaults(fn=cmd_validate)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except ValidationError as exc:
        print(f"sgctl: invalid input, nothing changed: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except Exception as exc:  # dataplane/netlink errors: say what failed, no traceback
        from .dataplane import DataplaneError
        from .netlink import AttachError

        if isinstance(exc, (DataplaneError, AttachError, OSError)):
            print(f"sgctl: {exc}", file=sys.stderr)
            return EXIT_FAIL
        raise


if __name__ == "__main__":
    sys.exit(main())
