"""One frame through the loaded programs (BPF_PROG_TEST_RUN), as an
endpoint would see it, and the reason the datapath counted for it: the one
runner that ``explain``, the kernel tests and the differential test share."""

from __future__ import annotations

from dataclasses import dataclass

from controller import abi
from controller.abi.reasons import Reason
from controller.kernel import bpfsys
from controller.kernel.counters import reason_packets
from controller.kernel.dataplane import Dataplane

XDP_PASS, TC_ACT_OK = 2, 0  # the programs' "let it through"


@dataclass(frozen=True)
class Outcome:
    reason: Reason  # the one verdict counter the run moved
    retval: int  # the program's return value
    passed: bool  # the return value lets the frame through


class CounterMismatch(RuntimeError):
    """The run did not move exactly one verdict counter."""


def run_frame(dp: Dataplane, ifindex: int, ep_id: int, mode: int, direction: int,
              frame: bytes) -> Outcome:
    """Run ``frame`` through the program that sees ``direction`` on a device
    of ``mode`` (abi.MODE_*), as device ``ifindex`` whose endpoint has id
    ``ep_id``; the reason is read from that endpoint's counters."""
    progs = dp.programs()
    xdp = abi.hook_is_xdp(mode, direction)
    dname = "ingress" if direction == abi.DIR_INGRESS else "egress"
    before = reason_packets(dp, ep_id, dname)
    retval, _ = bpfsys.test_run(progs.xdp_fd if xdp else progs.tc_fd, frame, ifindex, xdp)
    after = reason_packets(dp, ep_id, dname)
    moved = [i for i in range(abi.REASON_MAX) if after[i] != before[i]]
    if len(moved) != 1:
        raise CounterMismatch(f"the run moved {len(moved)} verdict counters: {moved}")
    return Outcome(Reason(moved[0]), retval, retval == (XDP_PASS if xdp else TC_ACT_OK))
