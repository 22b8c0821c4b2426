"""The half of the reconciler that writes: read the host and the kernel,
plan (pure, plan.py), then execute the plan -- the one code path that writes
policy to the kernel -- and record what was applied.

Write order (the grace-period order of the policy switch): rule counters of
reused numbers; changed policies' images (into an inactive id only after a
grace period); the endpoints' addresses; each endpoint's value in one update
(the switch); connections on lost addresses; exemptions; attach; then, after
the switch, detach what went away, flush its connections, drop addresses no
one has, and -- after another grace period -- delete dead policy ids and
unused classes. A failure after the first endpoint write unbinds the devices
this call bound; ``converge(previous=...)`` then re-applies the previous state.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import orjson
from pyroute2 import IPRoute

from controller import abi
from controller.kernel import conntrack, counters, netlink
from controller.kernel.dataplane import Dataplane
from controller.kernel.endpoints import (
    add_local,
    kernel_endpoints,
    remove_local,
    sync_exempt,
    unbind,
    write_endpoint,
)
from controller.kernel.files import write_atomic
from controller.policy.incremental import Compiler
from controller.policy.model import NetworkInterface, State
from controller.reconcile.applied import Applied, EndpointRecord, PolicyRecord
from controller.reconcile.plan import Device, HostDevices, KernelView, Plan, free_ep_id, plan
from controller.reconcile.values import endpoint_value, inline_addresses, local_keys_of

log = logging.getLogger("sgctl")


@dataclass
class Converged:
    applied: Applied
    cut: int  # connections revalidation cut


class Reconciler:
    """Owns the applied record of one pin directory + state directory."""

    def __init__(self, dp: Dataplane, state_dir: str) -> None:
        self.dp = dp
        self.state_dir = Path(state_dir)
        self._applied: Optional[Applied] = None
        self.compiler = Compiler()  # each plan compiles from the last one's compile

    # ------------------------------------------------------------ reading

    @property
    def applied_path(self) -> Path:
        return self.state_dir / "applied.json"

    def applied(self) -> Applied:
        if self._applied is None:
            try:
                self._applied = Applied.from_json(orjson.loads(self.applied_path.read_bytes()))
            except (OSError, ValueError, TypeError, KeyError):
                self._applied = Applied()
        return self._applied

    def host(self, state: State, via: Optional[IPRoute] = None) -> HostDevices:
        """The devices the bound interfaces name, as the host has them."""
        have = netlink.devices(via)
        out: Dict[str, Optional[Device]] = {}
        for eni in state.bound_interfaces():
            assert eni.device
            found = have.get(eni.device)
            out[eni.device] = Device(*found) if found else None
        return out

    def kernel_view(self) -> KernelView:
        eps = kernel_endpoints(self.dp)
        return KernelView(images=frozenset(self.dp.written.policies.images),
                          ct_ring=self.dp.ct_ring, ct_max=self.dp.ct_max,
                          ep_ids=frozenset(int(v.ep_id) for v in eps.values()),
                          max_policy_id=max((int(v.policy_id) for v in eps.values()), default=0))

    # ------------------------------------------------------------ converging

    def converge(self, state: State, previous: Optional[State] = None, attach: bool = True,
                 missing_ok: bool = False, host: Optional[HostDevices] = None) -> Converged:
        """Make the kernel enforce ``state`` and cut the connections it no
        longer allows on interfaces that ask for it. On failure, with
        ``previous``, the previous state is enforced again before the error
        is raised (a state refused by the plan wrote nothing: nothing to restore)."""
        p = plan(state, self.host(state) if host is None else host, self.applied(),
                 self.kernel_view(), missing_ok, self.compiler)
        try:
            applied = self.execute(p, state, attach)
        except Exception as exc:
            if previous is not None:
                log.error("enforcing the new state failed, restoring the previous one: %s", exc)
                try:
                    self.converge(previous, attach=attach, missing_ok=True)
                except Exception as again:  # report both; the caller raises the first
                    log.error("restoring the previous state failed too: %s", again)
            raise
        return Converged(applied, self.revalidate(state))

    def revalidate(self, state: State) -> int:
        eps = {ep.ep_id: eni for eni, ep in self.applied().endpoints.items()}
        return conntrack.revalidate(self.dp, state, eps)

    def execute(self, p: Plan, state: State, attach: bool = True) -> Applied:
        dp, applied = self.dp, self.applied()
        progs = dp.programs() if attach else None
        ours = dp.known_prog_ids(applied.prog_ids)  # ours to replace or detach; others are refused
        if progs is not None:
            for ep in p.endpoints:
                if dp.written.attached.get(ep.record.ifindex) != progs.tag:
                    netlink.check_attachable(ep.record.ifindex, ours)
        counters.reset_rule_hits(dp, p.reused_rules)

        # 1. images of changed policies
        pm = dp.written.policies
        pm.start(applied.next_class_id)
        policies: Dict[str, PolicyRecord] = dict(p.kept)
        for w in p.writes:
            img = pm.image_of(w.policy)
            if w.base is not None:
                dp.quiesce()  # a packet may still be in the image a switch left
                written = pm.write(w.target, img, pm.images[w.base])
            else:
                written = pm.write(w.target, img, None)
            policies[w.name] = w.record(dict(img.world), len(img.peers),
                                        len(set(img.peers.values())), written)

        # 2. endpoints: addresses first, then one update each switches
        values: Dict[int, abi.Endpoint] = {}
        for ep in p.endpoints:
            if ep.new_id:
                counters.reset_counters(dp, ep.record.ep_id)
            rec = policies[ep.record.policy]
            values[ep.record.ifindex] = endpoint_value(
                ep.record.ep_id, rec.active, ep.record.mode, rec.open_all, rec.world,
                ep.timeouts, ep.record.check, ep.mac, ep.record.ring, ep.inline,
                ep.record.ct_limit)
        add_local(dp, p.local)
        switched = False
        try:
            for idx, val in values.items():
                switched |= write_endpoint(dp, idx, val)
            if p.cut:
                log.info("cut %d connections on addresses their interfaces lost",
                         conntrack.cut_foreign(dp, p.cut))
            sync_exempt(dp, p.exempt, p.exempt_flags)
            if progs is not None:
                for ep in p.endpoints:
                    idx = ep.record.ifindex
                    if dp.written.attached.get(idx) != progs.tag:
                        ep.record.xdp_mode = netlink.attach(idx, progs.xdp_fd, progs.tc_fd, ours)
                        dp.written.attached[idx] = progs.tag
        except Exception:
            # devices this call bound are unbound again (programs detached,
            # endpoint removed); the caller re-applies the previous state
            before = {ep.ifindex for ep in applied.endpoints.values()}
            for idx in set(values) - before:
                unbind(dp, idx, ours)
            raise

        # 3. after the switch: what went away
        for idx in p.unbind:
            unbind(dp, idx, ours)
        if p.gone:
            conntrack.flush(dp, {ep.ep_id for ep in p.gone.values()})
        remove_local(dp, p.local)
        # 4. dead policy ids (some were active until just now, or, in a new
        #    process, may have been), then unused classes
        if switched or p.gone:
            dp.switched()
        if p.dead_policies:
            dp.quiesce()
        for pid in p.dead_policies:
            pm.delete_policy(pid)
        pm.gc_classes(unknown_policies=p.unknown_policies)
        if progs is not None:
            dp.unpin_old_programs(progs.tag)

        # what status shows of the desired state (which the store holds)
        desired = {"settings": {"exempt": [str(n) for n in state.settings.exempt],
                                "exempt_dhcp": state.settings.exempt_dhcp,
                                "dhcp_servers": [str(n) for n in state.settings.dhcp_servers]},
                   "stale_rules": [r.rule_id for r in state.stale_rules]}
        new = p.recorded(policies, pm.next_class,
                         sorted(ours) if progs is not None else applied.prog_ids, desired)
        self.save(new)
        return new

    def save(self, applied: Applied) -> None:
        write_atomic(self.applied_path, orjson.dumps(applied.as_json()))
        self._applied = applied

    # ------------------------------------------------------------ fast bind

    def bind(self, eni: NetworkInterface, idx: int, via: Optional[IPRoute] = None,
             link_type: Optional[int] = None) -> bool:
        """The fast path for a device that has just appeared: its endpoint on
        the policy already in the kernel (a pending interface's policy is
        compiled and written with the rest), its programs attached; no
        compile, no other map touched, no file written (the full converge
        that follows records it). False when that is not possible.
        ``via``: a netlink socket to use; ``link_type``: the device's, when
        the caller has it from the RTM_NEWLINK message."""
        dp, applied = self.dp, self.applied()
        rec = applied.policies.get(",".join(eni.groups))
        old = applied.endpoints.get(eni.eni_id)
        if rec is None or (old is not None and old.ifindex == idx):
            return False
        with netlink.route(via) as ipr:
            kind = link_type if link_type is not None else netlink.link_type(idx, ipr)
            if kind != abi.ARPHRD_ETHER:
                return False
            progs = dp.programs()
            ours = dp.known_prog_ids(applied.prog_ids)
            used = {ep.ep_id for ep in applied.endpoints.values()}
            used |= {int(v.ep_id) for v in kernel_endpoints(dp).values()}
            ep_id = free_ep_id(used)
            counters.reset_counters(dp, ep_id)
            # the connection limit the others have (the converge that follows sets its own)
            limit = min((e.ct_limit for e in applied.endpoints.values() if e.ct_limit),
                        default=0) if ep_id < abi.COUNTER_SLOTS else 0
            val = endpoint_value(ep_id, rec.active, eni.mode, rec.open_all, rec.world,
                                 eni.timeouts, eni.source_dest_check, eni.mac_address,
                                 inline=inline_addresses(eni), ct_limit=limit)
            add_local(dp, local_keys_of(eni, ep_id))
            write_endpoint(dp, idx, val)
            try:
                mode = netlink.attach(idx, progs.xdp_fd, progs.tc_fd, ours, ipr, fresh=True)
            except Exception:
                unbind(dp, idx, ours)
                raise
        dp.written.attached[idx] = progs.tag
        applied.endpoints[eni.eni_id] = EndpointRecord(
            ifindex=idx, ep_id=ep_id, device=eni.device, mode=eni.mode,
            policy=",".join(eni.groups), own=sorted(str(a) for a in eni.own_addresses()),
            check=eni.source_dest_check, xdp_mode=mode, ct_limit=limit)
        if eni.eni_id in applied.summary:
            applied.summary[eni.eni_id].pending = False
        return True

    # ------------------------------------------------------------ reset

    def reset(self) -> List[str]:
        """Detach from every bound device, remove the pins and the applied
        record. Returns the devices detached from."""
        dp = self.dp
        applied = self.applied() if os.path.exists(dp.pin_dir) else Applied()
        ids = dp.known_prog_ids(applied.prog_ids)
        done = []
        for ep in applied.endpoints.values():
            netlink.detach(ep.ifindex, ids)
            done.append(ep.device or str(ep.ifindex))
        for idx in kernel_endpoints(dp):
            netlink.detach(idx, ids)
        dp.remove_pins()
        self._applied = None
        self.applied_path.unlink(missing_ok=True)
        return done
