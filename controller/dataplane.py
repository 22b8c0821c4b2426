"""The dataplane adapter: compile/load the programs with bcc, keep them and
the maps pinned, write compiled policy into the maps, attach with pyroute2.

Policy switch (DESIGN 2.3): a changed group set's entries are written under
a policy id no endpoint uses (its inactive one: only the difference; see
policymaps.py), then each endpoint's value is replaced in one map update.
Unchanged group sets are not rewritten.
"""

from __future__ import annotations

import ctypes as ct
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import orjson
from pyroute2 import IPRoute

from . import abi, bpfsys
from .compiler import FAMILY_INDEX, Compiled, compile_state, network_bytes
from .model import MODE_HOST, NetworkInterface, State, Timeouts, mac_bytes
from .policymaps import PolicyMaps
from .store import Store, write_atomic

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
DEFAULT_PIN_DIR = "/sys/fs/bpf/sgctl"
DEFAULT_STATE_DIR = "/var/lib/sgctl"
log = logging.getLogger("sgctl")


class DataplaneError(RuntimeError):
    pass


def program_source() -> str:
    """bpf/sgctl.c with its local includes inlined (bcc rewrites one file)."""
    seen: set = set()

    def expand(path: Path) -> str:
        out = [f'#line 1 "{path.relative_to(BPF_DIR)}"']
        for n, line in enumerate(path.read_text().splitlines(), 1):
            m = re.match(r'#include "([^"]+)"', line.strip())
            if m:
                inc = (path.parent / m.group(1)).resolve()
                if inc not in seen:
                    seen.add(inc)
                    out.append(expand(inc))
                out.append(f'#line {n + 1} "{path.relative_to(BPF_DIR)}"')
            else:
                out.append(line)
        return "\n".join(out)

    return expand(BPF_DIR / "sgctl.c")


@dataclass
class Programs:
    xdp_fd: int
    tc_fd: int
    tag: str


@dataclass
class Applied:
    """What was last written to the kernel (the controller's memory)."""

    endpoints: Dict[str, dict] = field(default_factory=dict)  # eni -> {ifindex, ep_id, device, ...}
    policies: Dict[str, dict] = field(default_factory=dict)  # "sg-a,sg-b" -> {policy_id, fp}
    next_policy_id: int = 1
    next_ep_id: int = 1  # unused: ids are reused now (kept so older files load)
    rule_index: Dict[str, int] = field(default_factory=dict)  # rule id -> kernel rule number
    next_rule_index: int = 1
    next_class_id: int = 1
    prog_ids: List[int] = field(default_factory=list)
    summary: Dict[str, dict] = field(default_factory=dict)  # eni -> status info
    desired: Optional[dict] = None  # native dump of the desired state


class Dataplane:
    def __init__(self, pin_dir: str = DEFAULT_PIN_DIR, state_dir: str = DEFAULT_STATE_DIR,
                 ct_max: int = 1 << 20) -> None:
        self.pin_dir = pin_dir
        self.state_dir = Path(state_dir)
        self.ct_max = ct_max
        self._maps: Dict[str, bpfsys.Map] = {}
        self._progs: Optional[Programs] = None
        # what this process wrote, so that repeated applies touch only what changed
        self._applied: Optional[Applied] = None
        self._pm = PolicyMaps(self.map)  # classification maps: classes and images
        self._attached: Dict[int, str] = {}  # ifindex -> program tag attached there
        self._ep_written: Dict[int, bytes] = {}  # ifindex -> endpoint value written
        self._local_written: Optional[Dict[bytes, abi.LocalKey]] = None  # sg_local_addrs keys
        # sees conntrack entries before anything deletes them (the flow logger)
        self.retire: Optional[Callable[[List[Tuple[Any, Any]]], None]] = None
        # Grace periods (see quiesce): a barrier started after the last switch,
        # and whether one has completed since it
        self._rcu: Optional[bpfsys.RcuBarrier] = None
        self._grace: Optional[threading.Thread] = None
        self._quiet = False

    # ------------------------------------------------------------ programs

    def cflags(self) -> List[str]:
        # SGCTL_EXTRA_CFLAGS: for developers and the upgrade test (a different
        # build of the same code, replaced on the hooks while the maps stay)
        return [f'-DSG_PIN_DIR="{self.pin_dir}"', f"-DSG_CT_MAX={self.ct_max}",
                "-Wno-unused-function", *os.environ.get("SGCTL_EXTRA_CFLAGS", "").split()]

    def source_tag(self) -> str:
        h = hashlib.sha256(program_source().encode() + " ".join(self.cflags()).encode())
        return h.hexdigest()[:12]

    def ensure_bpffs(self) -> None:
        if not os.path.ismount("/sys/fs/bpf"):
            os.makedirs("/sys/fs/bpf", exist_ok=True)
            if os.system("mount -t bpf bpf /sys/fs/bpf") != 0:
                raise DataplaneError("/sys/fs/bpf is not a bpffs mount and mounting it failed")
        os.makedirs(self.pin_dir, exist_ok=True)

    def programs(self) -> Programs:
        """Load (compile only when the code changed) and pin both programs."""
        if self._progs is not None:
            return self._progs
        self.ensure_bpffs()
        tag = self.source_tag()
        xdp_pin = f"{self.pin_dir}/prog_xdp_{tag}"
        tc_pin = f"{self.pin_dir}/prog_tc_{tag}"
        if os.path.exists(xdp_pin) and os.path.exists(tc_pin):
            self._progs = Programs(bpfsys.obj_get(xdp_pin), bpfsys.obj_get(tc_pin), tag)
            return self._progs
        from bcc import BPF  # imported late: only needed to compile

        self.drop_changed_maps()
        try:
            b = BPF(text=program_source().encode(), cflags=self.cflags())
            xdp = b.load_func(b"xdp_sg", BPF.XDP)
            tc = b.load_func(b"tc_sg", BPF.SCHED_CLS)
        except Exception as exc:  # bcc raises plain Exception on compile/verify errors
            raise DataplaneError(f"loading the BPF programs failed: {exc}") from exc
        for fd, pin in ((xdp.fd, xdp_pin), (tc.fd, tc_pin)):
            if os.path.exists(pin):
                os.unlink(pin)
            bpfsys.obj_pin(fd, pin)
        self._progs = Programs(os.dup(xdp.fd), os.dup(tc.fd), tag)
        self._bcc = b  # keep alive while this object lives
        return self._progs

    def drop_changed_maps(self) -> None:
        """Before a build: a pinned map whose key or value size differs from
        this version's layout cannot be shared with it. Its pin goes (the
        programs still attached keep using it until they are replaced) and
        the build creates the new layout; its content is lost, said loudly."""
        for name, (key_t, val_t) in abi.MAPS.items():
            path = f"{self.pin_dir}/{name}"
            if not os.path.exists(path):
                continue
            with bpfsys.Map(path, key_t, val_t) as m:
                have = m.sizes
            want = (ct.sizeof(key_t), ct.sizeof(val_t))
            if have != want:
                log.warning("map %s changed layout (key/value %s -> %s bytes): starting it "
                            "empty", name, have, want)
                os.unlink(path)

    def map(self, name: str) -> bpfsys.Map:
        if name not in self._maps:
            path = f"{self.pin_dir}/{name}"
            if not os.path.exists(path):
                self.programs()  # creates the pinned maps
            key_t, val_t = abi.MAPS[name]
            self._maps[name] = bpfsys.Map(path, key_t, val_t, name in abi.PERCPU_MAPS)
        return self._maps[name]

    # ------------------------------------------------------------ grace periods

    def _barrier(self) -> None:
        if self._rcu is None:
            self._rcu = bpfsys.RcuBarrier()
        self._rcu.wait()
        self._quiet = True

    def switched(self) -> None:
        """Endpoints now name other policies: start a grace period in the
        background (call_rcu-like), so the next change rarely waits."""
        if self._grace is not None:  # at most one running; it is done or nearly
            self._grace.join()
        self._quiet = False
        self._grace = threading.Thread(target=self._barrier, name="sgctl-rcu", daemon=True)
        self._grace.start()

    def quiesce(self) -> None:
        """Return once no program run that read an endpoint value before the
        last switch can still be running: before a change overwrites the
        image a switch left (the inactive one) or deletes a policy that was
        active. A packet that read the old endpoint value could otherwise
        still be in its lookups of that image."""
        if self._grace is not None:
            self._grace.join()
            self._grace = None
        if not self._quiet:  # a new process: the last switch was another's
            self._barrier()

    def close(self) -> None:
        self.quiesce()
        if self._rcu is not None:
            self._rcu.close()
            self._rcu = None
        for m in self._maps.values():
            m.close()
        self._maps.clear()
        if self._progs is not None:
            os.close(self._progs.xdp_fd)
            os.close(self._progs.tc_fd)
            self._progs = None

    # ------------------------------------------------------------ applied state

    @property
    def applied_path(self) -> Path:
        return self.state_dir / "applied.json"

    def load_applied(self) -> Applied:
        if self._applied is not None:
            return self._applied
        try:
            raw = json.loads(self.applied_path.read_text())
            applied = Applied(**raw)
        except (OSError, ValueError, TypeError):
            applied = Applied()
        # never reuse ids that the maps still hold
        if os.path.exists(f"{self.pin_dir}/sg_endpoints"):
            for _, ep in self.map("sg_endpoints").items():
                applied.next_policy_id = max(applied.next_policy_id, ep.policy_id + 1)
        return applied

    def save_applied(self, applied: Applied) -> None:
        write_atomic(self.applied_path, orjson.dumps(applied.__dict__))

    # ------------------------------------------------------------ policy writes

    def sync_exempt(self, state: State) -> None:
        """Infrastructure services and DHCP servers (1.3). A prefix's value
        holds its own bits and those of every prefix containing it, so the
        longest match answers for all of them."""
        m = self.map("sg_exempt_lpm")
        nets = [(n, abi.EXEMPT_SERVICE) for n in state.settings.exempt] + \
               [(n, abi.EXEMPT_DHCP_SERVER) for n in state.settings.dhcp_servers]
        want: Dict[bytes, Tuple[Any, int]] = {}
        for net, _ in nets:
            bits = 0
            for other, bit in nets:
                if other.version == net.version and net.subnet_of(other):  # type: ignore[arg-type]
                    bits |= bit
            key = abi.ExemptKey(prefixlen=32 + net.prefixlen, family=net.version,
                                addr=abi.addr_words(network_bytes(net)))
            want[bytes(key)] = (key, bits)
        for old in m.keys():
            if bytes(old) not in want:
                m.delete(old)
        for key, bits in want.values():
            m.update(key, ct.c_uint8(bits))
        flags = (abi.CFG_EXEMPT_DHCP if state.settings.exempt_dhcp else 0) | \
            (abi.CFG_DHCP_SERVERS if state.settings.dhcp_servers else 0)
        self.set_config(abi.CFG_EXEMPT_DHCP | abi.CFG_DHCP_SERVERS, flags)

    def local_keys(self, state: State, ep_ids: Dict[str, int]) -> Dict[bytes, abi.LocalKey]:
        """sg_local_addrs for the bound interfaces (eni -> ep_id): their own
        addresses and IPv6 /64s (1.6)."""
        out: Dict[bytes, abi.LocalKey] = {}
        for eni_id, ep_id in ep_ids.items():
            out.update(local_keys_of(state.interfaces[eni_id], ep_id))
        return out

    def _local_have(self) -> Dict[bytes, abi.LocalKey]:
        if self._local_written is None:
            self._local_written = {bytes(k): k for k in self.map("sg_local_addrs").keys()}
        return self._local_written

    def add_local(self, want: Dict[bytes, abi.LocalKey]) -> None:
        """Before the endpoints switch: the addresses they will check."""
        have, m = self._local_have(), self.map("sg_local_addrs")
        for raw, key in want.items():
            if raw not in have:
                m.update(key, ct.c_uint8(1))
                have[raw] = key

    def remove_local(self, want: Dict[bytes, abi.LocalKey]) -> None:
        """After the switch: addresses no interface has any more."""
        have, m = self._local_have(), self.map("sg_local_addrs")
        for raw in [r for r in have if r not in want]:
            m.delete(have.pop(raw))

    def reset_counters(self, ep_id: int) -> None:
        """A reused endpoint id starts its counter slot at zero, so two
        interfaces' counts never merge."""
        if not 0 < ep_id < abi.COUNTER_SLOTS:
            return
        verdicts, skips = self.map("sg_verdicts"), self.map("sg_flow_skips")
        for i in range(ep_id * 2 * abi.REASON_MAX, (ep_id + 1) * 2 * abi.REASON_MAX):
            verdicts.update(ct.c_uint32(i), (abi.Counter * verdicts.ncpu)())
        skips.update(ct.c_uint32(ep_id), (ct.c_uint64 * skips.ncpu)())

    def used_ep_ids(self, applied: Applied) -> set:
        """Endpoint ids that the last apply or the kernel's endpoints hold."""
        used = {ep["ep_id"] for ep in applied.endpoints.values()}
        if os.path.exists(f"{self.pin_dir}/sg_endpoints"):
            used |= {int(ep.ep_id) for _, ep in self.map("sg_endpoints").items()}
        return used

    @staticmethod
    def free_ep_id(used: set) -> int:
        """The lowest id no endpoint holds (not explain's probe id): ids are
        reused, so counter slots are not used up by binds over time."""
        n = 1
        while n in used or n == abi.PROBE_EP_ID:
            n += 1
        return n

    def flush_conntrack(self, ep_ids: set) -> int:
        from .conntrack import flush  # conntrack builds on this module

        return flush(self, ep_ids)

    def unbind(self, idx: int, ours: set) -> None:
        """Detach our programs from a device and forget its endpoint."""
        from . import netlink

        netlink.detach(idx, ours)
        self.map("sg_endpoints").delete(ct.c_uint32(idx))
        self._attached.pop(idx, None)
        self._ep_written.pop(idx, None)

    def bind_device(self, eni: NetworkInterface, idx: int, via: Optional[IPRoute] = None,
                    link_type: Optional[int] = None) -> bool:
        """The fast path for a device that has just appeared: its endpoint
        on the policy already in the kernel (a pending interface's policy is
        compiled and written with the rest), its programs attached; no
        compile, no other map touched. False when that is not possible (the
        caller then applies in full, which it does afterwards in any case).
        ``via``: a netlink socket to use; ``link_type``: the device's, when the
        caller has it from the RTM_NEWLINK message."""
        from . import netlink

        applied = self.load_applied()
        rec = applied.policies.get(",".join(eni.groups))
        old = applied.endpoints.get(eni.eni_id)
        if rec is None or "active" not in rec or (old is not None and old["ifindex"] == idx):
            return False
        with netlink.route(via) as ipr:
            kind = link_type if link_type is not None else netlink.link_type(idx, ipr)
            if kind != netlink.ARPHRD_ETHER:
                return False
            progs = self.programs()
            ours = self.known_prog_ids(applied)
            ep_id = self.free_ep_id(self.used_ep_ids(applied))
            self.reset_counters(ep_id)
            world = {(int(k.split(",")[0]), int(k.split(",")[1])): c
                     for k, c in rec["world"].items()}
            val = endpoint_value(ep_id, rec["active"], eni.mode, rec["open_all"], world,
                                 eni.timeouts, eni.source_dest_check, eni.mac_address)
            self.add_local(local_keys_of(eni, ep_id))
            self.map("sg_endpoints").update(ct.c_uint32(idx), val)
            self._ep_written[idx] = bytes(val)
            try:
                mode = netlink.attach(idx, progs.xdp_fd, progs.tc_fd, ours, ipr, fresh=True)
            except Exception:
                self.unbind(idx, ours)
                raise
        self._attached[idx] = progs.tag
        applied.endpoints[eni.eni_id] = {
            "ifindex": idx, "ep_id": ep_id, "device": eni.device, "mode": eni.mode,
            "policy": ",".join(eni.groups), "own": sorted(str(a) for a in eni.own_addresses()),
            "check": eni.source_dest_check, "xdp_mode": mode}
        if eni.eni_id in applied.summary:
            applied.summary[eni.eni_id]["pending"] = False
        self._applied = applied  # saved by the full apply that follows (no fsync here)
        return True

    # ------------------------------------------------------------ apply

    def apply(self, state: State, attach: bool = True, missing_ok: bool = False,
              record_desired: bool = True) -> Applied:
        """Make the kernel enforce ``state``. Everything that can fail on the
        input fails before the first map write. With ``missing_ok`` a bound
        interface whose device does not exist (yet) is left pending instead
        of being an error (the daemon binds it when the device appears)."""
        from . import netlink

        applied = self.load_applied()
        reused: List[int] = []
        rule_index = self.number_rules(applied, state, reused)
        compiled: Compiled = compile_state(state, rule_index=rule_index)
        ifindexes: Dict[str, int] = {}
        pending: List[str] = []
        for eni in state.bound_interfaces():
            assert eni.device
            idx = netlink.ifindex(eni.device)
            if idx is None:
                if missing_ok:
                    pending.append(eni.eni_id)
                    continue
                raise DataplaneError(f"{eni.eni_id}: host-interface: device {eni.device!r} "
                                     "does not exist on this host")
            kind = netlink.link_type(idx)
            if kind != netlink.ARPHRD_ETHER:
                raise DataplaneError(f"{eni.eni_id}: host-interface: device {eni.device!r} is "
                                     f"not an Ethernet device (link type {kind}: "
                                     f"{netlink.arphrd_name(kind)}); sgctl filters Ethernet "
                                     "frames only")
            ifindexes[eni.eni_id] = idx
        progs = self.programs() if attach else None
        ours = self.known_prog_ids(applied)  # ours to replace or detach; others are refused
        if attach:
            for idx in ifindexes.values():
                if self._attached.get(idx) != self.prog_tag():
                    netlink.check_attachable(idx, ours)
        eps = self.map("sg_endpoints")

        hits = self.map("sg_rule_hits")
        for num in reused:  # a reused number starts its new rule's counters at zero
            hits.update(ct.c_uint32(num), (abi.RuleHit * hits.ncpu)())
        # 1. policies: unchanged group sets keep theirs; a changed one gets its
        #    difference written into its inactive policy id (or a fresh id)
        pm = self._pm
        pm.start(applied.next_class_id)
        policies: Dict[str, dict] = {}
        drop: List[int] = []
        for groups, pol in compiled.policies.items():
            name = ",".join(groups)
            fp = pol.fingerprint()
            old = applied.policies.get(name)
            if old and old.get("fingerprint") == fp and "active" in old:
                policies[name] = old
                continue
            img = pm.image_of(pol)
            active = old.get("active", old.get("policy_id")) if old else None  # (older format)
            inactive = next((i for i in (old or {}).get("ids", []) if i != active), None)
            if inactive is not None and inactive in pm.images:
                target = inactive
                self.quiesce()
                written = pm.write(target, img, pm.images[inactive])
            else:
                target = applied.next_policy_id
                applied.next_policy_id += 1
                written = pm.write(target, img, None)
                if inactive is not None:
                    drop.append(inactive)
            policies[name] = {"active": target, "ids": [target] + ([active] if active else []),
                              "fingerprint": fp, "open_all": pol.open_all,
                              "world": {f"{d},{fam}": c for (d, fam), c in img.world.items()},
                              "peers": len(img.peers), "classes": len(set(img.peers.values())),
                              "written": written}
        # 2. endpoints: their addresses first, then one update each switches
        #    to the new policy; an unbound interface's id is free for reuse
        #    only from the next change on (its addresses are gone by then)
        switched = False
        endpoints: Dict[str, dict] = {}
        values: Dict[int, abi.Endpoint] = {}
        lost: Dict[int, set] = {}  # ep_id -> own addresses, where some were lost
        used: Optional[set] = None  # read only when an interface needs a new id
        for eni in state.bound_interfaces():
            if eni.eni_id not in ifindexes:
                continue
            name = ",".join(eni.groups)
            idx = ifindexes[eni.eni_id]
            old = applied.endpoints.get(eni.eni_id)
            if old and old["ifindex"] == idx:
                ep_id = old["ep_id"]
            else:
                if used is None:
                    used = self.used_ep_ids(applied)
                ep_id = self.free_ep_id(used)
                used.add(ep_id)
                self.reset_counters(ep_id)
            rec = policies[name]
            world = {}
            for key, cls in rec["world"].items():  # stored as "dir,family"
                d, fam = key.split(",")
                world[(int(d), int(fam))] = cls
            values[idx] = endpoint_value(ep_id, rec["active"], eni.mode, rec["open_all"], world,
                                         eni.timeouts, eni.source_dest_check, eni.mac_address)
            addrs = eni.own_addresses()
            own = sorted(str(a) for a in addrs)
            endpoints[eni.eni_id] = {"ifindex": idx, "ep_id": ep_id, "device": eni.device,
                                     "mode": eni.mode, "policy": name, "own": own,
                                     "check": eni.source_dest_check}
            if old and old["ep_id"] == ep_id and eni.source_dest_check and (
                    not old.get("check", True) or not set(old.get("own", [])) <= set(own)):
                lost[ep_id] = {a.packed for a in addrs}
        local = self.local_keys(state, {e: ep["ep_id"] for e, ep in endpoints.items()})
        self.add_local(local)
        try:
            for idx, val in values.items():
                if bytes(val) != self._ep_written.get(idx):
                    eps.update(ct.c_uint32(idx), val)
                    switched = True
                    self._ep_written[idx] = bytes(val)
            if lost:  # connections on an address the interface no longer has go now
                from .conntrack import cut_foreign  # conntrack builds on this module

                log.info("cut %d connections on addresses their interfaces lost",
                         cut_foreign(self, lost))
            self.sync_exempt(state)
            if attach and progs is not None:
                for ep in endpoints.values():
                    if self._attached.get(ep["ifindex"]) != progs.tag:
                        ep["xdp_mode"] = netlink.attach(ep["ifindex"], progs.xdp_fd, progs.tc_fd,
                                                        ours)
                        self._attached[ep["ifindex"]] = progs.tag
        except Exception:
            # devices this call bound are unbound again (programs detached,
            # endpoint removed); the caller re-applies the previous state to
            # the others
            before = {ep["ifindex"] for ep in applied.endpoints.values()}
            for idx in set(values) - before:
                self.unbind(idx, ours)
            raise
        if attach and progs is not None:
            applied.prog_ids = sorted(ours)
        # 3. endpoints that went away: detach, forget, flush their connections
        gone = {e: ep for e, ep in applied.endpoints.items()
                if e not in endpoints or endpoints[e]["ifindex"] != ep["ifindex"]}
        live_idx = {ep["ifindex"] for ep in endpoints.values()}
        for ep in gone.values():
            if ep["ifindex"] not in live_idx:
                self.unbind(ep["ifindex"], ours)
        if gone:
            self.flush_conntrack({ep["ep_id"] for ep in gone.values()})
        self.remove_local(local)
        # 4. delete policy ids nobody uses any more, then unused classes
        live = {i for p in policies.values() for i in p["ids"]}
        known = {i for p in applied.policies.values()
                 for i in p.get("ids", [p.get("policy_id")]) if i is not None}
        dead = (known - live) | set(drop) | (set(pm.images) - live)
        if switched or gone:
            self.switched()
        if dead:  # some were active until just now (or, in a new process, may have been)
            self.quiesce()
        for pid in sorted(dead):
            pm.delete_policy(pid)
        pm.gc_classes(unknown_policies=bool(live - set(pm.images)))
        applied.next_class_id = pm.next_class
        if attach and progs is not None:
            self.unpin_old_programs(progs.tag)
        applied.endpoints = endpoints
        applied.policies = policies
        applied.rule_index = rule_index
        applied.summary = {
            eni.eni_id: {"device": eni.device, "mode": eni.mode, "groups": list(eni.groups),
                         "rules_ingress": len(state.rules_of(eni, "ingress")),
                         "rules_egress": len(state.rules_of(eni, "egress")),
                         "policy_id": policies[",".join(eni.groups)]["active"],
                         "addresses": [str(a) for a in eni.addresses()],
                         "source_dest_check": eni.source_dest_check,
                         "pending": eni.eni_id in pending}
            for eni in state.bound_interfaces()}
        if record_desired:  # the daemon keeps it in its store instead
            from .formats.native import dump

            applied.desired = dump(state)
            applied.desired["stale_rules"] = [r.rule_id for r in state.stale_rules]
        else:
            applied.desired = {"settings": {"exempt": [str(n) for n in state.settings.exempt],
                                            "exempt_dhcp": state.settings.exempt_dhcp,
                                            "dhcp_servers": [str(n) for n in
                                                             state.settings.dhcp_servers]},
                               "stale_rules": [r.rule_id for r in state.stale_rules]}
        self.save_applied(applied)
        self._applied = applied
        return applied

    @staticmethod
    def number_rules(applied: Applied, state: State,
                     reused: Optional[List[int]] = None) -> Dict[str, int]:
        """Each rule keeps its number (its hit counters, its conntrack
        entries' "admitted by") for as long as it exists. New rules get fresh
        numbers -- not a recently freed one, which conntrack entries may still
        name -- until the counter slots run out; then the lowest free one."""
        out: Dict[str, int] = {}
        free: Optional[List[int]] = None  # computed once, when the slots run out
        for g in state.groups.values():
            for r in g.rules:
                num = applied.rule_index.get(r.rule_id)
                if num is None:
                    if applied.next_rule_index < abi.RULE_SLOTS:
                        num = applied.next_rule_index
                        applied.next_rule_index += 1
                    else:
                        if free is None:
                            live = {applied.rule_index.get(x.rule_id) for gg in
                                    state.groups.values() for x in gg.rules} | set(out.values())
                            free = [n for n in range(abi.RULE_SLOTS - 1, 0, -1) if n not in live]
                        num = free.pop() if free else applied.next_rule_index
                        if num >= abi.RULE_SLOTS:
                            applied.next_rule_index += 1  # beyond the slots: counted as "other"
                        elif reused is not None:
                            reused.append(num)
                out[r.rule_id] = num
        return out

    def prog_tag(self) -> Optional[str]:
        return self._progs.tag if self._progs is not None else None

    def unpin_old_programs(self, tag: str) -> None:
        """After an upgrade every device runs the new programs: drop the old
        programs' pins, and maps the new layout no longer has."""
        for name in os.listdir(self.pin_dir):
            old_prog = name.startswith("prog_") and not name.endswith("_" + tag)
            old_map = name.startswith("sg_") and name not in abi.MAPS and name not in abi.RING_MAPS
            if old_prog or old_map:
                os.unlink(os.path.join(self.pin_dir, name))

    def known_prog_ids(self, applied: Applied) -> set:
        ids = set(applied.prog_ids)
        if self._progs is not None:
            ids |= {bpfsys.prog_id(self._progs.xdp_fd), bpfsys.prog_id(self._progs.tc_fd)}
        return ids

    def set_config(self, mask: int, flags: int, **fields: int) -> None:
        """Change the ``mask`` bits of sg_config.flags to ``flags`` and set
        ``fields``; everything else in the config stays as it is."""
        m = self.map("sg_config")
        cfg = m.lookup(ct.c_uint32(0)) or abi.Config()
        cfg.flags = (cfg.flags & ~mask) | flags  # type: ignore[attr-defined]
        for name, value in fields.items():
            setattr(cfg, name, value)
        m.update(ct.c_uint32(0), cfg)

    def set_clock(self, now: int) -> None:
        """Tests: freeze the datapath clock at ``now`` seconds (0 = real clock)."""
        self.set_config(0, 0, now_override=now)

    def reset(self) -> List[str]:
        """Detach from every bound device and remove pins and applied state."""
        from . import netlink

        done = []
        applied = self.load_applied() if os.path.exists(self.pin_dir) else Applied()
        ids = self.known_prog_ids(applied)
        for ep in applied.endpoints.values():
            netlink.detach(ep["ifindex"], ids)
            done.append(ep.get("device") or str(ep["ifindex"]))
        if os.path.exists(f"{self.pin_dir}/sg_endpoints"):
            for key in self.map("sg_endpoints").keys():
                netlink.detach(int(key.value), ids)  # type: ignore[attr-defined]
        self.close()
        shutil.rmtree(self.pin_dir, ignore_errors=True)
        self._applied, self._pm = None, PolicyMaps(self.map)
        self._attached, self._ep_written, self._local_written = {}, {}, None
        for path in (self.applied_path, Store(str(self.state_dir)).path):
            try:
                path.unlink()
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        return done


def local_keys_of(eni: NetworkInterface, ep_id: int) -> Dict[bytes, abi.LocalKey]:
    """An interface's sg_local_addrs keys: its own addresses and IPv6 /64s."""
    keys = [abi.LocalKey(addr_id=ep_id, family=a.version, kind=abi.LOCAL_ADDR,
                         addr=abi.addr_words(a.packed)) for a in eni.own_addresses()]
    keys += [abi.LocalKey(addr_id=ep_id, family=6, kind=abi.LOCAL_ONLINK64,
                          addr=abi.addr_words(n.network_address.packed[:8]))
             for n in eni.onlink64()]
    return {bytes(k): k for k in keys}


def endpoint_value(ep_id: int, policy_id: int, mode: str, open_all: int,
                   world: Dict[Tuple[int, int], int], timeouts: Timeouts,
                   source_dest_check: bool = True, mac: Optional[str] = None) -> abi.Endpoint:
    """The sg_endpoints value; ``world``: (dir index, family) -> world class."""
    val = abi.Endpoint(ep_id=ep_id, policy_id=policy_id,
                       mode=abi.MODE_HOST if mode == MODE_HOST else abi.MODE_WORKLOAD,
                       open_all=open_all, addr_id=ep_id,
                       flags=(abi.EP_SRC_CHECK if source_dest_check else 0) |
                       (abi.EP_MAC if mac else 0))
    if mac:
        val.mac[:] = mac_bytes(mac)
    for (d, fam), cls in world.items():
        val.world_class[d * 2 + FAMILY_INDEX[fam]] = cls
    for i, tname in enumerate(abi.TO_NAMES):
        val.timeouts[i] = getattr(timeouts, tname)
    return val


def find_endpoint(applied: Applied, name: str) -> Optional[dict]:
    """The bound endpoint of an interface, named by eni- id or device."""
    ep = applied.endpoints.get(name)
    return ep or next((e for e in applied.endpoints.values() if e["device"] == name), None)


def rule_hits(dp: Dataplane, number: int) -> Tuple[int, int, int]:
    """(packets, bytes, last hit in datapath seconds) of one rule number."""
    if not 0 < number < abi.RULE_SLOTS:
        return 0, 0, 0
    vals = dp.map("sg_rule_hits").lookup(ct.c_uint32(number))
    if vals is None:
        return 0, 0, 0
    return (sum(v.packets for v in vals), sum(v.bytes for v in vals),  # type: ignore[attr-defined]
            max(v.last_seen for v in vals))  # type: ignore[attr-defined]


def rule_hit_table(dp: Dataplane, upto: int) -> List[Tuple[int, int, int]]:
    """(packets, bytes, last hit) of rule numbers 0..upto, in batch lookups."""
    vals = dp.map("sg_rule_hits").array_range(0, min(upto + 1, abi.RULE_SLOTS))
    return [(sum(v.packets for v in cpus), sum(v.bytes for v in cpus),
             max(v.last_seen for v in cpus)) for cpus in vals]


def reason_packets(dp: Dataplane, ep_id: int, direction: str) -> List[int]:
    """Packets per reason number (all REASON_MAX slots) of one endpoint and
    direction, summed over CPUs: a before/after pair tells which reason a
    test-run packet got."""
    m = dp.map("sg_verdicts")
    slot = ep_id if ep_id < abi.COUNTER_SLOTS else 0
    d = abi.DIR_INGRESS if direction == "ingress" else abi.DIR_EGRESS
    base = (slot * 2 + d) * abi.REASON_MAX
    out = []
    for r in range(abi.REASON_MAX):
        vals = m.lookup(ct.c_uint32(base + r))
        out.append(sum(v.packets for v in vals) if vals is not None else 0)  # type: ignore
    return out


def endpoint_counters(dp: Dataplane, ep_id: int) -> Dict[Tuple[str, str], Tuple[int, int]]:
    """(direction, reason) -> (packets, bytes) summed over CPUs."""
    from .reasons import Reason

    out = {}
    slot = ep_id if ep_id < abi.COUNTER_SLOTS else 0
    # both directions' reasons are adjacent: one batch lookup
    vals = dp.map("sg_verdicts").array_range(slot * 2 * abi.REASON_MAX, 2 * abi.REASON_MAX)
    for d, dname in ((abi.DIR_INGRESS, "ingress"), (abi.DIR_EGRESS, "egress")):
        for r in Reason:
            i = d * abi.REASON_MAX + r.value
            if i >= len(vals):
                continue
            pk = sum(v.packets for v in vals[i])
            by = sum(v.bytes for v in vals[i])
            if pk:
                out[(dname, r.label)] = (pk, by)
    return out
