"""Per-packet cost with BPF_PROG_TEST_RUN, in ns/packet.

The programs run on a host-mode endpoint (XDP = ingress) whose group holds
N ingress rules (bench.control.rules: mixed CIDRs and port ranges). Cases:

- ``empty``: an XDP program that returns XDP_PASS (the baseline);
- ``established``: a packet of a tracked TCP connection;
- ``denied``: a SYN from an address no rule mentions;
- ``denied_near``: a SYN from inside a rule's CIDR to a port it does not allow
  (the classifier finds classes but no port);
- ``new``: SYNs of distinct connections allowed by a rule (each run once, so
  each is a new flow: classification + conntrack insert), against ``empty``
  run the same way.
- ``lookup``: the unit that travels between machines -- a program that does
  one lookup of a 44-byte key (a conntrack key's size) in a hash map of 1M
  entries, and nothing else (``lookup_once``: distinct keys, each run once).
  A path costs (path - empty) / (lookup - empty) lookups.

``repeat`` runs give the mean of many runs of one packet; the median of
several repeats is reported.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import statistics
import subprocess
import tempfile
from typing import Any, Dict, List

from controller import abi
from controller.kernel import bpfsys, conntrack
from controller.kernel.dataplane import Dataplane
from controller.kernel.frames import frame, tcp4_variant
from controller.policy.evaluator import TCP_ACK, TCP_SYN, Packet, addr
from controller.policy.formats import load_document
from controller.reconcile.converge import Reconciler
from controller.tools.bench.rulesets import rules

LOCAL = "198.18.0.10"
EMPTY_XDP = "int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }"
LOOKUP_ENTRIES = 1 << 20
LOOKUP_XDP = """
struct ref_key { u8 b[44]; };
BPF_HASH(ref, struct ref_key, u64, LOOKUP_ENTRIES);
int xdp_lookup(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct ref_key k = {};
	if (data + 30 > end)
		return XDP_ABORTED;
	__builtin_memcpy(k.b, data + 26, 4);  /* the IPv4 source: a key the map holds */
	return ref.lookup(&k) ? XDP_PASS : XDP_DROP;
}
"""


def empty_program() -> int:
    from bcc import BPF

    b = BPF(text=EMPTY_XDP)
    fn = b.load_func(b"xdp_pass", BPF.XDP)
    return os.dup(fn.fd)


def _median_ns(fd: int, data: bytes, idx: int, repeat: int, runs: int) -> float:
    return statistics.median(bpfsys.test_run(fd, data, idx, True, repeat=repeat)[1]
                             for _ in range(runs))


class LookupProgram:
    """The reference: one hash lookup (module docstring). Keys are the 4-byte
    big-endian numbers 0 .. LOOKUP_ENTRIES - 1 followed by 40 zero bytes, so
    a packet from 10.x.y.z (as a number below LOOKUP_ENTRIES) hits."""

    def __init__(self) -> None:
        from bcc import BPF

        self.bpf = BPF(text=LOOKUP_XDP.encode(), cflags=[f"-DLOOKUP_ENTRIES={LOOKUP_ENTRIES}"])
        self.fd = self.bpf.load_func(b"xdp_lookup", BPF.XDP).fd
        t = self.bpf[b"ref"]
        chunk = 1 << 16
        for start in range(0, LOOKUP_ENTRIES, chunk):
            keys = (t.Key * chunk)()
            for i in range(chunk):
                keys[i].b[:4] = list((start + i).to_bytes(4, "big"))
            t.items_update_batch(keys, (t.Leaf * chunk)())

    BASE = frame(Packet(ipaddress.ip_address(0), addr(LOCAL), 6, 1, 1))

    @classmethod
    def frame(cls, i: int) -> bytes:
        """A packet whose key is entry ``i`` (its source address is i)."""
        return tcp4_variant(cls.BASE, src=i.to_bytes(4, "big"))


class PacketBench:
    def __init__(self, ct_max: int = 1 << 20) -> None:
        tag = f"{os.getpid() % 100000}"
        self.dev = f"sgbp{tag}"
        subprocess.run(["ip", "link", "add", self.dev, "type", "veth", "peer", "name",
                        self.dev + "p"], check=True)
        self.idx = int(open(f"/sys/class/net/{self.dev}/ifindex").read())
        self.tmp = tempfile.mkdtemp(prefix="sgctl-pkt-")
        self.dp = Dataplane(pin_dir=f"/sys/fs/bpf/sgbp{tag}", ct_max=ct_max)
        self.rc = Reconciler(self.dp, self.tmp)
        self.progs = self.dp.programs()
        self.empty = empty_program()
        self.lookup = LookupProgram()
        self.rules: List[Dict[str, Any]] = []
        self._bases: Dict[Any, bytes] = {}

    def apply(self, n: int, nested: bool = False, check: bool = True) -> None:
        self.rules = rules(n, nested=nested)
        self.rc.converge(load_document({"sgctl": 1, "groups": {"sg-b": {
            "name": "b", "ingress": self.rules, "egress": []}},
            "interfaces": {"eni-b": {"groups": ["sg-b"], "ipv4": [LOCAL], "device": self.dev,
                                     "mode": "host", "source_dest_check": check}}}),
                      attach=False)
        self.flush()
        self.dp.set_clock(1000)

    def flush(self) -> None:
        conntrack.flush(self.dp)

    def allowed_packet(self, sport: int, flags: int = TCP_SYN) -> bytes:
        r = self.rules[len(self.rules) // 2]
        net = ipaddress.ip_network(r["from"], strict=False)
        lo = int(str(r["ports"]).split("-")[0])
        key = (net.network_address, lo, flags)
        if key not in self._bases:  # one scapy build per kind; ports are patched in
            self._bases[key] = frame(Packet(net.network_address, addr(LOCAL), 6, 1, lo,
                                            tcp_flags=flags))
        return tcp4_variant(self._bases[key], sport=sport)

    def measure(self, repeat: int = 100000, runs: int = 5, new_flows: int = 2000) -> Dict[str, float]:
        xdp = self.progs.xdp_fd
        out: Dict[str, float] = {}
        out["empty"] = _median_ns(self.empty, frame(Packet(addr("198.19.0.1"), addr(LOCAL), 6, 1,
                                                            1)), self.idx, repeat, runs)
        hit = self.lookup.frame(LOOKUP_ENTRIES // 2 + 12345)
        assert bpfsys.test_run(self.lookup.fd, hit, self.idx, True)[0] == 2, "reference missed"
        out["lookup"] = _median_ns(self.lookup.fd, hit, self.idx, repeat, runs)
        syn = self.allowed_packet(40000)
        assert bpfsys.test_run(xdp, syn, self.idx, True)[0] == 2, "allowed SYN was dropped"
        ack = self.allowed_packet(40000, TCP_ACK)
        out["established"] = _median_ns(xdp, ack, self.idx, repeat, runs)
        denied = frame(Packet(addr("198.19.0.1"), addr(LOCAL), 6, 1234, 1))
        assert bpfsys.test_run(xdp, denied, self.idx, True)[0] == 1, "denied SYN passed"
        out["denied"] = _median_ns(xdp, denied, self.idx, repeat, runs)
        r = self.rules[len(self.rules) // 2]
        near = frame(Packet(ipaddress.ip_network(r["from"], strict=False).network_address, addr(LOCAL), 6,
                            1234, 7))
        out["denied_near"] = _median_ns(xdp, near, self.idx, repeat, runs)
        frames = [self.allowed_packet(1024 + i) for i in range(new_flows)]
        empties = [bpfsys.test_run(self.empty, f, self.idx, True)[1] for f in frames]
        news = [bpfsys.test_run(xdp, f, self.idx, True)[1] for f in frames]
        step = LOOKUP_ENTRIES // (new_flows + 1)
        once = [bpfsys.test_run(self.lookup.fd, self.lookup.frame(i * step), self.idx, True)[1]
                for i in range(new_flows)]
        out["empty_once"] = statistics.median(empties)
        out["new"] = statistics.median(news)
        out["lookup_once"] = statistics.median(once)
        return out

    def measure_source_check(self, n: int, repeat: int, runs: int,
                             new_flows: int) -> Dict[str, float]:
        """Established and new flows with SourceDestCheck off and on (1.6):
        on the XDP ingress hook of a host-mode interface the check is the
        destination's lookup in sg_local_addrs (egress looks up the source
        the same way). Measured off, on, off, on; the median of each."""
        got: Dict[str, List[float]] = {}
        for check in (False, True, False, True):
            self.apply(n, check=check)
            m = self.measure(repeat, runs, new_flows)
            key = "on" if check else "off"
            for what in ("empty", "established", "new"):
                got.setdefault(f"{what}_{key}", []).append(m[what])
        return {"rules": n, **{k: statistics.median(v) for k, v in got.items()}}

    def measure_flowlog(self, repeat: int, runs: int, new_flows: int) -> Dict[str, float]:
        """The same packets with flow logs on: ``established`` (+ the
        connection's accounting), ``denied_sent`` (every packet an event in
        the ring, drained between runs), ``denied_limited`` (a flood over the
        default 10,000 events/s: the bucket says no, the skip is counted),
        ``new`` (a tracked start event each; ``new_off`` the same SYNs with
        flow logs off, on the same table state: single runs vary with it)."""

        ring = bpfsys.Ring(f"{self.dp.pin_dir}/sg_flow_events", lambda ev: None, abi.FlowEvent)
        xdp = self.progs.xdp_fd
        out: Dict[str, float] = {}
        try:
            self.flush()
            self.dp.set_config(abi.CFG_FLOW_LOG, abi.CFG_FLOW_LOG, flow_cost_ns=1,
                               flow_burst_ns=10**9)  # no limit to speak of
            syn = self.allowed_packet(40000)
            bpfsys.test_run(xdp, syn, self.idx, True)
            out["established"] = _median_ns(xdp, self.allowed_packet(40000, TCP_ACK), self.idx,
                                            repeat, runs)
            denied = frame(Packet(addr("198.19.0.1"), addr(LOCAL), 6, 1234, 1))
            batch = min(repeat, 20000)  # the ring holds ~58k events
            sent = []
            for _ in range(runs):
                ring.consume()
                sent.append(bpfsys.test_run(xdp, denied, self.idx, True, repeat=batch)[1])
            out["denied_sent"] = statistics.median(sent)
            ring.consume()
            for key, flag in (("new_off", 0), ("new", abi.CFG_FLOW_LOG)):  # same table state
                self.flush()
                self.dp.set_config(abi.CFG_FLOW_LOG, flag)
                news = [bpfsys.test_run(xdp, self.allowed_packet(1024 + i), self.idx, True)[1]
                        for i in range(new_flows)]
                out[key] = statistics.median(news)
                ring.consume()
            cost = 10**9 // 10000
            self.dp.set_config(abi.CFG_FLOW_LOG, abi.CFG_FLOW_LOG, flow_cost_ns=cost,
                               flow_burst_ns=cost * 10000)
            out["denied_limited"] = _median_ns(xdp, denied, self.idx, repeat, runs)
        finally:
            self.dp.set_config(abi.CFG_FLOW_LOG, 0)
            ring.close()
            self.flush()
        return out

    def close(self) -> None:
        os.close(self.empty)
        self.rc.reset()
        subprocess.run(["ip", "link", "del", self.dev], capture_output=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


def fill_conntrack(dp: Dataplane, n: int, ep_id: int = 1, chunk: int = 50000) -> None:
    """n live entries of other flows (the table's size matters, not their content)."""
    m = dp.map("sg_conntrack")
    for start in range(0, n, chunk):
        keys, vals = [], []
        for i in range(start, min(n, start + chunk)):
            k = abi.CtKey(ep_id=ep_id, family=4, proto=17, lport=i & 0xFFFF, rport=i >> 16)
            k.remote[0] = 0x0A000000 + i
            keys.append(k)
            vals.append(abi.CtEntry(last_seen=1000, state=abi.CT_ESTABLISHED))
        m.update_batch(keys, vals)


def run(sizes: List[int], ct_sizes: List[int], repeat: int, runs: int,
        new_flows: int) -> Dict[str, Any]:
    """ns/packet per rule count (empty conntrack) and per conntrack size (1k rules)."""
    b = PacketBench(ct_max=max([1 << 16, *[n + 4096 for n in ct_sizes]]))
    out: Dict[str, Any] = {"by_rules": [], "by_conntrack": []}
    try:
        for n in sizes:
            b.apply(n)
            out["by_rules"].append({"rules": n, **b.measure(repeat, runs, new_flows)})
        out["flow_logs"] = {"rules": sizes[-1], **b.measure_flowlog(repeat, runs, new_flows)}
        out["source_check"] = b.measure_source_check(sizes[-1], repeat, runs, new_flows)
        for n in ct_sizes:
            b.apply(1000)
            fill_conntrack(b.dp, n)
            out["by_conntrack"].append({"entries": n, **b.measure(repeat, runs, new_flows)})
    finally:
        b.close()
    return out
