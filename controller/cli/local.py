"""``sgctl`` on this host itself: the daemon's actions answered in this
process when no daemon runs (``LocalBackend``: the daemon's own code, not a
copy), ``sgctl reset`` and ``sgctl daemon``. Loaded by main.py only for
those: it brings the kernel and service layers (~0.5 s of imports that a
client of a running daemon does without)."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from typing import Any, Dict, Optional

from controller.kernel.dataplane import Dataplane
from controller.reconcile.converge import Reconciler
from controller.service.daemon import Daemon, DaemonConfig
from controller.service.ec2.server import Ec2Config
from controller.service.fleet import parse_datastore
from controller.service.flowformat import DEFAULT_FORMAT
from controller.service.flowlog import FlowLogConfig
from controller.service.metrics import parse_address
from controller.service.store import Store

EXIT_OK, EXIT_INVALID = 0, 2


def config(args: argparse.Namespace, **more: Any) -> DaemonConfig:
    return DaemonConfig(state_dir=args.state_dir, pin_dir=args.pin_dir, socket=args.socket,
                        ct_max=args.conntrack_max, **more)


class LocalBackend:
    """What the API client answers, answered here: the stored state is the
    current one, a change is committed as the daemon commits it (validated,
    enforced, stored; on failure the stored state is enforced again). A
    device that does not exist is an error here (nobody binds it later)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.daemon = Daemon(config(args, metrics=None, pending_ok=False))
        self.daemon.open()

    def call(self, action: str, params: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        return self.daemon.handle(action, params or {})

    def close(self) -> None:
        self.daemon.dp.close()

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reset(args: argparse.Namespace) -> int:
    rc = Reconciler(Dataplane(pin_dir=args.pin_dir, ct_max=args.conntrack_max), args.state_dir)
    done = rc.reset()
    Store(args.state_dir).remove()  # the desired state goes too: nothing is left to enforce
    print(f"detached from {len(done)} device(s); removed {args.pin_dir}")
    return EXIT_OK


def daemon(args: argparse.Namespace) -> int:
    flow_log = None
    ec2: Optional[Ec2Config] = None
    try:
        metrics = parse_address(args.metrics_address)
        datastore = parse_datastore(args.datastore)
        if datastore is not None:
            datastore = replace(datastore, prefix=args.etcd_prefix, ca_cert=args.etcd_cacert,
                                cert=args.etcd_cert, key=args.etcd_key)
            if not datastore.prefix.endswith("/"):
                raise ValueError(f"--etcd-prefix {datastore.prefix!r} must end with /")
        if args.flow_log:
            flow_log = FlowLogConfig(
                outputs=args.flow_log, format=args.flow_log_format or DEFAULT_FORMAT,
                window=args.flow_log_window,
                encoding=args.flow_log_encoding, rate=args.flow_log_rate,
                burst=args.flow_log_burst or args.flow_log_rate,
                interface_rate=args.flow_log_interface_rate,
                max_bytes=args.flow_log_max_bytes, backups=args.flow_log_backups,
                account_id=args.flow_log_account_id)
            flow_log.check()
        if args.ec2_endpoint:
            if not args.ec2_credentials:
                raise ValueError("--ec2-endpoint needs --ec2-credentials (who may sign requests)")
            ec2 = Ec2Config(args.ec2_endpoint, args.ec2_credentials, args.ec2_tls_cert,
                            args.ec2_tls_key)
            ec2.check()
    except ValueError as exc:
        print(f"sgctl: {exc}", file=sys.stderr)
        return EXIT_INVALID
    logging.basicConfig(level=logging.INFO, format="sgctl[%(process)d] %(levelname)s %(message)s")
    Daemon(config(args, socket_mode=int(args.socket_mode, 8), socket_group=args.socket_group,
                  watch_addresses=args.watch_addresses, gc_interval=args.gc_interval,
                  node=args.node, datastore=datastore,
                  metrics=metrics, flow_log=flow_log, ec2=ec2)).run()
    return EXIT_OK
