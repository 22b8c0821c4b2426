"""The kernel handle: build (build.py) and load the programs, keep them and
their maps pinned, open the maps, and the RCU grace periods that order
policy writes (the reconciler decides what to write; see
controller/reconcile)."""

from __future__ import annotations

import ctypes as ct
import logging
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from controller import abi
from controller.kernel import bpfsys, build
from controller.kernel.policymaps import PolicyMaps
from controller.policy.errors import EnforcementError

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
DEFAULT_PIN_DIR = "/sys/fs/bpf/sgctl"
log = logging.getLogger("sgctl")


class DataplaneError(EnforcementError):
    """The programs could not be built, loaded or pinned."""


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
class Written:
    """What this process wrote to the kernel, so that repeated converges
    touch only what changed (a new process starts empty and reads back)."""

    policies: PolicyMaps  # classification maps: classes and images
    attached: Dict[int, str] = field(default_factory=dict)  # ifindex -> program tag there
    endpoints: Dict[int, bytes] = field(default_factory=dict)  # ifindex -> endpoint value
    local: Optional[Dict[bytes, abi.LocalKey]] = None  # sg_local_addrs keys (None: not read)


class Dataplane:
    def __init__(self, pin_dir: str = DEFAULT_PIN_DIR, ct_max: int = 1 << 20,
                 cache_dir: Optional[str] = build.DEFAULT_CACHE_DIR) -> None:
        self.pin_dir = pin_dir
        self.cache_dir = cache_dir  # compiled builds (build.py); None: always compile
        self.ct_max = ct_max
        self.ct_ring = abi.ct_ring_slots(ct_max)
        self._maps: Dict[str, bpfsys.Map] = {}
        self._progs: Optional[Programs] = None
        self.written = Written(PolicyMaps(self.map))  # what this process wrote
        # sees conntrack entries before anything deletes them (the flow logger)
        self.retire: Optional[Callable[[List[Tuple[Any, Any]]], None]] = None
        # Grace periods (see quiesce). Each switch (or endpoint slot retired)
        # is an epoch; a barrier that starts in epoch e covers every epoch
        # <= e. A new process starts at 1, uncovered: the last switch was
        # another's.
        self._rcu: Optional[bpfsys.RcuBarrier] = None
        self._grace: Optional[threading.Thread] = None
        self._epoch = 1
        self._covered = 0  # the epoch the last completed barrier covers
        self._retired: Dict[int, int] = {}  # sg_ep_slots slot -> epoch it was retired in
        self._ep_index: Optional[bpfsys.MappedWords] = None
        # orders the controller's writes of sg_ct_removed (counters.count_removed)
        self.ct_removed_lock = threading.Lock()

    # ------------------------------------------------------------ programs

    def cflags(self) -> List[str]:
        """The build's flags (the pin directory is the loader's business, see
        build.py). SGCTL_EXTRA_CFLAGS: for developers and the upgrade test (a
        different build of the same code, replaced on the hooks while the
        maps stay)."""
        return [f"-DSG_CT_MAX={self.ct_max}", f"-DSG_CT_RING={self.ct_ring}",
                "-Wno-unused-function", *os.environ.get("SGCTL_EXTRA_CFLAGS", "").split()]

    def source_tag(self) -> str:
        return build.build_key(program_source(), self.cflags())[:12]

    def ensure_bpffs(self) -> None:
        if not os.path.ismount("/sys/fs/bpf"):
            os.makedirs("/sys/fs/bpf", exist_ok=True)
            if os.system("mount -t bpf bpf /sys/fs/bpf") != 0:
                raise DataplaneError("/sys/fs/bpf is not a bpffs mount and mounting it failed")
        os.makedirs(self.pin_dir, exist_ok=True)

    def programs(self) -> Programs:
        """Load (compile only when no build of this code is cached) and pin
        both programs."""
        if self._progs is not None:
            return self._progs
        self.ensure_bpffs()
        tag = self.source_tag()
        xdp_pin = f"{self.pin_dir}/prog_xdp_{tag}"
        tc_pin = f"{self.pin_dir}/prog_tc_{tag}"
        if os.path.exists(xdp_pin) and os.path.exists(tc_pin):
            self._progs = Programs(bpfsys.obj_get(xdp_pin), bpfsys.obj_get(tc_pin), tag)
            return self._progs
        self.drop_changed_maps()
        try:
            b = build.cached_build(program_source(), self.cflags(), self.cache_dir)
            fds = build.load(b, self.pin_dir)
        except build.BuildError as exc:
            raise DataplaneError(str(exc)) from exc
        for fd, pin in ((fds["xdp_sg"], xdp_pin), (fds["tc_sg"], tc_pin)):
            if os.path.exists(pin):
                os.unlink(pin)
            bpfsys.obj_pin(fd, pin)
        self._progs = Programs(fds["xdp_sg"], fds["tc_sg"], tag)
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

    def _barrier(self, epoch: int) -> None:
        if self._rcu is None:
            self._rcu = bpfsys.RcuBarrier()
        self._rcu.wait()
        self._covered = max(self._covered, epoch)

    def switched(self) -> None:
        """Endpoints now name other policies: start a grace period in the
        background (call_rcu-like), so the next change rarely waits."""
        if self._grace is not None:  # at most one running; it is done or nearly
            self._grace.join()
        self._epoch += 1
        self._grace = threading.Thread(target=self._barrier, args=(self._epoch,),
                                       name="sgctl-rcu", daemon=True)
        self._grace.start()

    def quiesce(self, epoch: Optional[int] = None) -> None:
        """Return once no program run that read an endpoint value before the
        last switch (or before ``epoch`` began) can still be running: before
        a change overwrites the image a switch left (the inactive one) or
        deletes a policy that was active. A packet that read the old
        endpoint value could otherwise still be in its lookups of that image."""
        want = self._epoch if epoch is None else epoch
        if self._covered >= want:
            return
        if self._grace is not None:
            self._grace.join()
            self._grace = None
        if self._covered < want:
            self._barrier(self._epoch)

    def quiet(self) -> bool:
        """No program run can still hold anything a switch so far left."""
        return self._covered >= self._epoch

    # ------------------------------------------------------------ endpoint slots

    def ep_index(self) -> bpfsys.MappedWords:
        """sg_ep_index, mapped (types.h, struct sg_ep_ref)."""
        if self._ep_index is None:
            self._ep_index = self.map("sg_ep_index").mapped_words()
        return self._ep_index

    def retire_slot(self, slot: int) -> None:
        """The index stopped naming ``slot`` just now."""
        self._epoch += 1
        self._retired[slot] = self._epoch

    def await_free(self, slot: int) -> None:
        """Return once no program run can still be reading ``slot`` (unknown
        to this process: retired before it started)."""
        self.quiesce(self._retired.get(slot, 1))

    def close(self) -> None:
        self.quiesce()
        if self._ep_index is not None:
            self._ep_index.close()
            self._ep_index = None
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

    def known_prog_ids(self, recorded: List[int]) -> Set[int]:
        """Program ids that are ours to replace or detach: ``recorded`` (by an
        earlier process) and this process's."""
        ids = set(recorded)
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

    def remove_pins(self) -> None:
        """Close everything and remove the pin directory (``sgctl reset``)."""
        self.close()
        shutil.rmtree(self.pin_dir, ignore_errors=True)
        self.written = Written(PolicyMaps(self.map))
