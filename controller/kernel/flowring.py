"""The datapath's flow-log half: the switch and rate limit in ``sg_config``
and the ``sg_flow_events`` ring the events arrive through."""

from __future__ import annotations

from typing import Callable

from controller import abi
from controller.kernel import bpfsys
from controller.kernel.dataplane import Dataplane


def open_ring(dp: Dataplane, on_event: Callable[[abi.FlowEvent], None]) -> bpfsys.Ring:
    """The event ring; ``consume()`` calls ``on_event`` for each event."""
    return bpfsys.Ring(f"{dp.pin_dir}/sg_flow_events", on_event, abi.RING_MAPS["sg_flow_events"])


def switch_on(dp: Dataplane, rate: int, burst: int, ep_rate: int, ep_burst: int) -> None:
    """Connection accounting and events on, at most ``rate`` events a second
    per CPU with bursts of ``burst``, and of them at most ``ep_rate`` (bursts
    of ``ep_burst``) from one interface."""
    cost, ep_cost = 10**9 // rate, 10**9 // ep_rate
    dp.set_config(abi.CFG_FLOW_LOG, abi.CFG_FLOW_LOG, flow_cost_ns=cost,
                  flow_burst_ns=cost * burst, flow_ep_cost_ns=ep_cost,
                  flow_ep_burst_ns=ep_cost * ep_burst)


def switch_off(dp: Dataplane) -> None:
    dp.set_config(abi.CFG_FLOW_LOG, 0)
