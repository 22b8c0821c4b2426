"""The per-CPU counter arrays: verdicts per (endpoint, direction, reason)
(``sg_verdicts``), hits per rule number (``sg_rule_hits``) and flow-log skips
per endpoint slot (``sg_flow_skips``). ``verdict_index`` and ``counter_slot``
are the one Python copy of bpf/lib/counters.h's index formula (the datapath
tests read every verdict through them)."""

from __future__ import annotations

import ctypes as ct
from typing import Dict, Iterable, List, Mapping, Tuple

from controller import abi
from controller.abi.reasons import Reason
from controller.kernel.dataplane import Dataplane


def counter_slot(ep_id: int) -> int:
    """Endpoint ids beyond the slots share slot 0 ("other")."""
    return ep_id if ep_id < abi.COUNTER_SLOTS else 0


def verdict_index(ep_id: int, direction: int, reason: int) -> int:
    """sg_verdicts index of (endpoint, direction, reason), as counters.h."""
    return (counter_slot(ep_id) * 2 + (direction & 1)) * abi.REASON_MAX + \
        (reason & (abi.REASON_MAX - 1))


def reset_counters(dp: Dataplane, ep_id: int) -> None:
    """A reused endpoint id starts its counter slot at zero, so two
    interfaces' counts never merge."""
    if not 0 < ep_id < abi.COUNTER_SLOTS:
        return
    verdicts, skips = dp.map("sg_verdicts"), dp.map("sg_flow_skips")
    for i in range(verdict_index(ep_id, 0, 0), verdict_index(ep_id, 1, abi.REASON_MAX - 1) + 1):
        verdicts.update(ct.c_uint32(i), (abi.Counter * verdicts.ncpu)())
    skips.update(ct.c_uint32(ep_id), (ct.c_uint64 * skips.ncpu)())
    with dp.ct_removed_lock:  # its connection count starts at zero with it (types.h)
        dp.map("sg_ct_quota").update(ct.c_uint32(ep_id), abi.CtQuota())
        dp.map("sg_ct_removed").update(ct.c_uint32(ep_id), ct.c_uint64(0))


def count_removed(dp: Dataplane, removed: Mapping[int, int]) -> None:
    """Add connections the controller deleted (ep_id -> how many) to their
    endpoints' sg_ct_removed counts. The controller is their one writer;
    the lock orders its threads."""
    m = dp.map("sg_ct_removed")
    with dp.ct_removed_lock:
        for ep_id, n in removed.items():
            if 0 < ep_id < abi.COUNTER_SLOTS and n:
                key = ct.c_uint32(ep_id)
                had = m.lookup(key)
                m.update(key, ct.c_uint64((int(had.value) if had is not None else 0) + n))


def ct_evicted(dp: Dataplane, ep_id: int) -> int:
    """Half-open connections of the endpoint deleted to stay within its allowance."""
    if not 0 < ep_id < abi.COUNTER_SLOTS:
        return 0
    q = dp.map("sg_ct_quota").lookup(ct.c_uint32(ep_id))
    return int(q.evicted) if q is not None else 0


def reset_rule_hits(dp: Dataplane, numbers: Iterable[int]) -> None:
    """A reused rule number starts its new rule's counters at zero."""
    hits = dp.map("sg_rule_hits")
    for num in numbers:
        hits.update(ct.c_uint32(num), (abi.RuleHit * hits.ncpu)())


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


def flow_skips(dp: Dataplane, ep_id: int) -> int:
    """Flow events of one endpoint the datapath held back, ever (all CPUs)."""
    vals = dp.map("sg_flow_skips").lookup(ct.c_uint32(counter_slot(ep_id)))
    return sum(int(v) for v in vals) if vals else 0


def flow_skip_table(dp: Dataplane) -> List[int]:
    """Held-back flow events of every counter slot, in one batch lookup."""
    return [sum(int(v) for v in cpus)
            for cpus in dp.map("sg_flow_skips").array_range(0, abi.COUNTER_SLOTS)]


def reason_packets(dp: Dataplane, ep_id: int, direction: str) -> List[int]:
    """Packets per reason number (all REASON_MAX slots) of one endpoint and
    direction, summed over CPUs: a before/after pair tells which reason a
    test-run packet got."""
    m = dp.map("sg_verdicts")
    d = abi.DIR_INGRESS if direction == "ingress" else abi.DIR_EGRESS
    out = []
    for r in range(abi.REASON_MAX):
        vals = m.lookup(ct.c_uint32(verdict_index(ep_id, d, r)))
        out.append(sum(v.packets for v in vals) if vals is not None else 0)  # type: ignore
    return out


def endpoint_counters(dp: Dataplane, ep_id: int) -> Dict[Tuple[str, str], Tuple[int, int]]:
    """(direction, reason) -> (packets, bytes) summed over CPUs."""
    out = {}
    first = verdict_index(ep_id, 0, 0)
    # both directions' reasons are adjacent: one batch lookup
    vals = dp.map("sg_verdicts").array_range(first, 2 * abi.REASON_MAX)
    for d, dname in ((abi.DIR_INGRESS, "ingress"), (abi.DIR_EGRESS, "egress")):
        for r in Reason:
            i = verdict_index(ep_id, d, r.value) - first
            if i >= len(vals):
                continue
            pk = sum(v.packets for v in vals[i])
            by = sum(v.bytes for v in vals[i])
            if pk:
                out[(dname, r.label)] = (pk, by)
    return out
