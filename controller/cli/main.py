"""The ``sgctl`` command line. Every command that acts on the security groups
goes through the daemon when one answers on the socket, and is answered in
this process by the same code otherwise (cli/local.py); the EC2-shaped
subcommands are in commands.py."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from typing import Any, Callable, List, Optional

from controller.cli.commands import add_commands, params_of, print_table
from controller.cli.tables import print_connections, print_status
from controller.policy.errors import ApiError, EnforcementError, ValidationError
from controller.policy.formats import cfn, load_file, read_document
from controller.service import api
from controller.service.flowformat import text_line

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


def _backend(args: argparse.Namespace) -> Any:
    """Where every command's actions go: the running daemon's API, or -- when
    none runs -- the same actions answered in this process by the daemon's
    own code (cli/local.py). Both answer ``call(action, params)``."""
    if _daemon_running(args):
        return api.Client(args.socket)
    return _local().LocalBackend(args)


def _via(backend: Any) -> str:
    return " through the daemon" if isinstance(backend, api.Client) else ""


def _nothing_applied(args: argparse.Namespace) -> bool:
    """No daemon and nothing pinned: said, instead of loading the programs
    only to report that nothing is there."""
    if os.path.exists(f"{args.pin_dir}/sg_endpoints") or _daemon_running(args):
        return False
    print(f"nothing applied (no pinned maps under {args.pin_dir})")
    return True


def _local() -> Any:
    """controller/cli/local.py, loaded only by the commands that work on this
    host itself (by name: it brings the kernel and service layers, which the
    daemon's clients -- every other command -- never need)."""
    return importlib.import_module("controller.cli.local")


def _show(args: argparse.Namespace, out: Any, table: Callable[[Any], None]) -> int:
    """An answer as JSON (``-o json``) or as a table."""
    if args.output == "json":
        print(json.dumps(out, indent=2))
    else:
        table(out)
    return EXIT_OK


def cmd_apply(args: argparse.Namespace) -> int:
    text = read_document(args.file)
    with _backend(args) as b:
        out = b.call("Apply", {"Document": text, "StackName": cfn.stack_name_for(args.file)})
    for w in out.get("Warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    for rid in out["StaleRules"]:
        print(f"warning: rule {rid} references a group that does not exist (stale)",
              file=sys.stderr)
    if out.get("ConnectionsCut"):
        print(f"revalidate: cut {out['ConnectionsCut']} connections the policy no longer allows")
    print(f"applied {args.file}{_via(b)}: {out['Groups']} groups, {out['Rules']} rules, "
          f"{out['Interfaces']} interfaces (generation {out['Generation']})")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    if _nothing_applied(args):
        return EXIT_OK
    with _backend(args) as b:
        return _show(args, b.call("DescribeStatus", {"Maps": args.maps}), print_status)


def cmd_reset(args: argparse.Namespace) -> int:
    if _daemon_running(args):
        print(f"sgctl: a daemon is serving {args.socket}; stop it before reset", file=sys.stderr)
        return EXIT_FAIL
    return int(_local().reset(args))


def cmd_validate(args: argparse.Namespace) -> int:
    state = load_file(args.file)
    rules = sum(len(g.rules) for g in state.groups.values())
    print(f"{args.file}: valid: {len(state.groups)} groups, {rules} rules, "
          f"{len(state.prefix_lists)} prefix lists, {len(state.interfaces)} interfaces")
    return EXIT_OK


def cmd_daemon(args: argparse.Namespace) -> int:
    return int(_local().daemon(args))


def cmd_action(args: argparse.Namespace) -> int:
    with _backend(args) as b:
        return _show(args, b.call(args.action, params_of(args)), print_table)


def cmd_conntrack(args: argparse.Namespace) -> int:
    if _nothing_applied(args):
        return EXIT_OK
    params = {"NetworkInterfaceId": args.interface} if args.interface else {}
    with _backend(args) as b:
        if args.op == "flush":
            print(f"flushed {b.call('FlushConntrack', params)['Flushed']} entries")
            return EXIT_OK
        rows = b.call("DescribeConntrack", params)["Connections"]
    return _show(args, rows, print_connections)


def cmd_explain(args: argparse.Namespace) -> int:
    params = {"NetworkInterfaceId": args.interface, "Direction": args.direction,
              "Protocol": args.protocol, "Source": args.source, "Destination": args.destination,
              "Port": args.port, "SourcePort": args.source_port, "TcpFlags": args.tcp_flags,
              "IcmpType": args.icmp_type, "IcmpCode": args.icmp_code}
    with _backend(args) as b:
        out = b.call("Explain", params)
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
    with _backend(args) as b:
        if args.op == "flush":
            print(f"window closed: {b.call('FlushFlowLogs', {})['Records']} records")
            return EXIT_OK
        params: dict = {"MaxResults": args.lines, "Filters": [
            {"Name": name, "Values": [value]}
            for name, value in (("interface-id", args.interface), ("action", args.action))
            if value]}
        while True:  # --follow: until interrupted
            out = b.call("GetFlowLogRecords", params)
            for r in out["Records"]:
                print(json.dumps({f: r[f] for f in out["Format"]}) if args.output == "json"
                      else text_line(r, out["Format"]))
            sys.stdout.flush()
            if not args.follow:
                return EXIT_OK
            params.update(Since=out["Next"], MaxResults=0)
            time.sleep(1.0)


def cmd_api(args: argparse.Namespace) -> int:
    with _backend(args) as b:
        print(json.dumps(b.call(args.action_name, json.loads(args.json)), indent=2))
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
    d.add_argument("--node", help="this host's name in a fleet: it binds the interfaces of this "
                   "node (and those naming none); default: the host name")
    d.add_argument("--datastore", default="local",
                   help="local (this host's own store) or etcd://HOST:PORT[,HOST:PORT...] "
                   "(a fleet sharing one desired state)")
    d.add_argument("--etcd-prefix", default="/sgctl/v1/", help="the fleet's keys in etcd")
    d.add_argument("--etcd-cacert", help="CA bundle of etcd's TLS endpoints")
    d.add_argument("--etcd-cert", help="client certificate for etcd")
    d.add_argument("--etcd-key", help="client key for etcd")
    ec2 = d.add_argument_group("EC2 endpoint (the AWS CLI and SDKs; off unless --ec2-endpoint)")
    ec2.add_argument("--ec2-endpoint", metavar="HOST:PORT",
                     help="serve EC2's Query protocol here, e.g. 127.0.0.1:9650")
    ec2.add_argument("--ec2-credentials", metavar="FILE",
                     help="access keys that may sign requests: the AWS CLI's credentials "
                          "format, mode 0600")
    ec2.add_argument("--ec2-tls-cert", metavar="FILE", help="serve HTTPS with this certificate")
    ec2.add_argument("--ec2-tls-key", metavar="FILE", help="... and this key")
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
    fl.add_argument("--flow-log-interface-rate", type=int, default=0,
                    help="... of them from one interface, so a flood on one cannot silence "
                         "the others' logs (default: a quarter of --flow-log-rate)")
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
    except (EnforcementError, OSError) as exc:  # say what failed, no traceback
        print(f"sgctl: {exc}", file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
