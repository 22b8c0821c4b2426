"""Run packets through the real programs with BPF_PROG_TEST_RUN."""

from __future__ import annotations

import os
from typing import Dict, Optional

from controller import abi
from controller.abi.reasons import Reason
from controller.kernel import bpfsys
from controller.kernel.counters import reason_packets
from controller.kernel.dataplane import Dataplane
from controller.kernel.frames import frame
from controller.policy.evaluator import Packet
from controller.policy.model import INGRESS, MODE_HOST, State
from controller.reconcile.applied import EndpointRecord
from controller.reconcile.converge import Converged, Reconciler

KERNEL_CT_MAX = 256  # small, so that the table-full case is cheap to reach


class KernelRunner:
    """A private dataplane (own pins) whose programs are test-run, never attached."""

    def __init__(self, pin_dir: str, state_dir: str, ct_max: int = 4096) -> None:
        self.dp = Dataplane(pin_dir=pin_dir, ct_max=ct_max)
        self.rc = Reconciler(self.dp, state_dir)
        self.progs = self.dp.programs()
        self.state: Optional[State] = None
        self.endpoints: Dict[str, EndpointRecord] = {}

    def apply(self, state: State) -> Converged:
        done = self.rc.converge(state, attach=False)
        self.state = state
        self.endpoints = done.applied.endpoints
        return done

    def flush(self) -> None:
        for name in ("sg_conntrack", "sg_frags"):
            m = self.dp.map(name)
            for k in m.keys():
                m.delete(k)

    def set_clock(self, now: int) -> None:
        self.dp.set_clock(now)

    def hook_for(self, eni_id: str, direction: str) -> bool:
        """True = XDP. workload: XDP sees egress; host: XDP sees ingress."""
        assert self.state is not None
        host = self.state.interfaces[eni_id].mode == MODE_HOST
        return abi.hook_is_xdp(abi.MODE_HOST if host else abi.MODE_WORKLOAD,
                               abi.DIR_INGRESS if direction == INGRESS else abi.DIR_EGRESS)

    def counters(self, ep_id: int, direction: str) -> list:
        return reason_packets(self.dp, ep_id, direction)

    def run_frame(self, eni_id: str, direction: str, data: bytes) -> Reason:
        ep = self.endpoints[eni_id]
        xdp = self.hook_for(eni_id, direction)
        before = self.counters(ep.ep_id, direction)
        fd = self.progs.xdp_fd if xdp else self.progs.tc_fd
        retval, _ = bpfsys.test_run(fd, data, ep.ifindex, xdp)
        after = self.counters(ep.ep_id, direction)
        changed = [i for i in range(abi.REASON_MAX) if after[i] != before[i]]
        assert len(changed) == 1, f"expected one counter to move, got {changed}"
        reason = Reason(changed[0])
        passed = retval == (2 if xdp else 0)  # XDP_PASS / TC_ACT_OK
        assert passed == reason.allowed, f"return value {retval} disagrees with {reason.name}"
        return reason

    def run(self, eni_id: str, direction: str, pkt: Packet) -> Reason:
        return self.run_frame(eni_id, direction, frame(pkt))

    def close(self) -> None:
        self.rc.reset()


def unique(prefix: str) -> str:
    unique.n += 1  # type: ignore[attr-defined]
    return f"{prefix}{os.getpid() % 100000}{unique.n}"  # type: ignore[attr-defined]


unique.n = 0  # type: ignore[attr-defined]
