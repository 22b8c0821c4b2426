"""`sgctl explain`: what would happen to one packet, and why.

Two independent answers for a *new* packet: the reference evaluator on the
enforced state, and the loaded kernel program run on the packet with
BPF_PROG_TEST_RUN. The kernel run goes through a probe endpoint (ep id
``abi.PROBE_EP_ID``, flag ``SG_EP_PROBE``) written for the moment at the
loopback device's ifindex: same policy id, mode and timeouts as the
interface asked about, but it creates no conntrack entry and counts no rule
hit, and its verdict lands in its own counter slot. Live traffic is not
touched (no sgctl program runs on ``lo``). When the answers differ the
report says so and the caller exits non-zero.
"""

from __future__ import annotations

import ctypes as ct
from typing import Any, Dict, Optional

from controller import abi
from controller.abi.reasons import Reason
from controller.kernel.dataplane import Dataplane
from controller.kernel.endpoints import point, unpoint
from controller.kernel.frames import frame
from controller.kernel.testrun import CounterMismatch, run_frame
from controller.policy.errors import ApiError, ValidationError
from controller.policy.evaluator import TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, Evaluator, Packet
from controller.policy.model import (
    EGRESS,
    INGRESS,
    State,
    parse_address,
    parse_int,
    parse_protocol,
    protocol_label,
)

LOOPBACK_IFINDEX = 1
FLAG_NAMES = {"SYN": TCP_SYN, "ACK": TCP_ACK, "FIN": TCP_FIN, "RST": TCP_RST, "PSH": TCP_PSH}


def _packet(p: Dict[str, Any], direction: str) -> Packet:
    try:
        proto = parse_protocol(p.get("Protocol", "tcp"), "Explain", "Protocol")
        src = parse_address(p.get("Source"), "Explain", "Source")
        dst = parse_address(p.get("Destination"), "Explain", "Destination")
    except ValidationError as exc:
        raise ApiError("InvalidParameterValue", str(exc)) from None
    if src.version != dst.version:
        raise ApiError("InvalidParameterValue", "Source and Destination are not the same family")
    flags = 0
    if not isinstance(p.get("TcpFlags", "SYN"), str):
        raise ApiError("InvalidParameterValue", "TcpFlags is a string such as \"SYN,ACK\"")
    for name in str(p.get("TcpFlags", "SYN")).upper().replace(",", " ").split():
        if name not in FLAG_NAMES:
            raise ApiError("InvalidParameterValue", f"unknown TCP flag {name!r}")
        flags |= FLAG_NAMES[name]
    def number(key: str, default: int, top: int) -> int:
        try:
            val = parse_int(p.get(key, default), "Explain", key)
        except ValidationError as exc:
            raise ApiError("InvalidParameterValue", str(exc)) from None
        if not 0 <= val <= top:
            raise ApiError("InvalidParameterValue", f"{key} {val} is outside 0-{top}")
        return val

    return Packet(src, dst, proto, sport=number("SourcePort", 40000, 65535),
                  dport=number("Port", 0, 65535), icmp_type=number("IcmpType", 8, 255),
                  icmp_code=number("IcmpCode", 0, 255), tcp_flags=flags)


def kernel_verdict(dp: Dataplane, eni_id: str, ifindex: Optional[int], direction: str,
                   data: bytes) -> Reason:
    """Run one frame through the loaded programs as the probe of ``eni_id``
    (bound to device ``ifindex``; None: not bound here)."""
    if ifindex is None:
        raise ApiError("InvalidNetworkInterfaceID.NotFound",
                       f"{eni_id} is not bound to a device on this host")
    eps = dp.map("sg_endpoints")
    if eps.lookup(ct.c_uint32(LOOPBACK_IFINDEX)) is not None:
        raise ApiError("InvalidParameterValue", "the loopback device is bound; explain needs it "
                       "free for its probe")
    real = eps.lookup(ct.c_uint32(ifindex))
    if real is None:
        raise ApiError("InternalError", f"{eni_id}: no endpoint in the kernel", 500)
    probe = abi.Endpoint.from_buffer_copy(bytes(real))
    probe.ep_id = abi.PROBE_EP_ID
    probe.flags |= abi.EP_PROBE
    point(dp, LOOPBACK_IFINDEX, probe)  # (not in the record: nothing is bound there)
    try:
        return run_frame(dp, LOOPBACK_IFINDEX, abi.PROBE_EP_ID, int(real.mode),
                         abi.DIR_INGRESS if direction == INGRESS else abi.DIR_EGRESS,
                         data).reason
    except CounterMismatch as exc:
        raise ApiError("InternalError", f"the probe: {exc}", 500) from None
    finally:
        unpoint(dp, LOOPBACK_IFINDEX)


def explain(dp: Dataplane, state: State, params: Dict[str, Any],
            bound: Dict[str, int]) -> Dict[str, Any]:
    """The evaluator's and the kernel's verdict on one new packet.
    ``bound``: the interfaces bound here, eni id -> ifindex."""
    eni_name = params.get("NetworkInterfaceId")
    eni = state.interfaces.get(str(eni_name))
    if eni is None:
        eni = next((e for e in state.interfaces.values() if e.device == eni_name), None)
    if eni is None:
        raise ApiError("InvalidNetworkInterfaceID.NotFound", f"{eni_name} is not an interface")
    direction = str(params.get("Direction", INGRESS))
    if direction not in (INGRESS, EGRESS):
        raise ApiError("InvalidParameterValue", f"Direction {direction!r}: ingress or egress")
    pkt = _packet(params, direction)
    verdict = Evaluator(state).packet(eni.eni_id, direction, pkt)
    evaluator_reason = verdict.reason
    kernel_reason = kernel_verdict(dp, eni.eni_id, bound.get(eni.eni_id), direction,
                                   frame(pkt))
    return {
        "NetworkInterfaceId": eni.eni_id, "Direction": direction,
        "Verdict": "ACCEPT" if evaluator_reason.allowed else "REJECT",
        "Reason": evaluator_reason.label, "KernelReason": kernel_reason.label,
        "Agree": kernel_reason == evaluator_reason,
        "Tracked": verdict.tracked,
        "Rules": [{"GroupId": r.group_id, "SecurityGroupRuleId": r.rule_id,
                   "Description": r.description,
                   "Rule": f"{r.direction} {protocol_label(r.protocol)} {r.describe_ports()} "
                           f"{r.peer}"}
                  for r in verdict.rules],
    }
