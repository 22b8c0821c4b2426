"""Prometheus metrics of the daemon (prometheus_client), names under sgctl_.

Counters come straight from the kernel's per-CPU maps at scrape time (a
custom collector), so there is no second bookkeeping to drift:

- sgctl_packets_total / sgctl_bytes_total {interface, device, direction,
  verdict, reason}: every packet of a bound interface, by the named reason
  the datapath gave it (verdict ACCEPT or REJECT);
- sgctl_conntrack_entries {interface}, sgctl_conntrack_allowance {interface},
  sgctl_conntrack_limit {interface},
  sgctl_conntrack_allowance_available {interface},
  sgctl_conntrack_allowance_exceeded_total {interface},
  sgctl_conntrack_half_open_evicted_total {interface}: from the last
  conntrack GC pass, the drop_ct_full counters and sg_ct_quota;
- sgctl_policy_generation; sgctl_apply_duration_seconds (histogram of the
  time to enforce a change);
- sgctl_map_entries / sgctl_map_capacity / sgctl_map_fill_ratio {map} for
  every hash and LPM map (conntrack from the last GC pass);
- with flow logs on: sgctl_flow_log_records_total {log_status},
  sgctl_flow_log_events_total, sgctl_flow_log_skipped_events_total {interface}.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controller.abi.reasons import Reason
from controller.kernel.conntrack import allowance
from controller.kernel.counters import endpoint_counters, rule_hit_table
from controller.kernel.dataplane import Dataplane
from controller.reconcile.applied import EndpointRecord
from controller.service.flowlog import FlowLogger
from controller.service.status import map_fill


def host_port(text: str, flag: str, other: str = "") -> Tuple[str, int]:
    """``host:port`` (``[v6]:port``) -> (host, port); ValueError names
    ``flag`` and what else it takes (``other``)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{flag} {text!r}: expected host:port{other}")
    return host.strip("[]") or "127.0.0.1", int(port)


def parse_address(text: str) -> Optional[Tuple[str, int]]:
    """``--metrics-address``: ``host:port`` -> (host, port); ``none`` -> None."""
    if text.strip().lower() == "none":
        return None
    return host_port(text, "--metrics-address", " or none")


CACHE_SECONDS = 1.0  # scrapes within this share one reading of the maps


@dataclass
class Snapshot:
    """What the daemon tells its metrics, taken under its lock."""

    endpoints: Dict[str, EndpointRecord]  # bound here, by eni id
    rule_index: Dict[str, int]  # rule id -> kernel rule number
    rules: List[Tuple[str, str]]  # (group id, rule id) of every rule
    generation: int
    live: Optional[Dict[int, int]]  # ep id -> conntrack entries at the last GC (None: no GC yet)
    flows: Optional[FlowLogger]
    half_open: Dict[int, int] = field(default_factory=dict)  # ep id -> of them still new


class SgctlCollector(Collector):
    """Reads the maps with batch lookups (one syscall per interface for its
    counters, one per 64k rule numbers for hits), at most once a second:
    any number of scrapers cost the daemon one reading per second."""

    def __init__(self, dp: Dataplane, snapshot: Callable[[], Snapshot]) -> None:
        self.dp, self.snapshot = dp, snapshot
        self.lock = threading.Lock()
        self.cached: List[Metric] = []
        self.at = -CACHE_SECONDS

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            now = time.monotonic()
            if now - self.at >= CACHE_SECONDS:
                self.cached = list(self.read())
                self.at = time.monotonic()
            return iter(self.cached)

    def read(self) -> Iterator[Metric]:
        snap, dp = self.snapshot(), self.dp
        endpoints = snap.endpoints
        labels = ["interface", "device", "direction", "verdict", "reason"]
        packets = CounterMetricFamily("sgctl_packets", "Packets by interface, direction, "
                                      "verdict and reason", labels=labels)
        nbytes = CounterMetricFamily("sgctl_bytes", "Bytes by interface, direction, verdict "
                                     "and reason", labels=labels)
        counters = {eni: endpoint_counters(dp, ep.ep_id) for eni, ep in endpoints.items()}
        for eni, ep in sorted(endpoints.items()):
            for (direction, reason), (pk, by) in counters[eni].items():
                verdict = "ACCEPT" if Reason[reason.upper()].allowed else "REJECT"
                values = [eni, ep.device or "", direction, verdict, reason]
                packets.add_metric(values, pk)
                nbytes.add_metric(values, by)
        yield packets
        yield nbytes

        entries = GaugeMetricFamily("sgctl_conntrack_entries", "Tracked connections (last GC "
                                    "pass)", labels=["interface"])
        allowed = GaugeMetricFamily("sgctl_conntrack_allowance", "Half-open connections the "
                                    "interface may hold", labels=["interface"])
        limits = GaugeMetricFamily("sgctl_conntrack_limit", "Connections the interface may "
                                   "hold in all (0: no limit)", labels=["interface"])
        avail = GaugeMetricFamily("sgctl_conntrack_allowance_available", "Connections the "
                                  "interface can still open without reclaiming a half-open "
                                  "one (within its limit and the host's shared table)",
                                  labels=["interface"])
        evicted = CounterMetricFamily("sgctl_conntrack_half_open_evicted", "Half-open "
                                      "connections deleted to make room for newer ones of the "
                                      "same interface", labels=["interface"])
        exceeded = CounterMetricFamily("sgctl_conntrack_allowance_exceeded", "Packets of new "
                                       "flows dropped because its limit or the table was "
                                       "full",
                                       labels=["interface"])
        live = snap.live or {}
        for eni, ep in sorted(endpoints.items()):
            fig = allowance(dp, live, snap.half_open, ep.ep_id, ep.ring, counters[eni], ep.ct_limit)
            entries.add_metric([eni], fig["conntrack_entries"])
            allowed.add_metric([eni], fig["conntrack_allowance"])
            limits.add_metric([eni], fig["conntrack_limit"])
            evicted.add_metric([eni], fig["conntrack_half_open_evicted"])
            avail.add_metric([eni], fig["conntrack_allowance_available"])
            exceeded.add_metric([eni], fig["conntrack_allowance_exceeded"])
        yield entries
        yield allowed
        yield limits
        yield avail
        yield exceeded
        yield evicted

        hits = CounterMetricFamily("sgctl_rule_hits", "Packets of the connections (and untracked "
                                   "flows) each rule allowed", labels=["group_id", "rule_id"])
        rbytes = CounterMetricFamily("sgctl_rule_bytes", "Bytes of the connections (and "
                                     "untracked flows) each rule allowed",
                                     labels=["group_id", "rule_id"])
        numbers = snap.rule_index
        table = rule_hit_table(dp, max(numbers.values(), default=0))
        for gid, rid in snap.rules:
            num = numbers.get(rid)
            if num is None or not 0 < num < len(table):
                continue
            pk, by, _ = table[num]
            hits.add_metric([gid, rid], pk)
            rbytes.add_metric([gid, rid], by)
        yield hits
        yield rbytes

        yield GaugeMetricFamily("sgctl_policy_generation", "Generation of the enforced "
                                "desired state", value=snap.generation)

        m_entries = GaugeMetricFamily("sgctl_map_entries", "Entries in each map", labels=["map"])
        m_cap = GaugeMetricFamily("sgctl_map_capacity", "Capacity of each map", labels=["map"])
        m_fill = GaugeMetricFamily("sgctl_map_fill_ratio", "entries / capacity", labels=["map"])
        for row in map_fill(dp, sum(live.values()) if snap.live is not None else None):
            if row["array"]:
                continue
            m_entries.add_metric([row["map"]], row["entries"])
            m_cap.add_metric([row["map"]], row["capacity"])
            m_fill.add_metric([row["map"]], row["fill"])
        yield m_entries
        yield m_cap
        yield m_fill

        flows = snap.flows
        if flows is not None:
            recs = CounterMetricFamily("sgctl_flow_log_records", "Flow log records written, by "
                                       "log-status (OK, NODATA, SKIPDATA)", labels=["log_status"])
            for status, n in sorted(flows.records_total.items()):
                recs.add_metric([status], n)
            yield recs
            yield CounterMetricFamily("sgctl_flow_log_events", "Flow events read from the "
                                      "datapath's ring", value=flows.events_total)
            skipped = CounterMetricFamily("sgctl_flow_log_skipped_events", "Flow events the "
                                          "datapath held back (rate limit or full ring)",
                                          labels=["interface"])
            for eni, ep in sorted(endpoints.items()):
                skipped.add_metric([eni], flows.skipped_of(ep.ep_id))
            yield skipped


class Metrics:
    """The registry, the apply histogram and the HTTP endpoint."""

    def __init__(self, dp: Dataplane, snapshot: Callable[[], Snapshot]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(SgctlCollector(dp, snapshot))
        self.apply_seconds = Histogram(
            "sgctl_apply_duration_seconds", "Time to enforce a change (API call or host event)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry)
        self.ec2_requests = Counter(
            "sgctl_ec2_requests", "Requests the EC2 endpoint answered, by action (other: not "
            "one it serves) and code (OK, or the EC2 error code: AuthFailure, ...)",
            labelnames=["action", "code"], registry=self.registry)
        self.server: Any = None

    def serve(self, host: str, port: int) -> None:
        self.server, _ = start_http_server(port, addr=host, registry=self.registry)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
