"""Run packets through the real programs with BPF_PROG_TEST_RUN."""

from __future__ import annotations

import ctypes as ct
import os
from typing import Dict, Optional

from controller import abi
from controller.abi.reasons import Reason
from controller.kernel import conntrack
from controller.kernel.counters import counter_slot, reason_packets
from controller.kernel.dataplane import Dataplane
from controller.kernel.frames import frame
from controller.kernel.testrun import run_frame
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
        conntrack.flush(self.dp)  # (counted: the connection limits count on it)
        # the fragment entries the last state's endpoints may have written (frags.h)
        slots = {0, *(counter_slot(ep.ep_id) for ep in self.endpoints.values())}
        idx = [s * abi.FRAG_PER_EP + i for s in slots for i in range(abi.FRAG_PER_EP)]
        self.dp.map("sg_frags").update_batch([ct.c_uint32(i) for i in idx],
                                             [abi.FragSlot()] * len(idx))

    def set_clock(self, now: int) -> None:
        self.dp.set_clock(now)

    def counters(self, ep_id: int, direction: str) -> list:
        return reason_packets(self.dp, ep_id, direction)

    def run_frame(self, eni_id: str, direction: str, data: bytes) -> Reason:
        assert self.state is not None
        ep = self.endpoints[eni_id]
        host = self.state.interfaces[eni_id].mode == MODE_HOST
        out = run_frame(self.dp, ep.ifindex, ep.ep_id, abi.MODE_HOST if host else abi.MODE_WORKLOAD,
                        abi.DIR_INGRESS if direction == INGRESS else abi.DIR_EGRESS, data)
        assert out.passed == out.reason.allowed, \
            f"return value {out.retval} disagrees with {out.reason.name}"
        return out.reason

    def run(self, eni_id: str, direction: str, pkt: Packet) -> Reason:
        return self.run_frame(eni_id, direction, frame(pkt))

    def close(self) -> None:
        self.rc.reset()


def unique(prefix: str) -> str:
    unique.n += 1  # type: ignore[attr-defined]
    return f"{prefix}{os.getpid() % 100000}{unique.n}"  # type: ignore[attr-defined]


unique.n = 0  # type: ignore[attr-defined]
