"""The ``sgctl`` command line. ``apply``/``status``/``conntrack`` go through
the daemon when one answers on the socket and work one-shot otherwise; the
EC2-shaped subcommands (commands.py) need the daemon."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import List, Optional

from controller.cli.commands import add_commands, params_of, print_table
from controller.kernel import conntrack
from controller.kernel.dataplane import Dataplane, DataplaneError
from controller.kernel.netlink import AttachError
from controller.policy.actions import ApiError
from controller.policy.formats import cfn, load_file, read_document
from controller.policy.model import ValidationError
from controller.reconcile.converge import Reconciler
from controller.reconcile.plan import PlanError
from controller.service import api
from controller.service.daemon import Daemon, DaemonConfig
from controller.service.flowlog import DEFAULT_FORMAT, FlowLogConfig, text_line
from controller.service.metrics import parse_address
from controller.service.status import map_fill, report
from controller.service.status import print_table as print_status
from controller.service.store import Store

EXIT_OK, EXIT_FAIL, EXIT_INVALID, EXIT_DISAGREE = 0, 1, 2, 3


def _daemon_running(args: argparse.Namespace, wait: float = 90.0) -> bool:
    """True when a daemon answers on the socket. A daemon that is still
    starting (its pid file names a live process) is waited for, so that a
    command never falls back to one-shot mode under it."""

    if api.ping(args.socket):
        return True
    try:
        pid = int(open(os.path.join(args.state_dir, "daemon.pid")).read())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False  # no daemon, or a stale pid file (crash / kill -9)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if api.ping(args.socket):
            return True
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        time.sleep(0.1)
    raise OSError(f"daemon pid {pid} does not answer on {args.socket}")


def _call(args: argparse.Namespace, action: str, params: dict) -> dict:

    with api.Client(args.socket) as c:
        return c.call(action, params)


def _reconciler(args: argparse.Namespace) -> Reconciler:
    return Reconciler(Dataplane(pin_dir=args.pin_dir, ct_max=args.conntrack_max), args.state_dir)


def cmd_apply(args: argparse.Namespace) -> int:

    if _daemon_running(args):

        text = read_document(args.file)
        out = _call(args, "Apply", {"Document": text, "StackName": cfn.stack_name_for(args.file)})
        for w in out.get("Warnings", []):
            print(f"warning: {w}", file=sys.stderr)
        for rid in out["StaleRules"]:
            print(f"warning: rule {rid} references a group that does not exist (stale)",
                  file=sys.stderr)
        print(f"applied {args.file} through the daemon: {out['Groups']} groups, {out['Rules']} "
              f"rules, {out['Interfaces']} interfaces (generation {out['Generation']})")
        return EXIT_OK
    state = load_file(args.file)  # raises ValidationError before anything changes
    for w in state.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for rule in state.stale_rules:
        print(f"warning: {rule.group_id} {rule.rule_id}: references group {rule.peer.value}, "
              "which does not exist (stale: matches nothing)", file=sys.stderr)
    rc = _reconciler(args)
    try:
        store = Store(args.state_dir)  # a daemon started later enforces this state
        prev = store.load()
        done = rc.converge(state, previous=prev.state if prev else None)
        if done.cut:
            print(f"revalidate: cut {done.cut} connections the policy no longer allows")
        store.save(prev.generation + 1 if prev else 1, state)
    finally:
        rc.dp.close()
    bound = len(done.applied.endpoints)
    rules = sum(len(g.rules) for g in state.groups.values())
    print(f"applied {args.file}: {len(state.groups)} groups, {rules} rules, "
          f"{len(state.interfaces)} interfaces ({bound} bound here)")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:

    if _daemon_running(args):
        out = _call(args, "DescribeStatus", {"Maps": args.maps})
    else:
        rc = _reconciler(args)
        try:
            if not os.path.exists(f"{args.pin_dir}/sg_endpoints"):
                print(f"nothing applied (no pinned maps under {args.pin_dir})")
                return EXIT_OK
            out = report(rc.dp, rc.applied())
            if args.maps:
                out["maps"] = map_fill(rc.dp)
        finally:
            rc.dp.close()
    if args.output == "json":
        print(json.dumps(out, indent=2))
    else:
        print_status(out)
    return EXIT_OK


def cmd_reset(args: argparse.Namespace) -> int:
    if _daemon_running(args):
        print(f"sgctl: a daemon is serving {args.socket}; stop it before reset", file=sys.stderr)
        return EXIT_FAIL
    done = _reconciler(args).reset()
    Store(args.state_dir).remove()  # the desired state goes too: nothing is left to enforce
    print(f"detached from {len(done)} device(s); removed {args.pin_dir}")
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:

    state = load_file(args.file)
    rules = sum(len(g.rules) for g in state.groups.values())
    print(f"{args.file}: valid: {len(state.groups)} groups, {rules} rules, "
          f"{len(state.prefix_lists)} prefix lists, {len(state.interfaces)} interfaces")
    return EXIT_OK


def cmd_daemon(args: argparse.Namespace) -> int:

    flow_log = None
    try:
        metrics = parse_address(args.metrics_address)
        if args.flow_log:
            flow_log = FlowLogConfig(
                outputs=args.flow_log, format=args.flow_log_format or DEFAULT_FORMAT,
                window=args.flow_log_window,
                encoding=args.flow_log_encoding, rate=args.flow_log_rate,
                burst=args.flow_log_burst or args.flow_log_rate,
                max_bytes=args.flow_log_max_bytes, backups=args.flow_log_backups,
                account_id=args.flow_log_account_id)
            flow_log.check()
    except ValueError as exc:
        print(f"sgctl: {exc}", file=sys.stderr)
        return EXIT_INVALID
    logging.basicConfig(level=logging.INFO, format="sgctl[%(process)d] %(levelname)s %(message)s")
    cfg = DaemonConfig(state_dir=args.state_dir, pin_dir=args.pin_dir, socket=args.socket,
                       socket_mode=int(args.socket_mode, 8), socket_group=args.socket_group,
                       ct_max=args.conntrack_max, watch_addresses=args.watch_addresses,
                       gc_interval=args.gc_interval,
                       metrics=metrics, flow_log=flow_log)
    Daemon(cfg).run()
    return EXIT_OK


def cmd_action(args: argparse.Namespace) -> int:

    if not _daemon_running(args):
        print(f"sgctl: no daemon answers on {args.socket} (start `sgctl daemon`)", file=sys.stderr)
        return EXIT_FAIL
    out = _call(args, args.action, params_of(args))
    if args.output == "json":
        print(json.dumps(out, indent=2))
    else:
        print_table(out)
    return EXIT_OK


def cmd_conntrack(args: argparse.Namespace) -> int:

    params = {"NetworkInterfaceId": args.interface} if args.interface else {}
    if _daemon_running(args):
        if args.op == "flush":
            print(f"flushed {_call(args, 'FlushConntrack', params)['Flushed']} entries")
            return EXIT_OK
        rows = _call(args, "DescribeConntrack", params)["Connections"]
    else:
        rc = _reconciler(args)
        try:
            if not os.path.exists(f"{args.pin_dir}/sg_conntrack"):
                print(f"nothing applied (no pinned maps under {args.pin_dir})")
                return EXIT_OK
            applied = rc.applied()
            ep_ids = None
            if args.interface:
                ep = applied.find_endpoint(args.interface)
                if ep is None:
                    print(f"sgctl: {args.interface} is not bound here", file=sys.stderr)
                    return EXIT_FAIL
                ep_ids = [ep.ep_id]
            if args.op == "flush":
                print(f"flushed {conntrack.flush(rc.dp, ep_ids)} entries")
                return EXIT_OK
            names = {ep.ep_id: e for e, ep in applied.endpoints.items()}
            rows = [{**c.as_dict(), "interface": names.get(c.ep_id)}
                    for c in conntrack.connections(rc.dp, ep_ids)]
        finally:
            rc.dp.close()
    if args.output == "json":
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    print(f"{'INTERFACE':<18} {'PROTO':<6} {'LOCAL':<28} {'REMOTE':<28} {'STATE':<12} "
          f"{'ORIGIN':<8} {'IDLE':>6} {'TIMEOUT':>8}")
    for r in rows:
        print(f"{r['interface'] or '-':<18} {r['protocol']:<6} {r['local'] + ':' + str(r['lport']):<28}"
              f" {r['remote'] + ':' + str(r['rport']):<28} {r['state']:<12} {r['origin']:<8} "
              f"{r['idle']:>6} {r['timeout']:>8}")
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    if not _daemon_running(args):
        print(f"sgctl: no daemon answers on {args.socket} (explain needs it)", file=sys.stderr)
        return EXIT_FAIL
    params = {"NetworkInterfaceId": args.interface, "Direction": args.direction,
              "Protocol": args.protocol, "Source": args.source, "Destination": args.destination,
              "Port": args.port, "SourcePort": args.source_port, "TcpFlags": args.tcp_flags,
              "IcmpType": args.icmp_type, "IcmpCode": args.icmp_code}
    out = _call(args, "Explain", params)
    if args.output == "json":
        print(json.dumps(out, indent=2))
    else:
        if out["Verdict"] == "ACCEPT":
            print(f"ACCEPT ({out['Reason']}, {'tracked' if out['Tracked'] else 'not tracked'})")
        else:
            print(f"REJECT ({out['Reason']})")
        for r in out["Rules"]:
            desc = f" -- {r['Description']}" if r["Description"] else ""
            print(f"  allowed by {r['GroupId']} {r['SecurityGroupRuleId']}: {r['Rule']}{desc}")
        if not out["Rules"] and out["Verdict"] == "REJECT":
            print("  no rule of the interface's groups allows it")
        print(f"kernel: {out['KernelReason']}")
    if not out["Agree"]:
        print(f"sgctl: DISAGREEMENT: the evaluator says {out['Reason']}, the loaded kernel "
              f"program says {out['KernelReason']}", file=sys.stderr)
        return EXIT_DISAGREE
    return EXIT_OK


def cmd_flows(args: argparse.Namespace) -> int:

    if not _daemon_running(args):
        print(f"sgctl: no daemon answers on {args.socket} (flow logs live in it)",
              file=sys.stderr)
        return EXIT_FAIL
    if args.op == "flush":
        print(f"window closed: {_call(args, 'FlushFlowLogs', {})['Records']} records")
        return EXIT_OK
    params: dict = {"MaxResults": args.lines, "Filters": [
        {"Name": name, "Values": [value]}
        for name, value in (("interface-id", args.interface), ("action", args.action)) if value]}
    while True:  # --follow: until interrupted
        out = _call(args, "GetFlowLogRecords", params)
        for r in out["Records"]:
            print(json.dumps({f: r[f] for f in out["Format"]}) if args.output == "json"
                  else text_line(r, out["Format"]))
        sys.stdout.flush()
        if not args.follow:
            return EXIT_OK
        params.update(Since=out["Next"], MaxResults=0)
        time.sleep(1.0)


def cmd_api(args: argparse.Namespace) -> int:
    out = _call(args, args.action_name, json.loads(args.json))
    print(json.dumps(out, indent=2))
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
    p.add_argument("--socket", default=os.environ.get("SGCTL_SOCKET", "/run/sgctl/api.sock"),
                   help="the daemon's API socket")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("apply", help="replace the whole desired state with a file's content")
    a.add_argument("-f", "--file", required=True)
    a.set_defaults(fn=cmd_apply)
    s = sub.add_parser("status", help="what is bound where")
    s.add_argument("-o", "--output", choices=("table", "json"), default="table")
    s.add_argument("--maps", action="store_true", help="also every map's entries and capacity")
    s.set_defaults(fn=cmd_status)
    r = sub.add_parser("reset", help="detach everything and remove the pins")
    r.set_defaults(fn=cmd_reset)
    v = sub.add_parser("validate", help="check a file without applying it")
    v.add_argument("-f", "--file", required=True)
    v.set_defaults(fn=cmd_validate)
    d = sub.add_parser("daemon", help="run the controller in the foreground, serving the API")
    d.add_argument("--socket-mode", default="600", help="octal mode of the API socket")
    d.add_argument("--socket-group", help="group owning the API socket (use with --socket-mode 660)")
    d.add_argument("--watch-addresses", action="store_true",
                   help="every bound interface takes its addresses from its device")
    d.add_argument("--gc-interval", type=float, default=10.0,
                   help="seconds between conntrack garbage collections")
    d.add_argument("--metrics-address", default="127.0.0.1:9640",
                   help="host:port of the Prometheus endpoint, or none")
    fl = d.add_argument_group("flow logs (AWS VPC Flow Logs records; off unless --flow-log)")
    fl.add_argument("--flow-log", action="append", metavar="PATH",
                    help="write records to this file (rotated), or - for stdout; repeatable")
    fl.add_argument("--flow-log-format",
                    help="AWS custom format, e.g. '${version} ${srcaddr} ${tcp-flags} "
                    "${flow-direction} ${reject-reason} ${rule-id}' (default: version 2)")
    fl.add_argument("--flow-log-window", type=int, default=60,
                    help="capture window in seconds, 1-600")
    fl.add_argument("--flow-log-encoding", choices=("text", "json"), default="text")
    fl.add_argument("--flow-log-rate", type=int, default=10000,
                    help="flow events per second per CPU the datapath may send")
    fl.add_argument("--flow-log-burst", type=int, default=0,
                    help="events a CPU may send at once (default: the rate)")
    fl.add_argument("--flow-log-max-bytes", type=int, default=100 << 20,
                    help="rotate a flow log file at this size")
    fl.add_argument("--flow-log-backups", type=int, default=5, help="rotated files kept")
    fl.add_argument("--flow-log-account-id", default="-", help="the account-id field")
    d.set_defaults(fn=cmd_daemon)
    fw = sub.add_parser("flows", help="flow log records kept by the daemon")
    fw.add_argument("op", choices=("tail", "flush"),
                    help="tail: the newest records; flush: end the capture window now")
    fw.add_argument("--interface", help="eni- id or device name")
    fw.add_argument("--action", type=str.upper, choices=("ACCEPT", "REJECT"))
    fw.add_argument("-n", "--lines", type=int, default=20, help="records to show first")
    fw.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    fw.add_argument("-o", "--output", choices=("text", "json"), default="text")
    fw.set_defaults(fn=cmd_flows)
    c = sub.add_parser("conntrack", help="list or flush tracked connections")
    c.add_argument("op", choices=("list", "flush"))
    c.add_argument("--interface", help="eni- id or device name")
    c.add_argument("-o", "--output", choices=("table", "json"), default="table")
    c.set_defaults(fn=cmd_conntrack)
    e = sub.add_parser("explain", help="the verdict on one new packet, and why (evaluator and "
                       "kernel; exit 3 if they disagree)")
    e.add_argument("--interface", required=True, help="eni- id or device")
    e.add_argument("--direction", choices=("ingress", "egress"), default="ingress")
    e.add_argument("--protocol", default="tcp")
    e.add_argument("--source", required=True)
    e.add_argument("--destination", required=True)
    e.add_argument("--port", type=int, default=0, help="destination port")
    e.add_argument("--source-port", type=int, default=40000)
    e.add_argument("--tcp-flags", default="SYN")
    e.add_argument("--icmp-type", type=int, default=8)
    e.add_argument("--icmp-code", type=int, default=0)
    e.add_argument("-o", "--output", choices=("table", "json"), default="table")
    e.set_defaults(fn=cmd_explain)
    raw = sub.add_parser("api", help="call any API action with JSON parameters")
    raw.add_argument("action_name")
    raw.add_argument("--json", default="{}")
    raw.set_defaults(fn=cmd_api)

    add_commands(sub, cmd_action)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except ValidationError as exc:
        print(f"sgctl: invalid input, nothing changed: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except ApiError as exc:
        print(f"sgctl: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_INVALID if exc.status < 500 else EXIT_FAIL
    except Exception as exc:  # dataplane/netlink errors: say what failed, no traceback

        if isinstance(exc, (DataplaneError, PlanError, AttachError, OSError)):
            print(f"sgctl: {exc}", file=sys.stderr)
            return EXIT_FAIL
        raise


if __name__ == "__main__":
    sys.exit(main())
