"""``sgctl daemon``: owns the dataplane, serves the API, follows the host.

Threads: the API server (one thread per request, serialised on ``lock``),
the netlink watcher (marks the host view dirty), the reconciler (re-applies
when a bound device or a watched address changed) and the conntrack GC.

A mutation is all-or-nothing: the action runs on a copy of the desired
state, the copy is validated, enforced, then stored, and only then becomes
current. Enforcement happens before the store write so that a store that
says "accepted" was enforced; a crash in between re-enforces the stored
(previous) state on restart. Shutdown (SIGTERM) stops serving and leaves
programs, maps and conntrack in place: enforcement continues, and the next
daemon adopts them without detaching anything.
"""

from __future__ import annotations

import gc
import ipaddress
import logging
import os
import select
import signal
import socket
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Tuple

from pyroute2 import IPRoute

from controller.kernel import conntrack, flowring, netlink
from controller.kernel.counters import rule_hits
from controller.kernel.dataplane import Dataplane
from controller.kernel.explain import explain
from controller.policy import actions
from controller.policy.errors import ApiError, ValidationError
from controller.policy.formats import load_document, load_text
from controller.policy.formats.text import check_object
from controller.policy.model import State, validate
from controller.reconcile.converge import Reconciler
from controller.reconcile.plan import Device, HostDevices, PlanError
from controller.service import api
from controller.service.ec2 import server as ec2server
from controller.service.ec2.server import Ec2Config
from controller.service.etcdstore import Conflict, Refused, Unavailable
from controller.service.fleet import EtcdConfig, Fleet
from controller.service.flowlog import FlowLogConfig, FlowLogger, Names
from controller.service.metrics import Metrics, Snapshot
from controller.service.status import map_fill, report
from controller.service.store import Store

log = logging.getLogger("sgctl")

RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x1, 0x10, 0x100
LINK_LOCAL6 = ipaddress.ip_network("fe80::/10")


@dataclass
class DaemonConfig:
    state_dir: str
    pin_dir: str
    socket: str = api.DEFAULT_SOCKET
    socket_mode: int = 0o600
    socket_group: Optional[str] = None
    ct_max: int = 1 << 20
    watch_addresses: bool = False  # every bound interface follows its device's addresses
    gc_interval: float = 10.0
    debounce: float = 0.005  # seconds to gather a burst of netlink events
    metrics: Optional[Tuple[str, int]] = ("127.0.0.1", 9640)  # None: no metrics endpoint
    flow_log: Optional[FlowLogConfig] = None  # None: flow logs off
    node: Optional[str] = None  # this host's name in a fleet (None: the host name)
    datastore: Optional[EtcdConfig] = None  # the fleet's etcd (None: this host's own store)
    ec2: Optional[Ec2Config] = None  # the EC2 Query endpoint (None: off)
    # a bound interface whose device is absent is pending (bound when it
    # appears); the one-shot CLI, which nobody follows, refuses it instead
    pending_ok: bool = True


def sd_notify(message: str) -> bool:
    """Tell systemd (Type=notify) about the daemon: the datagram protocol of
    sd_notify(3) on $NOTIFY_SOCKET. False when not run by systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # an abstract socket
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(path)
        s.sendall(message.encode())
    return True


@dataclass(frozen=True)
class Seen:
    """A bound interface's device as the host has it."""

    eni_id: str
    device: str
    ifindex: Optional[int]  # None: absent
    link_type: int
    addresses: Tuple[str, ...]  # global-scope addresses, when watched


HostView = Tuple[Seen, ...]


def devices_of(view: HostView) -> HostDevices:
    """The reconciler's view of the same devices."""
    return {s.device: Device(s.ifindex, s.link_type) if s.ifindex is not None else None
            for s in view}


class Daemon:
    def __init__(self, cfg: DaemonConfig) -> None:
        self.cfg = replace(cfg, node=cfg.node or socket.gethostname())
        self.store = Store(cfg.state_dir)
        self.dp = Dataplane(pin_dir=cfg.pin_dir, ct_max=cfg.ct_max)
        self.rc = Reconciler(self.dp, cfg.state_dir)
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self.dirty = threading.Event()
        self.state = validate(State())
        self.generation = 0
        self.view: Optional[HostView] = None  # host facts the enforced state was built from
        self.gc_last: Optional[conntrack.GcResult] = None
        self.threads: List[threading.Thread] = []
        self.server: Optional[Any] = None
        self.ec2: Optional[ec2server.Ec2Server] = None
        self.started = time.time()

        self.metrics = Metrics(self.dp, self.metrics_snapshot)
        self.fleet = Fleet(cfg.datastore, self.cfg.node or "", self.fleet_state) \
            if cfg.datastore is not None else None
        self.flows: Optional[FlowLogger] = None
        self._bind_ipr: Optional[IPRoute] = None  # netlink socket of the fast binds (under lock)

    # ------------------------------------------------------------ host view

    def watched(self, here: State) -> List[str]:
        """Interfaces of ``here`` (a state for this node) that follow their
        devices' addresses."""
        return [e.eni_id for e in here.bound_interfaces()
                if e.watch_addresses or self.cfg.watch_addresses]

    def host_view(self, state: State) -> HostView:
        """For every bound interface: its device's ifindex (None = absent) and,
        when watched, the device's addresses (global scope)."""
        here = state.for_node(self.cfg.node)
        watch = set(self.watched(here))
        with IPRoute() as ipr:
            links = netlink.devices(ipr)
            addrs: Dict[int, List[str]] = {}
            if watch:
                for a in ipr.get_addr():
                    ip = ipaddress.ip_address(a.get_attr("IFA_ADDRESS"))
                    if ip.version == 6 and ip in LINK_LOCAL6:
                        continue
                    addrs.setdefault(a["index"], []).append(str(ip))
        out = []
        for eni in here.bound_interfaces():
            assert eni.device
            idx, kind = links.get(eni.device, (None, 0))
            got = tuple(sorted(addrs.get(idx, []))) if eni.eni_id in watch and idx else ()
            out.append(Seen(eni.eni_id, eni.device, idx, kind, got))
        return tuple(out)

    def effective(self, state: State, view: HostView) -> State:
        """The desired state as this node enforces it (``State.for_node``),
        watched interfaces' addresses taken from their devices (a device
        that is absent keeps the configured ones)."""
        state = state.for_node(self.cfg.node)
        watch = set(self.watched(state))
        if not watch:
            return state
        eff = state.copy()
        for seen in view:
            if seen.eni_id in watch and seen.ifindex is not None:
                eni = eff.interfaces[seen.eni_id]
                ips = [ipaddress.ip_address(a) for a in seen.addresses]
                eni.ipv4 = [a for a in ips if a.version == 4]  # type: ignore[misc]
                eni.ipv6 = [a for a in ips if a.version == 6]  # type: ignore[misc]
        return eff

    # ------------------------------------------------------------ enforcement

    def enforce(self, state: State, previous: Optional[State] = None) -> int:
        """Converge on ``state`` with the host's devices and (watched)
        addresses; on failure the reconciler re-enforces ``previous``."""
        view = self.host_view(state)
        before = self.effective(previous, self.view or ()) if previous is not None else None
        done = self.rc.converge(self.effective(state, view), previous=before,
                                missing_ok=self.cfg.pending_ok, host=devices_of(view))
        self.view = view
        if done.cut:
            log.info("revalidate: %d connections the policy no longer allows were cut", done.cut)
        return done.cut

    def commit(self, new: State) -> int:
        """Validate, enforce, store, make current; on failure nothing changes.
        Returns the connections revalidation cut."""
        try:
            validate(new)
        except ValidationError as exc:
            raise ApiError(exc.code, str(exc)) from None
        start = time.monotonic()
        try:  # any failure (NetlinkError is not an OSError): generation N is restored
            cut = self.enforce(new, previous=self.state)
        except PlanError as exc:  # the state names devices this host cannot filter
            raise ApiError("InvalidParameterValue", str(exc)) from None
        except Exception as exc:
            log.error("enforcing generation %d failed: %s", self.generation + 1, exc)
            raise ApiError("InternalError", f"the dataplane refused the change: {exc}",
                           500) from None
        self.store.save(self.generation + 1, new)
        self.state = new
        self.generation += 1
        self.metrics.apply_seconds.observe(time.monotonic() - start)
        log.info("generation %d enforced in %.1f ms", self.generation,
                 (time.monotonic() - start) * 1000)
        return cut

    # ------------------------------------------------------------ the fleet

    def fleet_state(self, new: State, revision: int) -> None:
        """A state from the fleet's etcd: enforced like a local change, and
        kept in the state dir (what this agent enforces if it restarts while
        etcd is away). Called by the fleet's thread."""
        with self.lock:
            self.enforce(new, previous=self.state)
            self.store.save(revision, new)
            self.state, self.generation = new, revision
        log.info("fleet: revision %d enforced", revision)
        if self.fleet is not None and self.server is not None:  # what this node binds now
            try:
                self.fleet.register(self.bound_here())
            except Exception as exc:  # the heartbeat tries again
                log.warning("fleet: node registration: %s", exc)

    def fleet_write(self, action: str, params: Dict[str, Any]) -> Dict[str, Any]:
        """A change through the fleet: one compare-and-swap transaction in
        etcd (on the state the watch delivered; on a fresh read when another
        write won), answered once this agent enforces it. Every agent
        converges through its watch."""
        assert self.fleet is not None
        if action == "CreateNetworkInterface" and params.get("Node") is None:
            params = {**params, "Node": self.cfg.node}  # by default, an interface of this node
        doc = self.parse_document(params) if action == "Apply" else None

        def change(state: State) -> Tuple[State, Dict[str, Any]]:
            if doc is not None:  # Apply: the whole state, whatever it was
                return doc, {}
            return state, actions.run(state, action, params)
        try:
            answer, revision = self.fleet.write(change)
        except Unavailable as exc:
            raise ApiError("ServiceUnavailable", f"etcd is unreachable, nothing was written: "
                           f"{exc}", 503) from None
        except Conflict as exc:
            raise ApiError("Conflict", str(exc), 409) from None
        except Refused as exc:  # (a change larger than etcd's --max-txn-ops allows)
            raise ApiError("RequestLimitExceeded", f"{exc}; nothing was written", 400) from None
        except ValidationError as exc:
            raise ApiError(exc.code, str(exc)) from None
        if not self.fleet.wait_applied(revision):
            log.warning("fleet: revision %d written but not yet enforced here", revision)
        log.info("%s accepted (revision %d)", action, revision)
        return self.applied_answer(doc, 0) if doc is not None else answer

    def fleet_status(self) -> Dict[str, Any]:
        assert self.fleet is not None
        h = self.fleet.health
        return {"datastore": "etcd", "node": self.cfg.node, "revision": h.revision,
                "stale_since": None if h.stale_since is None else time.strftime(
                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime(h.stale_since)),
                "error": h.last_error or None, "nodes": self.fleet.nodes()}

    def bound_here(self) -> List[str]:
        return sorted(self.rc.applied().endpoints)

    # ------------------------------------------------------------ API

    def handle(self, action: str, params: Dict[str, Any]) -> Dict[str, Any]:
        fn = actions.ACTIONS.get(action)
        if self.fleet is not None and (action == "Apply" or (fn is not None and fn[1])):
            return self.fleet_write(action, params)
        if action == "Apply":  # parsed and validated before the lock: a big or
            new = self.parse_document(params)  # hostile document holds up nobody else
            with self.lock:
                return self.act_apply(new)
        own = {"DescribeStatus": self.act_status,
               "DescribeConntrack": self.act_conntrack, "FlushConntrack": self.act_flush,
               "Explain": self.act_explain, "GetFlowLogRecords": self.act_flow_records,
               "FlushFlowLogs": self.act_flow_flush}
        with self.lock:
            if action in own:
                return own[action](params)
            fn = actions.ACTIONS.get(action)
            if fn is None or not fn[1]:
                result = actions.run(self.state, action, params)
                if action == "DescribeSecurityGroupRules":
                    self.add_hits(result["SecurityGroupRules"])
                return result
            # A change allocates a lot and keeps most of it: no cyclic GC while
            # it runs, and what survives is frozen out of later collections
            # (the state is acyclic; a full collection of a 10k-rule state
            # costs tens of milliseconds).
            gc.disable()
            try:
                new = self.state.copy()
                result = actions.run(new, action, params)
                self.commit(new)
            finally:
                gc.enable()
            gc.freeze()
            log.info("%s accepted", action)
            return result

    def add_hits(self, rules: List[Dict[str, Any]]) -> None:
        """Each rule's hit counters (sum over CPUs) and last hit (UTC)."""
        numbers = self.rc.applied().rule_index
        clock = conntrack.WallClock.read(self.dp)
        for r in rules:
            pk, by, last = rule_hits(self.dp, numbers.get(r["SecurityGroupRuleId"], 0))
            r["Hits"] = {"Packets": pk, "Bytes": by, "LastHit": None if not pk else time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(clock.of(last)))}

    @staticmethod
    def parse_document(params: Dict[str, Any]) -> State:
        doc = params.get("Document")
        if doc is None:
            raise ApiError("MissingParameter", "The request must contain the parameter Document")
        name = params.get("StackName") or "stack"
        if not isinstance(name, str):
            raise ApiError("InvalidParameterValue", f"StackName {name!r} is not a string")
        try:
            if isinstance(doc, str):
                return load_text(doc, name)
            check_object(doc)
            return load_document(doc, name)
        except ValidationError as exc:
            raise ApiError(exc.code, str(exc)) from None

    def act_apply(self, new: State) -> Dict[str, Any]:
        return self.applied_answer(new, self.commit(new))

    def applied_answer(self, new: State, cut: int) -> Dict[str, Any]:
        for w in new.warnings:
            log.warning("apply: %s", w)
        return {"Return": True, "Generation": self.generation,
                "Groups": len(new.groups), "Rules": sum(len(g.rules) for g in new.groups.values()),
                "Interfaces": len(new.interfaces),
                "StaleRules": [r.rule_id for r in new.stale_rules], "Warnings": new.warnings,
                "ConnectionsCut": cut}

    def act_status(self, params: Dict[str, Any]) -> Dict[str, Any]:
        live = self.gc_last.live if self.gc_last else None
        out = report(self.dp, self.rc.applied(), live,
                     self.gc_last.half_open if self.gc_last else None)
        if params.get("Maps"):
            out["maps"] = map_fill(self.dp, sum(live.values()) if live is not None else None)
        if self.server is not None:  # (not in the one-shot CLI's process)
            out["daemon"] = {"pid": os.getpid(), "generation": self.generation,
                             "programs": self.dp.prog_tag(),
                             "uptime": int(time.time() - self.started),
                             "conntrack_max": self.dp.ct_max,
                             "conntrack_entries": sum(live.values()) if live else 0,
                             "last_gc": self.gc_last.__dict__ if self.gc_last else None}
        if self.flows is not None:
            out["flow_logs"] = self.flows.stats()
        if self.fleet is not None:
            out["fleet"] = self.fleet_status()
        return out

    def _ep_ids(self, params: Dict[str, Any]) -> Optional[List[int]]:
        eni = params.get("NetworkInterfaceId")
        if eni is None:
            return None
        if not isinstance(eni, str):
            raise ApiError("InvalidParameterValue", f"NetworkInterfaceId {eni!r} is not a string")

        ep = self.rc.applied().find_endpoint(eni)
        if ep is None:
            raise ApiError("InvalidNetworkInterfaceID.NotFound",
                           f"{eni} is not an interface (or device) bound on this host")
        return [ep.ep_id]

    def act_conntrack(self, params: Dict[str, Any]) -> Dict[str, Any]:
        conns = conntrack.connections(self.dp, self._ep_ids(params))
        names = {ep.ep_id: e for e, ep in self.rc.applied().endpoints.items()}
        return {"Connections": [{**c.as_dict(), "interface": names.get(c.ep_id)} for c in conns]}

    def act_explain(self, params: Dict[str, Any]) -> Dict[str, Any]:
        view = self.view if self.view is not None else self.host_view(self.state)
        bound = {e: ep.ifindex for e, ep in self.rc.applied().endpoints.items()}
        return explain(self.dp, self.effective(self.state, view), params, bound)

    def act_flush(self, params: Dict[str, Any]) -> Dict[str, Any]:
        return {"Flushed": conntrack.flush(self.dp, self._ep_ids(params))}

    def _flows_on(self) -> FlowLogger:
        if self.flows is None:
            raise ApiError("InvalidParameterValue", "flow logs are off: start the daemon with "
                           "--flow-log PATH (or - for stdout)")
        return self.flows

    def act_flow_records(self, params: Dict[str, Any]) -> Dict[str, Any]:
        """Kept records after sequence ``Since``; Filters (EC2 style) on
        ``action`` (ACCEPT/REJECT) and ``interface-id`` (id or device)."""
        want: Dict[str, str] = {}
        filters = params.get("Filters") or []
        if not isinstance(filters, list) or not all(isinstance(f, dict) for f in filters):
            raise ApiError("InvalidParameterValue", "Filters is a list of {Name, Values}")
        for f in filters:
            name, values = f.get("Name"), f.get("Values") or []
            if name not in ("action", "interface-id") or not isinstance(values, list) \
                    or len(values) != 1 or not isinstance(values[0], str):
                raise ApiError("InvalidParameterValue", f"filter {name!r}: action or "
                               "interface-id, with one value")
            want[name] = str(values[0])
        if want.get("action", "ACCEPT").upper() not in ("ACCEPT", "REJECT"):
            raise ApiError("InvalidParameterValue", f"action {want['action']!r}: ACCEPT or REJECT")
        since, limit = params.get("Since", 0), params.get("MaxResults", 1000)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                   for v in (since, limit)):
            raise ApiError("InvalidParameterValue", "Since and MaxResults are integers >= 0")
        return self._flows_on().query(since, want.get("interface-id"), want.get("action"), limit)

    def act_flow_flush(self, params: Dict[str, Any]) -> Dict[str, Any]:
        """End the capture window now (operators before a look; tests)."""
        return {"Records": len(self._flows_on().close_window())}

    def flow_names(self) -> Names:
        """ep_id -> (interface, device); rule number -> (rule id, group id)."""
        with self.lock:
            applied = self.rc.applied()
            eps = {ep.ep_id: (eni, ep.device or "-")
                   for eni, ep in applied.endpoints.items()}
            group_of = {r.rule_id: g.group_id for g in self.state.groups.values()
                        for r in g.rules}
            rules = {n: (rid, group_of.get(rid, "-")) for rid, n in applied.rule_index.items()}
        return eps, rules

    def metrics_snapshot(self) -> Snapshot:
        with self.lock:
            applied = self.rc.applied()
            return Snapshot(endpoints=dict(applied.endpoints), rule_index=applied.rule_index,
                            rules=[(g.group_id, r.rule_id) for g in self.state.groups.values()
                                   for r in g.rules],
                            generation=self.generation,
                            live=self.gc_last.live if self.gc_last else None,
                            half_open=self.gc_last.half_open if self.gc_last else {},
                            flows=self.flows)

    def health(self) -> Dict[str, Any]:
        return {"ok": True, "generation": self.generation, "pid": os.getpid()}

    # ------------------------------------------------------------ threads

    def _spawn(self, name: str, fn: Any) -> None:
        t = threading.Thread(target=fn, name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def watch_netlink(self) -> None:
        with IPRoute() as ipr:
            ipr.bind(groups=RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)
            while not self.stopping.is_set():
                ready, _, _ = select.select([ipr], [], [], 0.5)
                if ready:
                    for msg in ipr.get():
                        if msg.get("event") == "RTM_NEWLINK":
                            self.bind_new_device(msg.get_attr("IFLA_IFNAME"), msg["index"],
                                                 msg.get("ifi_type"))
                    self.dirty.set()

    def bind_new_devices(self, view: HostView) -> None:
        """Devices present but not bound yet: the fast bind first (whichever
        thread sees a new device first binds it this way)."""
        bound = {e: ep.ifindex for e, ep in self.rc.applied().endpoints.items()}
        for seen in view:
            if seen.ifindex is not None and bound.get(seen.eni_id) != seen.ifindex:
                self.bind_new_device(seen.device, seen.ifindex, seen.link_type)

    def bind_new_device(self, name: Optional[str], idx: int,
                        link_type: Optional[int] = None) -> None:
        """A device of a bound interface appeared (or came back under a new
        ifindex): bind it now, from this thread, instead of after the
        reconciler's debounce and full apply (which still follow)."""
        if not name:
            return
        with self.lock:
            eni = next((e for e in self.state.for_node(self.cfg.node).bound_interfaces()
                        if e.device == name), None)
            if eni is None:
                return
            start = time.monotonic()
            try:
                eff = self.effective(self.state, self.view or ())  # addresses as last enforced
                if self._bind_ipr is None:  # one socket for every bind (opening one costs ms)
                    self._bind_ipr = IPRoute()
                if self.rc.bind(eff.interfaces[eni.eni_id], idx, self._bind_ipr, link_type):
                    log.info("%s: device %s (ifindex %d) bound in %.1f ms after it appeared",
                             eni.eni_id, name, idx, (time.monotonic() - start) * 1000)
            except Exception as exc:  # the reconciler's full apply retries
                log.error("%s: binding %s at once failed: %s", eni.eni_id, name, exc)
                if self._bind_ipr is not None:  # a socket in an unknown state: a new one next
                    self._bind_ipr.close()
                    self._bind_ipr = None

    def reconcile_loop(self) -> None:
        while not self.stopping.is_set():
            if not self.dirty.wait(0.5):
                continue
            try:  # a device that appeared is bound first, the burst gathered after
                with self.lock:
                    self.bind_new_devices(self.host_view(self.state))
            except Exception as exc:
                log.error("binding new devices failed: %s", exc)
            time.sleep(self.cfg.debounce)
            self.dirty.clear()
            try:
                with self.lock:
                    view = self.host_view(self.state)
                    if view != self.view:
                        self.bind_new_devices(view)
                        start = time.monotonic()
                        self.enforce(self.state)
                        self.metrics.apply_seconds.observe(time.monotonic() - start)
                        log.info("host changed; re-enforced in %.1f ms",
                                 (time.monotonic() - start) * 1000)
            except Exception as exc:  # keep watching; the next event retries
                log.error("reconcile failed: %s", exc)

    def gc_loop(self) -> None:
        while not self.stopping.wait(self.cfg.gc_interval):
            try:
                self.gc_last = conntrack.gc(self.dp)
                if self.gc_last.removed:
                    log.info("conntrack gc: %d of %d entries expired (%.1f ms)",
                             self.gc_last.removed, self.gc_last.scanned,
                             self.gc_last.seconds * 1000)
            except Exception as exc:
                log.error("conntrack gc failed: %s", exc)

    # ------------------------------------------------------------ life cycle

    @property
    def pidfile(self) -> str:
        return os.path.join(self.cfg.state_dir, "daemon.pid")

    def open(self) -> None:
        """The stored state becomes the current one. Enough to answer calls
        in this process (``sgctl`` with no daemon running: the same actions,
        the same commit), without serving and without enforcing anything
        until a call changes the state."""
        stored = self.store.load()
        if stored is not None:
            self.state, self.generation = stored.state, stored.generation

    def start(self) -> None:
        # announced first: a CLI started meanwhile waits for the socket instead
        # of changing the maps one-shot under the starting daemon
        os.makedirs(self.cfg.state_dir, exist_ok=True)
        with open(self.pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
        self.open()
        self.dp.programs()
        for name in ("sg_endpoints", "sg_conntrack", "sg_config", "sg_verdicts"):
            self.dp.map(name)  # opened once, before threads share them
        with self.lock:
            self.enforce(self.state)  # the last state (from the fleet: as it was cached)
        if self.fleet is not None and not self.fleet.sync():  # then the fleet's current one
            log.error("fleet: etcd unreachable at start: enforcing the cached generation %d",
                      self.generation)
        self.gc_last = conntrack.gc(self.dp)
        log.info("generation %d enforced (%d groups, %d interfaces); programs %s",
                 self.generation, len(self.state.groups), len(self.state.interfaces),
                 self.dp.prog_tag())
        # flow logs before the API: a request (FlushFlowLogs, status) or a
        # packet in between would find them off though configured on
        if self.cfg.flow_log is not None:
            self.flows = FlowLogger(self.dp, self.cfg.flow_log, self.flow_names)
            self.flows.start()
            self.dp.retire = self.flows.retire
            flows = self.flows
            self._spawn("flowlog", lambda: flows.run(self.stopping))
            log.info("flow logs to %s, %d s windows", ", ".join(self.cfg.flow_log.outputs),
                     self.cfg.flow_log.window)
        else:
            flowring.switch_off(self.dp)  # a previous daemon's: nobody reads it now
        self.server = api.serve(self.cfg.socket, self.handle, self.health,
                                self.cfg.socket_mode, self.cfg.socket_group)
        self._spawn("api", self.server.serve_forever)
        self._spawn("netlink", self.watch_netlink)
        self._spawn("reconcile", self.reconcile_loop)
        self._spawn("gc", self.gc_loop)
        if self.fleet is not None:
            fleet = self.fleet
            try:
                fleet.register(self.bound_here())
            except Exception as exc:  # the heartbeat retries
                log.error("fleet: registering node %s failed: %s", self.cfg.node, exc)
            self._spawn("fleet", lambda: fleet.run(self.stopping))
            self._spawn("heartbeat", lambda: fleet.heartbeat(self.stopping, self.bound_here))
        log.info("serving on %s", self.cfg.socket)
        if self.cfg.ec2 is not None:
            ec2 = ec2server.serve(self.cfg.ec2, self.handle, lambda action, code:
                                  self.metrics.ec2_requests.labels(action, code).inc())
            self.ec2 = ec2
            self._spawn("ec2", ec2.serve_forever)
            log.info("EC2 endpoint on %s://%s", "https" if self.cfg.ec2.tls_cert else "http",
                     self.cfg.ec2.address)
        # ready only now: the stored policy is enforced on every device there is
        sd_notify(f"READY=1\nSTATUS=generation {self.generation} enforced on "
                  f"{len(self.rc.applied().endpoints)} devices")
        if self.cfg.metrics is not None:
            try:
                self.metrics.serve(*self.cfg.metrics)
                log.info("metrics on http://%s:%d/metrics", *self.cfg.metrics)
            except OSError as exc:  # enforcement matters more than its metrics
                log.error("metrics endpoint %s:%d not started: %s", *self.cfg.metrics, exc)

    def stop(self) -> None:
        sd_notify("STOPPING=1")
        self.stopping.set()
        self.metrics.stop()
        if self.ec2 is not None:
            self.ec2.shutdown()
            self.ec2.server_close()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            try:
                os.unlink(self.cfg.socket)
            except FileNotFoundError:
                pass
        for t in self.threads:
            t.join(timeout=2)
        if self.flows is not None:
            self.flows.stop()
        if self._bind_ipr is not None:
            self._bind_ipr.close()
        self.dp.close()
        try:
            os.unlink(self.pidfile)
        except FileNotFoundError:
            pass
        log.info("stopped; enforcement stays in place")

    def run(self) -> None:
        """Foreground until SIGTERM/SIGINT."""
        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        self.start()
        try:
            while not done.wait(1.0):
                pass
        finally:
            self.stop()
