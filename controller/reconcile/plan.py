"""The pure half of the reconciler: from the desired state, the host's
devices and what was applied, decide everything ``converge`` writes.

Nothing here touches the kernel, sockets or files; tests run it from tables
of {desired, host, applied -> plan} without root. What only the kernel
write can tell (class ids of a written image, which endpoint values
changed) is left to ``converge``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Set, Tuple

from controller import abi
from controller.policy.compiler import Compiled, Policy
from controller.policy.errors import EnforcementError
from controller.policy.incremental import Compiler
from controller.policy.model import Settings, State, Timeouts
from controller.reconcile.applied import (
    Applied,
    EndpointRecord,
    InterfaceSummary,
    PolicyRecord,
    WorldKey,
)
from controller.reconcile.values import (
    ExemptEntries,
    dhcp_flags,
    exempt_entries,
    inline_addresses,
    local_keys_of,
)


class PlanError(EnforcementError):
    """The desired state cannot be enforced on this host as it is."""


@dataclass(frozen=True)
class Device:
    """A network device as the host has it."""
    ifindex: int
    link_type: int  # ARPHRD_*


HostDevices = Mapping[str, Optional[Device]]  # device name -> the device (None: absent)


@dataclass(frozen=True)
class KernelView:
    """What the plan needs to know of the kernel beyond the applied record."""

    images: FrozenSet[int] = frozenset()  # policy ids whose image this process wrote
    ep_ids: FrozenSet[int] = frozenset()  # endpoint ids the kernel's endpoints hold
    max_policy_id: int = 0  # the highest policy id a kernel endpoint names
    ct_ring: int = 0  # half-open slots to share out among the interfaces (sg_ct_ring)
    ct_max: int = 0  # the conntrack table's size


@dataclass
class PolicyWrite:
    """Write a group set's compiled policy under ``target``: its inactive id
    (``base`` = target: only the difference from what it holds) or a fresh
    id (``base`` None: everything)."""

    name: str
    target: int
    base: Optional[int]
    policy: Policy
    fingerprint: str
    ids: List[int]  # the group set's ids afterwards, active first

    def record(self, world: Dict[WorldKey, int], peers: int = 0, classes: int = 0,
               written: int = 0) -> PolicyRecord:
        """The applied record once written (``world``: the image's world classes)."""
        return PolicyRecord(active=self.target, ids=self.ids, fingerprint=self.fingerprint,
                            open_all=self.policy.open_all, world=world, peers=peers,
                            classes=classes, written=written)


@dataclass
class EndpointPlan:
    """A bound device's endpoint: its id and what its value is made of (the
    world classes come from the written image)."""

    eni_id: str
    record: EndpointRecord
    new_id: bool  # a fresh (or reused) endpoint id: its counters start at zero
    timeouts: Timeouts
    mac: Optional[str]
    inline: Tuple[bytes, bytes] = (b"", b"")  # values.inline_addresses


@dataclass
class Plan:
    rule_index: Dict[str, int]  # rule id -> kernel rule number
    reused_rules: List[int]  # numbers given to new rules: their hit counters start at zero
    next_rule_index: int
    compiled: Compiled
    kept: Dict[str, PolicyRecord]  # group sets whose policy is unchanged
    writes: List[PolicyWrite]
    next_policy_id: int
    endpoints: List[EndpointPlan]
    cut: Dict[int, Set[bytes]]  # ep id -> own addresses, where the interface lost some
    local: Dict[bytes, abi.LocalKey]  # sg_local_addrs as it must end
    exempt: ExemptEntries
    exempt_flags: int
    gone: Dict[str, EndpointRecord]  # endpoints to forget (flush their connections)
    unbind: List[int]  # devices to detach
    dead_policies: List[int]  # policy ids nobody uses afterwards
    unknown_policies: bool  # some live policy id has an image this process did not write
    pending: List[str]  # bound interfaces whose device does not exist (yet)
    summary: Dict[str, InterfaceSummary] = field(default_factory=dict)

    def recorded(self, policies: Dict[str, PolicyRecord], next_class_id: int,
                 prog_ids: List[int], desired: Optional[Dict[str, Any]]) -> Applied:
        """What the applied record holds once the plan is executed."""
        return Applied(endpoints={ep.eni_id: ep.record for ep in self.endpoints},
                       policies=policies, next_policy_id=self.next_policy_id,
                       rule_index=self.rule_index, next_rule_index=self.next_rule_index,
                       next_class_id=next_class_id, prog_ids=prog_ids, summary=self.summary,
                       desired=desired)

    def policy_ids(self) -> Dict[str, int]:
        """Each group set's active policy id afterwards."""
        out = {name: rec.active for name, rec in self.kept.items()}
        out.update({w.name: w.target for w in self.writes})
        return out


def number_rules(applied: Applied, state: State) -> Tuple[Dict[str, int], int, List[int]]:
    """Each rule keeps its number (its hit counters, its conntrack entries'
    "admitted by") for as long as it exists. New rules get fresh numbers --
    not a recently freed one, which conntrack entries may still name --
    until the counter slots run out; then the lowest free one. Returns
    (numbers, next fresh number, numbers reused)."""
    out: Dict[str, int] = {}
    nxt = applied.next_rule_index
    reused: List[int] = []
    free: Optional[List[int]] = None  # computed once, when the slots run out
    for g in state.groups.values():
        for r in g.rules:
            num = applied.rule_index.get(r.rule_id)
            if num is None:
                if nxt < abi.RULE_SLOTS:
                    num = nxt
                    nxt += 1
                else:
                    if free is None:
                        live = {applied.rule_index.get(x.rule_id) for gg in
                                state.groups.values() for x in gg.rules} | set(out.values())
                        free = [n for n in range(abi.RULE_SLOTS - 1, 0, -1) if n not in live]
                    num = free.pop() if free else nxt
                    if num >= abi.RULE_SLOTS:
                        nxt += 1  # beyond the slots: counted as "other"
                    else:
                        reused.append(num)
            out[r.rule_id] = num
    return out, nxt, reused


def free_ep_id(used: Set[int]) -> int:
    """The lowest id no endpoint holds (not explain's probe id): ids are
    reused, so counter slots are not used up by binds over time."""
    n = 1
    while n in used or n == abi.PROBE_EP_ID:
        n += 1
    return n


def rings(ep_ids: List[int], slots: int, settings: Settings) -> Dict[int, Tuple[int, int]]:
    """Each endpoint's range of the half-open ring, of its allowance's size
    (``Settings.half_open_allowance``). Ranges follow endpoint-id order, so
    they move only when interfaces come or go (a moved range forgets which
    connections it held: they stay until they end or expire, outside the
    bound)."""
    if not ep_ids or slots <= 0:
        return {}
    size = settings.half_open_allowance(slots, len(ep_ids))
    return {ep: (i * size, size) for i, ep in enumerate(sorted(ep_ids))}


def devices_of(state: State, host: HostDevices, missing_ok: bool) -> Tuple[Dict[str, int], List[str]]:
    """eni id -> ifindex of every bound interface whose device exists, and
    the pending ones; an absent device is an error unless ``missing_ok``."""
    found: Dict[str, int] = {}
    pending: List[str] = []
    for eni in state.bound_interfaces():
        assert eni.device
        dev = host.get(eni.device)
        if dev is None:
            if missing_ok:
                pending.append(eni.eni_id)
                continue
            raise PlanError(f"{eni.eni_id}: host-interface: device {eni.device!r} "
                            "does not exist on this host")
        if dev.link_type != abi.ARPHRD_ETHER:
            raise PlanError(f"{eni.eni_id}: host-interface: device {eni.device!r} is not an "
                            f"Ethernet device (link type {dev.link_type}: "
                            f"{abi.ARPHRD_NAMES.get(dev.link_type, 'not ethernet')}); sgctl filters "
                            "Ethernet frames only")
        found[eni.eni_id] = dev.ifindex
    return found, pending


def plan(state: State, host: HostDevices, applied: Applied,
         kernel: KernelView = KernelView(), missing_ok: bool = False,
         compiler: Optional[Compiler] = None) -> Plan:
    """Everything that can fail on the input fails here, before any write.
    ``compiler``: the one that compiled the last plan (it starts from what
    it found then); by default a fresh one."""
    rule_index, next_rule, reused = number_rules(applied, state)
    compiled = (compiler or Compiler()).compile(state, rule_index=rule_index)
    ifindexes, pending = devices_of(state, host, missing_ok)

    # 1. policies: an unchanged group set keeps its ids; a changed one gets
    #    its difference written into its inactive id (or a fresh id)
    next_pid = max(applied.next_policy_id, kernel.max_policy_id + 1)
    kept: Dict[str, PolicyRecord] = {}
    writes: List[PolicyWrite] = []
    drop: List[int] = []
    for groups, pol in compiled.policies.items():
        name = ",".join(groups)
        old = applied.policies.get(name)
        fp = pol.fingerprint()
        if old is not None and old.fingerprint == fp:
            kept[name] = old
            continue
        active = old.active if old else None
        inactive = next((i for i in (old.ids if old else []) if i != active), None)
        if inactive is not None and inactive in kernel.images:
            target, base = inactive, inactive
        else:
            while next_pid in kernel.images:  # left by a failed write: never reused as is
                next_pid += 1
            target, base = next_pid, None
            next_pid += 1
            if inactive is not None:
                drop.append(inactive)
        writes.append(PolicyWrite(name, target, base, pol, fp,
                                  [target] + ([active] if active else [])))

    # 2. endpoints: an interface keeps its endpoint id while its device
    #    does; an unbound interface's id is free for reuse only from the
    #    next change on (its addresses are gone by then)
    endpoints: List[EndpointPlan] = []
    cut: Dict[int, Set[bytes]] = {}
    local: Dict[bytes, abi.LocalKey] = {}
    used: Optional[Set[int]] = None  # needed only when an interface needs a new id
    for eni in state.bound_interfaces():
        if eni.eni_id not in ifindexes:
            continue
        idx = ifindexes[eni.eni_id]
        old_ep = applied.endpoints.get(eni.eni_id)
        new_id = not (old_ep and old_ep.ifindex == idx)
        if old_ep and not new_id:
            ep_id = old_ep.ep_id
        else:
            if used is None:
                used = {ep.ep_id for ep in applied.endpoints.values()} | set(kernel.ep_ids)
            ep_id = free_ep_id(used)
            used.add(ep_id)
        addrs = eni.own_addresses()
        own = sorted(str(a) for a in addrs)
        rec = EndpointRecord(ifindex=idx, ep_id=ep_id, device=eni.device, mode=eni.mode,
                             policy=",".join(eni.groups), own=own, check=eni.source_dest_check,
                             xdp_mode=old_ep.xdp_mode if old_ep and not new_id else None)
        endpoints.append(EndpointPlan(eni.eni_id, rec, new_id, eni.timeouts, eni.mac_address,
                                      inline_addresses(eni)))
        local.update(local_keys_of(eni, ep_id))
        if old_ep and not new_id and eni.source_dest_check and (
                not old_ep.check or not set(old_ep.own) <= set(own)):
            cut[ep_id] = {a.packed for a in addrs}  # connections on lost addresses go

    ring = rings([ep.record.ep_id for ep in endpoints], kernel.ct_ring, state.settings)
    limit = state.settings.connection_limit(kernel.ct_max, len(endpoints))
    for ep in endpoints:
        ep.record.ring = ring.get(ep.record.ep_id, (0, 0))
        ep.record.ct_limit = limit if ep.record.ep_id < abi.COUNTER_SLOTS else 0

    # 3. endpoints that went away; 4. policy ids nobody uses any more
    now = {p.eni_id: p.record for p in endpoints}
    gone = {e: ep for e, ep in applied.endpoints.items()
            if e not in now or now[e].ifindex != ep.ifindex}
    live_idx = {r.ifindex for r in now.values()}
    unbind = sorted({ep.ifindex for ep in gone.values() if ep.ifindex not in live_idx})
    live_ids = {i for r in kept.values() for i in r.ids} | {i for w in writes for i in w.ids}
    known = {i for r in applied.policies.values() for i in r.ids}
    dead = (known - live_ids) | set(drop) | (set(kernel.images) - live_ids)
    images_after = (set(kernel.images) | {w.target for w in writes}) - dead

    out = Plan(rule_index=rule_index, reused_rules=reused, next_rule_index=next_rule,
               compiled=compiled, kept=kept, writes=writes, next_policy_id=next_pid,
               endpoints=endpoints, cut=cut, local=local,
               exempt=exempt_entries(state.settings), exempt_flags=dhcp_flags(state.settings),
               gone=gone, unbind=unbind, dead_policies=sorted(dead),
               unknown_policies=bool(live_ids - images_after), pending=pending)
    pids = out.policy_ids()
    out.summary = {
        eni.eni_id: InterfaceSummary(
            device=eni.device, mode=eni.mode, groups=list(eni.groups),
            rules_ingress=len(state.rules_of(eni, "ingress")),
            rules_egress=len(state.rules_of(eni, "egress")),
            policy_id=pids[",".join(eni.groups)],
            addresses=[str(a) for a in eni.addresses()],
            source_dest_check=eni.source_dest_check, pending=eni.eni_id in pending)
        for eni in state.bound_interfaces()}
    return out
