"""Conntrack maintenance from user space: list, flush, garbage-collect, and
the allowance figures.

The datapath never evicts a live entry and reuses an expired one only for
its own key, so expired entries stay until ``gc`` removes them. The clock is
the datapath's: CLOCK_MONOTONIC seconds (``bpf_ktime_get_coarse_ns``), or the
frozen test clock in ``sg_config.now_override``.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

from controller import abi
from controller.abi import CT_CLOSING, CT_ESTABLISHED, CT_NEW, CT_STREAM
from controller.abi.reasons import Reason
from controller.kernel import counters
from controller.kernel.counters import ct_evicted
from controller.kernel.dataplane import Dataplane
from controller.policy.evaluator import Evaluator
from controller.policy.model import (
    EGRESS,
    INGRESS,
    PROTO_ICMP,
    PROTO_ICMPV6,
    State,
    Timeouts,
    protocol_label,
)

CLOCK_MONOTONIC_COARSE = 6  # <linux/time.h>; the clock of bpf_ktime_get_coarse_ns()
STATE_NAMES = {CT_NEW: "new", CT_ESTABLISHED: "established", CT_STREAM: "stream",
               CT_CLOSING: "closing"}


def datapath_clock(dp: Dataplane) -> float:
    """The datapath's clock (seconds, with the fraction the datapath drops)."""
    cfg = dp.map("sg_config").lookup(ct.c_uint32(0))
    if cfg is not None and cfg.now_override:
        return float(cfg.now_override)
    return time.clock_gettime(CLOCK_MONOTONIC_COARSE)


def datapath_now(dp: Dataplane) -> int:
    """The datapath's clock as the datapath writes it: whole seconds."""
    return int(datapath_clock(dp))


@dataclass(frozen=True)
class WallClock:
    """Converts the datapath's whole-second stamps to wall-clock time. A stamp
    ``s`` means a moment in [s, s + 1); the conversion takes its start, so a
    time reported is never later than the event (at most a second early)."""
    dp_now: float
    wall_now: float

    @classmethod
    def read(cls, dp: Dataplane) -> WallClock:
        return cls(datapath_clock(dp), time.time())

    def of(self, stamp: int) -> float:
        return self.wall_now - max(0.0, self.dp_now - stamp)


def _timeouts(ep: abi.Endpoint) -> Timeouts:
    return Timeouts(**{name: int(ep.timeouts[i]) for i, name in enumerate(abi.TO_NAMES)})


def endpoint_timeouts(dp: Dataplane) -> Dict[int, Tuple[int, Timeouts]]:
    """ep_id -> (ifindex, timeouts), from the endpoints map itself."""
    return {int(ep.ep_id): (int(k.value), _timeouts(ep))  # type: ignore[attr-defined]
            for k, ep in dp.map("sg_endpoints").items()}


@dataclass
class Connection:
    ep_id: int
    ifindex: int
    proto: int
    local: str
    lport: int
    remote: str
    rport: int
    state: str
    origin: str  # which side opened it: "ingress" (remote) or "egress" (local)
    idle: int  # seconds since the last packet
    timeout: int
    rule_index: int

    def as_dict(self) -> dict:
        return {**self.__dict__, "protocol": protocol_label(self.proto)}


def _addr(words: object, family: int) -> str:
    return str(ipaddress.ip_address(abi.words_bytes(words, family)))  # type: ignore[arg-type]


def connections(dp: Dataplane, ep_ids: Optional[Iterable[int]] = None) -> List[Connection]:
    eps = endpoint_timeouts(dp)
    want = None if ep_ids is None else set(ep_ids)
    now = datapath_now(dp)
    out = []
    for k, e in dp.map("sg_conntrack").batch_items():
        if want is not None and k.ep_id not in want:
            continue
        idx, t = eps.get(k.ep_id, (0, Timeouts()))
        out.append(Connection(
            ep_id=k.ep_id, ifindex=idx, proto=k.proto, local=_addr(k.local, k.family),
            lport=socket.ntohs(k.lport), remote=_addr(k.remote, k.family),
            rport=socket.ntohs(k.rport),
            state=STATE_NAMES.get(e.state, str(e.state)),
            origin="ingress" if e.origin == abi.DIR_INGRESS else "egress",
            idle=max(0, now - e.last_seen), timeout=t.of(k.proto, e.state),
            rule_index=e.rule_index))
    return out


def _delete(dp: Dataplane, doomed: List[Tuple[abi.CtKey, abi.CtEntry]]) -> int:
    """Delete entries (one BPF_MAP_DELETE_BATCH); ``dp.retire`` (the flow
    logger, when there is one) sees their last values first. Each endpoint's
    deleted entries are added to its sg_ct_removed count (bpf/lib/types.h,
    sg_ct_quota), which its connection limit counts on."""
    if dp.retire is not None and doomed:
        dp.retire(doomed)
    gone = dp.map("sg_conntrack").delete_keys([k for k, _ in doomed])
    counters.count_removed(dp, Counter(int(k.ep_id) for k in gone))
    return len(gone)


def flush(dp: Dataplane, ep_ids: Optional[Iterable[int]] = None) -> int:
    """Delete the entries of ``ep_ids`` (all when None)."""
    want = None if ep_ids is None else set(ep_ids)
    return _delete(dp, [(k, e) for k, e in dp.map("sg_conntrack").batch_items()
                        if want is None or k.ep_id in want])


def cut_foreign(dp: Dataplane, own: Dict[int, set]) -> int:
    """Delete the connections of source-checked endpoints (ep_id -> their
    own addresses, packed) whose local address is not one of them: an
    address the interface lost, or connections opened while its check was
    off. Their packets skip the check (it was made when they opened)."""
    return _delete(dp, [(k, e) for k, e in dp.map("sg_conntrack").batch_items()
                        if k.ep_id in own and not e.flags & abi.CT_F_DHCP
                        and abi.words_bytes(k.local, k.family) not in own[k.ep_id]])


@dataclass
class GcResult:
    scanned: int
    removed: int
    live: Dict[int, int]  # ep_id -> live entries
    seconds: float
    half_open: Dict[int, int] = field(default_factory=dict)  # ep_id -> live entries still new


def gc(dp: Dataplane) -> GcResult:
    """Delete expired entries and entries of endpoints that no longer exist.

    An entry is re-read just before it is deleted, and kept if the datapath
    refreshed it in between; the window left is one map lookup long. The
    endpoints are read again after the scan (which takes seconds at 1M
    entries): an interface bound meanwhile owns its entries, they are not
    orphans."""
    start = time.monotonic()
    m = dp.map("sg_conntrack")
    eps = endpoint_timeouts(dp)
    now = datapath_now(dp)
    live: Dict[int, int] = {}
    half: Dict[int, int] = {}

    def alive(k: abi.CtKey, e: abi.CtEntry) -> bool:
        """Counted when its endpoint exists and it has not expired."""
        ep = eps.get(k.ep_id)
        if ep is None or _expired(ep[1], k, e, now):
            return False
        live[k.ep_id] = live.get(k.ep_id, 0) + 1
        if e.state == abi.CT_NEW:
            half[k.ep_id] = half.get(k.ep_id, 0) + 1
        return True

    doomed = []
    scanned = 0
    for k, e in m.batch_items():
        scanned += 1
        if not alive(k, e):
            doomed.append(k)
    if doomed:
        eps = endpoint_timeouts(dp)  # after the scan: bound since it started count too
    dead = []
    for k in doomed:
        e = m.lookup(k)
        if e is not None and not alive(k, e):
            dead.append((k, e))
    return GcResult(scanned, _delete(dp, dead), live, time.monotonic() - start, half)


def revalidate(dp: Dataplane, state: State, bound: Dict[int, str]) -> int:
    """The revalidate option: on interfaces with ``revalidate``, delete the
    tracked connections that ``state`` (just enforced) would not let open.
    The reference evaluator judges each connection's first packet, rebuilt
    from its key and, for ICMP, the type and code that opened it;
    connections alike in all the rules look at (interface, direction,
    protocol, remote address, rule port or type/code) share one answer.
    Connections opened by exempt traffic (infrastructure services, DHCP)
    are not the rules' to cut. ``bound``: endpoint id -> interface."""
    eps = {ep_id: eni for ep_id, eni in bound.items()
           if eni in state.interfaces and state.interfaces[eni].revalidate}
    if not eps:
        return 0
    ev = Evaluator(state)
    seen: Dict[tuple, bool] = {}
    doomed = []
    for k, e in dp.map("sg_conntrack").batch_items():
        eni = eps.get(k.ep_id)
        if eni is None or e.flags & abi.CT_F_EXEMPT:
            continue
        origin = INGRESS if e.origin == abi.DIR_INGRESS else EGRESS
        key = (eni, int(k.family), int(k.proto), ipaddress.ip_address(abi.words_bytes(k.local, k.family)),
               ipaddress.ip_address(abi.words_bytes(k.remote, k.family)), socket.ntohs(k.lport),
               socket.ntohs(k.rport))
        icmp = (int(e.icmp_type), int(e.icmp_code)) if k.proto in (PROTO_ICMP, PROTO_ICMPV6) \
            else (0, 0)
        rule_port = key[5] if origin == INGRESS else key[6]
        memo = (eni, origin, key[2], key[4], rule_port, icmp)
        if memo not in seen:
            seen[memo] = ev.would_open(key, origin, *icmp)  # type: ignore[arg-type]
        if not seen[memo]:
            doomed.append((k, e))
    return _delete(dp, doomed)


def _expired(t: Timeouts, k: abi.CtKey, e: abi.CtEntry, now: int) -> bool:
    return now > e.last_seen and now - e.last_seen > t.of(k.proto, e.state)


def allowance(dp: Dataplane, live: Dict[int, int], half_open: Dict[int, int], ep_id: int,
              ring: Tuple[int, int], counters: Dict[Tuple[str, str], Tuple[int, int]],
              limit: int = 0) -> Dict[str, int]:
    """AWS-named figures for one interface (at the last GC). Its allowance
    bounds its half-open connections (``ring``: its slots) and ``limit``
    all of them; ``available`` is what it can still open without reclaiming
    a half-open one, within its limit and what is left of the shared table.
    ``exceeded`` counts its packets dropped because its limit or the table
    was reached (``counters``: its endpoint_counters, already read by the
    caller); ``evicted``, its half-open connections deleted to make room
    for newer ones."""
    exceeded = sum(p for (_, r), (p, _) in counters.items() if r == Reason.DROP_CT_FULL.label)
    mine = live.get(ep_id, 0)
    available = max(0, dp.ct_max - sum(live.values()))
    if limit:
        available = min(available, max(0, limit - mine))
    size = ring[1]
    if size:
        available = min(available, max(0, size - half_open.get(ep_id, 0)))
    return {"conntrack_entries": mine,
            "conntrack_limit": limit,
            "conntrack_allowance": size,
            "conntrack_allowance_available": available,
            "conntrack_allowance_exceeded": exceeded,
            "conntrack_half_open_evicted": ct_evicted(dp, ep_id)}
