"""Flow logs: AWS VPC Flow Logs records from the datapath.

Two sources, one record stream:

- packets of tracked connections are counted in their conntrack entry
  (per direction: packets, IP bytes, TCP flags); at the end of each capture
  window the logger scans the table and reports each entry's growth since
  the previous scan (entries the conntrack GC deletes are reported from
  their last values, ``retire``);
- every other packet worth logging (rejected ones, untracked flows, ICMP
  errors, fragments) arrives as one event through the ``sg_flow_events``
  ring, rate-limited per CPU in the datapath. Events the limit or a full
  ring held back are counted per endpoint and become a ``SKIPDATA`` record
  for that interface and window, as AWS does. The first packet of a tracked
  connection also sends an event, for its exact time and rule.

Records aggregate per interface, direction, 5-tuple and action over the
window; an interface with nothing to report gets ``NODATA``. Fields and
their order are AWS's (``DEFAULT_FORMAT`` is version 2; a custom format may
use the later fields and our extras ``reject-reason``, ``rule-id``,
``group-id``, ``interface``); output is text (space-separated, ``-`` for
"no value") or JSON lines, to rotating files and/or stdout. The newest
records are also kept in memory for ``sgctl flows tail``.
"""

from __future__ import annotations

import ipaddress
import logging
import logging.handlers
import os
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Tuple

import orjson

from controller import abi
from controller.abi.reasons import Reason
from controller.kernel import bpfsys, flowring
from controller.kernel.conntrack import CLOCK_MONOTONIC_COARSE, WallClock
from controller.kernel.counters import flow_skip_table, flow_skips
from controller.kernel.dataplane import Dataplane
from controller.service.flowformat import DEFAULT_FORMAT, FIELDS, FlowLogError, parse_format, text_line

log = logging.getLogger("sgctl")

WINDOW_MIN, WINDOW_MAX, WINDOW_DEFAULT = 1, 600, 60
ICMP_PROTOS = (1, 58)


@dataclass
class FlowRecord:
    """One line of the flow log. Flow fields are None for NODATA/SKIPDATA."""

    interface_id: str
    device: str
    start: int
    end: int
    log_status: str  # OK | NODATA | SKIPDATA
    account_id: str = "-"
    direction: Optional[str] = None  # ingress | egress
    family: Optional[int] = None
    protocol: Optional[int] = None
    srcaddr: Optional[str] = None
    dstaddr: Optional[str] = None
    srcport: Optional[int] = None
    dstport: Optional[int] = None
    packets: Optional[int] = None
    bytes: Optional[int] = None
    action: Optional[str] = None  # ACCEPT | REJECT
    tcp_flags: Optional[int] = None
    reject_reason: Optional[str] = None
    rule_id: Optional[str] = None
    group_id: Optional[str] = None
    version: int = 2

    def value(self, name: str) -> Any:
        if name in ("version", "start", "end", "log-status", "account-id", "interface-id"):
            return getattr(self, name.replace("-", "_"))
        if name == "interface":
            return self.device
        if name in ("pkt-srcaddr", "pkt-dstaddr"):  # no NAT here: the packet's own
            return self.srcaddr if name == "pkt-srcaddr" else self.dstaddr
        if name == "type":
            return None if self.family is None else f"IPv{self.family}"
        if name == "flow-direction":
            return self.direction
        attr = name.replace("-", "_")
        return getattr(self, attr, None)  # AWS-only fields (vpc-id, region, ...) stay "-"

    def as_dict(self, fields: Iterable[str]) -> Dict[str, Any]:
        return {f: self.value(f) for f in fields}


def render_text(rec: FlowRecord, fields: List[str]) -> str:
    return text_line(rec.as_dict(fields), fields)


def render_json(rec: FlowRecord, fields: List[str]) -> str:
    return orjson.dumps(rec.as_dict(fields)).decode()


@dataclass
class FlowLogConfig:
    outputs: List[str] = field(default_factory=list)  # file paths, "-" = stdout
    format: str = DEFAULT_FORMAT
    window: int = WINDOW_DEFAULT  # seconds
    encoding: str = "text"  # text | json
    rate: int = 10000  # events per second per CPU
    burst: int = 10000  # events a CPU may send at once after a quiet period
    interface_rate: int = 0  # of them, per second from one interface (0: a quarter of rate)
    max_bytes: int = 100 << 20  # per file before rotating
    backups: int = 5
    account_id: str = "-"
    keep: int = 10000  # records kept in memory for `flows tail`
    max_flows: int = 200000  # aggregated flows per window; events of more are skipped

    def check(self) -> List[str]:
        """The fields of the format; raises FlowLogError naming what is wrong."""
        fields = parse_format(self.format)
        if not WINDOW_MIN <= self.window <= WINDOW_MAX:
            raise FlowLogError(f"flow log window {self.window}: must be "
                               f"{WINDOW_MIN}-{WINDOW_MAX} seconds")
        if self.encoding not in ("text", "json"):
            raise FlowLogError(f"flow log encoding {self.encoding!r}: must be text or json")
        if self.rate < 1 or self.burst < 1:
            raise FlowLogError("flow log rate and burst must be at least 1 event")
        if not 0 <= self.interface_rate <= self.rate:
            raise FlowLogError(f"flow log interface rate {self.interface_rate}: must be 1 to "
                               f"the host's rate ({self.rate}), or 0 for a quarter of it")
        return fields

    def per_interface(self) -> Tuple[int, int]:
        """(rate, burst) of one interface's own share of a CPU's events: a
        burst of as many seconds as the host's."""
        rate = self.interface_rate or max(1, self.rate // 4)
        return rate, max(1, self.burst * rate // self.rate)


# aggregation key: (ep_id, direction, family, protocol, src, dst, sport, dport, action)
AggKey = Tuple[int, int, int, int, bytes, bytes, int, int, str]


@dataclass
class Agg:
    packets: int = 0
    bytes: int = 0
    start: Optional[float] = None  # wall clock
    end: Optional[float] = None
    tcp_flags: int = 0
    reason: int = -1
    rule_index: int = 0

    def seen(self, t: float) -> None:
        self.start = t if self.start is None else min(self.start, t)
        self.end = t if self.end is None else max(self.end, t)


# a conntrack entry's accounting is its tail: tcp_flags[2], icmp type and code,
# packets[2], bytes[2]; the scan keeps only that tail of each entry
ACCT_OFFSET = abi.CtEntry.tcp_flags.offset


def _accounting(tail: Optional[bytes]) -> abi.CtEntry:
    """An entry holding only the accounting of a kept tail (zero: none)."""
    return abi.CtEntry.from_buffer_copy(bytes(ACCT_OFFSET) + tail) if tail else abi.CtEntry()

# ep_id -> (interface id, device); rule number -> (rule id, group id)
Names = Tuple[Dict[int, Tuple[str, str]], Dict[int, Tuple[str, str]]]


FLOW_LOG_MODE = 0o640  # records name hosts and ports: not for every local user


class _PrivateRotatingFile(logging.handlers.RotatingFileHandler):
    """Each file (the first and every rotated one) created 0640, whatever
    the umask; an existing file is tightened to it."""

    def _open(self):  # type: ignore[no-untyped-def]
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                     FLOW_LOG_MODE)
        os.fchmod(fd, os.fstat(fd).st_mode & FLOW_LOG_MODE)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)


class FlowLogger:
    """Owns the ring reader, the aggregation of the open window and the sinks."""

    def __init__(self, dp: Dataplane, cfg: FlowLogConfig, names: Callable[[], Names]) -> None:
        self.dp = dp
        self.cfg = cfg
        self.fields = cfg.check()
        self.version = max(2, *(FIELDS[f] for f in self.fields))
        self.names = names
        self.lock = threading.Lock()
        self.agg: Dict[AggKey, Agg] = {}
        self.snap: Dict[bytes, bytes] = {}  # ct key -> its accounting at the last scan
        self.snap_lock = threading.Lock()
        self.skips_seen: Dict[int, int] = {}
        self.user_skips: Dict[int, int] = {}  # ep_id -> events dropped here (max_flows)
        self.last_endpoints: Dict[int, Tuple[str, str]] = {}  # names at the last window end
        self.window_start = time.time()
        self.recent: Deque[Tuple[int, FlowRecord]] = deque(maxlen=cfg.keep)
        self.seq = 0
        self.records_total: Dict[str, int] = {"OK": 0, "NODATA": 0, "SKIPDATA": 0}
        self.events_total = 0
        self.skipped_total = 0
        self._out = self._sinks()
        self._ring: Optional[bpfsys.Ring] = None
        self._offset_ns = 0  # wall clock - the datapath's (coarse monotonic), per drain

    # ------------------------------------------------------------ set-up

    def _sinks(self) -> logging.Logger:
        out = logging.getLogger(f"sgctl.flows.{id(self)}")
        out.propagate = False
        out.setLevel(logging.INFO)
        for target in self.cfg.outputs:
            h: logging.Handler
            if target == "-":
                h = logging.StreamHandler(sys.stdout)
            else:
                h = _PrivateRotatingFile(target, maxBytes=self.cfg.max_bytes,
                                         backupCount=self.cfg.backups)
            h.setFormatter(logging.Formatter("%(message)s"))
            out.addHandler(h)
        return out

    def start(self) -> None:
        """Switch the datapath's flow logging on and open the ring."""
        self._ring = flowring.open_ring(self.dp, self._event)
        self.dp.map("sg_flow_skips")
        self._skips()  # skips from before this logger are not ours to report
        self._scan_conntrack(report=False)  # the baseline: only growth is reported
        flowring.switch_on(self.dp, self.cfg.rate, self.cfg.burst, *self.cfg.per_interface())
        self.window_start = time.time()

    def stop(self) -> None:
        """Flow logging off (nobody would read the ring), last window written."""
        try:
            flowring.switch_off(self.dp)
        except OSError as exc:
            log.error("switching flow logs off failed: %s", exc)
        self.close_window()
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        for h in list(self._out.handlers):
            h.close()
            self._out.removeHandler(h)

    # ------------------------------------------------------------ input

    def drain(self) -> int:
        if self._ring is None:
            return 0
        self._offset_ns = time.time_ns() - time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)
        with self.lock:
            return self._ring.consume()

    def _event(self, ev: abi.FlowEvent) -> None:
        self.events_total += 1
        fam = int(ev.family)
        src = abi.words_bytes(ev.src, fam)
        dst = abi.words_bytes(ev.dst, fam)
        icmp = ev.proto in ICMP_PROTOS
        sport = 0 if icmp else socket.ntohs(ev.sport)
        dport = 0 if icmp else socket.ntohs(ev.dport)
        action = "ACCEPT" if Reason(ev.reason).allowed else "REJECT"
        key = (int(ev.ep_id), int(ev.dir), fam, int(ev.proto), src, dst, sport, dport, action)
        a = self.agg.get(key)
        if a is None:
            if len(self.agg) >= self.cfg.max_flows:  # a flood of distinct flows: memory bound
                self.user_skips[key[0]] = self.user_skips.get(key[0], 0) + 1
                return
            a = self.agg[key] = Agg()
        a.seen((ev.ts_ns + self._offset_ns) / 1e9)
        a.rule_index = a.rule_index or int(ev.rule_index)
        a.reason = int(ev.reason)
        if not ev.tracked:  # a tracked connection's packets are counted in its entry
            a.packets += 1
            a.bytes += int(ev.bytes)
            a.tcp_flags |= int(ev.tcp_flags)

    def _scan_conntrack(self, report: bool = True,
                        entries: Optional[Iterable[Tuple[Any, Any]]] = None) -> None:
        """Each entry's growth since the previous scan into the window; with
        ``entries`` (being deleted) just those, which leave the snapshot.
        The scan (seconds at a million entries) holds only ``snap_lock``, so
        the ring keeps being drained meanwhile."""
        retire = entries is not None
        with self.snap_lock:
            if entries is None:
                entries = self.dp.map("sg_conntrack").batch_items()
            clock = WallClock.read(self.dp)
            seen: Dict[bytes, bytes] = {}
            grown = []
            for k, e in entries:
                kb, raw = bytes(k), bytes(e)[ACCT_OFFSET:]
                prev = self.snap.get(kb)
                seen[kb] = raw
                if report and raw != prev and not e.flags & abi.CT_F_EXEMPT:
                    grown.append((k, e, raw, prev))  # (exempt traffic is not logged)
            if retire:
                for kb in seen:
                    self.snap.pop(kb, None)
            else:
                self.snap = seen
        with self.lock:
            for k, e, raw, prev in grown:
                cur, old = _accounting(raw), _accounting(prev)
                if any(cur.packets[d] < old.packets[d] for d in (0, 1)):
                    old = abi.CtEntry()  # the key was reused by a new flow
                last = clock.of(int(e.last_seen))
                for d in (abi.DIR_INGRESS, abi.DIR_EGRESS):
                    pk, by = cur.packets[d] - old.packets[d], cur.bytes[d] - old.bytes[d]
                    if pk > 0:
                        self._add_tracked(k, e, d, pk, by, cur.tcp_flags[d] & ~old.tcp_flags[d],
                                          last)

    def _add_tracked(self, k: Any, e: Any, d: int, pk: int, by: int, flags: int,
                     last: float) -> None:
        fam = int(k.family)
        local, remote = abi.words_bytes(k.local, fam), abi.words_bytes(k.remote, fam)
        lport, rport = socket.ntohs(k.lport), socket.ntohs(k.rport)
        if k.proto not in (6, 17):  # ICMP keys hold the echo id: not a port
            lport = rport = 0
        if d == abi.DIR_INGRESS:
            tup = (remote, local, rport, lport)
        else:
            tup = (local, remote, lport, rport)
        key = (int(k.ep_id), d, fam, int(k.proto), *tup, "ACCEPT")
        a = self.agg.setdefault(key, Agg())  # type: ignore[arg-type]
        a.packets += pk
        a.bytes += by
        a.tcp_flags |= flags
        a.rule_index = a.rule_index or int(e.rule_index)
        a.reason = a.reason if a.reason >= 0 else int(Reason.ALLOW_ESTABLISHED)
        if a.start is None:  # no event in this window: open since before it (or skipped)
            a.seen(self.window_start)
        a.seen(max(self.window_start, last))

    def retire(self, entries: List[Tuple[Any, Any]]) -> None:
        """Conntrack GC (or a flush, or an interface going away) is about to
        delete these: report what they last grew, under the names they had."""
        endpoints, _ = self.names()
        with self.lock:
            self.last_endpoints.update(endpoints)
        self._scan_conntrack(entries=entries)

    def skipped_of(self, ep_id: int) -> int:
        """Events of one endpoint the datapath held back, ever (all CPUs)."""
        return flow_skips(self.dp, ep_id)

    def _skips(self) -> Dict[int, int]:
        """Events held back per endpoint since the previous call."""
        out = {}
        for slot, total in enumerate(flow_skip_table(self.dp)):
            if total != self.skips_seen.get(slot, 0):
                out[slot] = max(0, total - self.skips_seen.get(slot, 0))
                self.skips_seen[slot] = total
        return out

    # ------------------------------------------------------------ output

    def close_window(self) -> List[FlowRecord]:
        """End the capture window now: records out, a new window begins."""
        self.drain()
        self._scan_conntrack()
        with self.lock:
            skips = self._skips()
            for ep_id, n in self.user_skips.items():
                skips[ep_id] = skips.get(ep_id, 0) + n
            self.user_skips = {}
            agg, self.agg = self.agg, {}
            start, end = int(self.window_start), int(time.time())
            self.window_start = time.time()
        endpoints, rules = self.names()
        # an interface removed during the window still gets its last records
        named, self.last_endpoints = {**self.last_endpoints, **endpoints}, endpoints
        records: List[FlowRecord] = []
        busy = set()
        for key, a in sorted(agg.items(), key=lambda kv: kv[1].start or 0):
            ep_id, d, fam, proto, src, dst, sport, dport, action = key
            if ep_id not in named or (a.packets == 0 and action == "ACCEPT"):
                continue  # the probe endpoint, an unbound one; a tracked start without packets
            eni, dev = named[ep_id]
            busy.add(ep_id)
            rule_id, group_id = rules.get(a.rule_index, (None, None))
            reason = Reason(a.reason).label if a.reason >= 0 else None
            records.append(FlowRecord(
                interface_id=eni, device=dev, account_id=self.cfg.account_id,
                version=self.version, log_status="OK",
                start=int(a.start or start), end=int(a.end or end),
                direction="ingress" if d == abi.DIR_INGRESS else "egress", family=fam,
                protocol=proto, srcaddr=str(ipaddress.ip_address(src)),
                dstaddr=str(ipaddress.ip_address(dst)), srcport=sport, dstport=dport,
                packets=a.packets, bytes=a.bytes, action=action, tcp_flags=a.tcp_flags,
                reject_reason=reason if action == "REJECT" else None,
                rule_id=rule_id if action == "ACCEPT" else None,
                group_id=group_id if action == "ACCEPT" else None))
        for ep_id, (eni, dev) in sorted(endpoints.items(), key=lambda kv: kv[1]):
            status = "SKIPDATA" if skips.get(ep_id) else None
            if status is None and ep_id not in busy:
                status = "NODATA"
            if status:
                records.append(FlowRecord(interface_id=eni, device=dev, start=start, end=end,
                                          log_status=status, account_id=self.cfg.account_id,
                                          version=self.version))
        self.skipped_total += sum(skips.values())
        self._write(records)
        return records

    def _write(self, records: List[FlowRecord]) -> None:
        render = render_json if self.cfg.encoding == "json" else render_text
        with self.lock:
            for r in records:
                self.seq += 1
                self.recent.append((self.seq, r))
                self.records_total[r.log_status] += 1
        for r in records:
            self._out.info(render(r, self.fields))

    def query(self, since: int = 0, interface: Optional[str] = None,
              action: Optional[str] = None, limit: int = 1000) -> Dict[str, Any]:
        """Records after sequence ``since`` (``flows tail``), oldest first."""
        with self.lock:
            items = [(s, r) for s, r in self.recent if s > since]
            last = self.seq
        if interface:
            items = [(s, r) for s, r in items if interface in (r.interface_id, r.device)]
        if action:
            items = [(s, r) for s, r in items if r.action == action.upper()]
        items = items[-limit:] if limit else items
        every = list(FIELDS)
        return {"Records": [{"Sequence": s, **r.as_dict(every)} for s, r in items],
                "Next": last, "Format": self.fields, "Encoding": self.cfg.encoding}

    def stats(self) -> Dict[str, Any]:
        return {"outputs": self.cfg.outputs, "window": self.cfg.window,
                "format": self.fields, "encoding": self.cfg.encoding,
                "rate_per_cpu": self.cfg.rate,
                "interface_rate_per_cpu": self.cfg.per_interface()[0],
                "records": dict(self.records_total),
                "events": self.events_total, "skipped": self.skipped_total}

    # ------------------------------------------------------------ thread

    def run(self, stopping: threading.Event, poll: float = 0.1) -> None:
        w = self.cfg.window
        next_close = (int(time.time()) // w + 1) * w
        while not stopping.wait(poll):
            try:
                self.drain()
                if time.time() >= next_close:
                    self.close_window()
                    next_close = (int(time.time()) // w + 1) * w
            except Exception as exc:  # keep logging; the next window retries
                log.error("flow log: %s", exc)
