"""A flood of TCP SYNs from forged sources into a bridge, and the
conntrack-allowance scenario the test and the bench run with it
(``allowance_under_flood``).

An XDP program run with live frames (``BPF_F_TEST_XDP_LIVE_FRAMES``) on
one end of a veth pair sends every repeat of one SYN frame out into the
peer, which sits on the bridge; each repeat gets the next source address of
``SRC_SPAN`` in 198.19.0.0/16, and every ``SRC_SPAN`` frames the next
source port, so that every frame is a new flow (both checksums fixed, so
that the target's TCP stack answers). The rate is bounded by sending in batches of ``BATCH``
frames, paced to ``pps``; a run stops by itself after its seconds.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from controller import abi
from controller.kernel import bpfsys
from controller.kernel.counters import ct_evicted
from controller.kernel.dataplane import Dataplane
from controller.policy.formats import load_document
from controller.reconcile.converge import Reconciler
from controller.tools.topology import Servers, Topology, attach_xdp, echo_ok, sh

SRC_BASE = "198.19.0.0"
SRC_SPAN = 1 << 16
BATCH = 4096

GENERATOR = r"""
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>

BPF_ARRAY(sent, u64, 1);

/* RFC 1624: the checksum after a 32-bit word of what it covers changed */
static __always_inline __u16 csum_swap4(__u16 check, __u32 from, __u32 to)
{
	__u32 sum = (__u16)~check;
	sum += (~from & 0xffff) + (~from >> 16) + (to & 0xffff) + (to >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

int xdp_synflood(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	struct tcphdr *tcp = data + sizeof(struct ethhdr) + sizeof(struct iphdr);
	if ((void *)(tcp + 1) > end)
		return XDP_ABORTED;
	int k = 0;
	u64 *n = sent.lookup(&k);
	if (!n)
		return XDP_ABORTED;
	u64 i = __sync_fetch_and_add(n, 1);
	__u32 from = ip->saddr;
	__u32 to = bpf_htonl(SRC_BASE + (__u32)(i % SRC_SPAN));
	ip->saddr = to;
	ip->check = csum_swap4(ip->check, from, to);
	tcp->check = csum_swap4(tcp->check, from, to);
	/* past SRC_SPAN frames, the next source port: every frame a new flow */
	__u32 port_from = tcp->source;
	__u32 port_to = bpf_htons(1024 + (__u32)((i / SRC_SPAN) % 60000));
	tcp->source = port_to;
	tcp->check = csum_swap4(tcp->check, port_from, port_to);
	return XDP_TX;
}

int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }
"""


def generator(src_base: str, span: int = SRC_SPAN) -> Tuple[Any, Any, Any]:
    """The compiled generator (sources from ``src_base`` on), its
    xdp_synflood function and an XDP_PASS stub (for the veth peer)."""
    from bcc import BPF  # compiled here: only floods need it

    base = int(ipaddress.ip_address(src_base))
    bpf = BPF(text=GENERATOR.encode(), cflags=[f"-DSRC_BASE={base}U", f"-DSRC_SPAN={span}"])
    return bpf, bpf.load_func(b"xdp_synflood", BPF.XDP), bpf.load_func(b"xdp_pass", BPF.XDP)


class SynFlood:
    """``with SynFlood(bridge, mac, ip, port) as f: f.run(seconds, pps)``"""

    def __init__(self, bridge: str, dst_mac: str, dst_ip: str, dport: int) -> None:
        self.bpf, self.gen, stub = generator(SRC_BASE)
        tag = f"{os.getpid() % 100000}"
        self.tx, self.peer = f"sgfa{tag}", f"sgfb{tag}"
        sh("ip", "link", "add", self.tx, "type", "veth", "peer", "name", self.peer)
        self.closed = False
        try:
            sh("ip", "link", "set", self.peer, "master", bridge)
            for d in (self.tx, self.peer):
                sh("ip", "link", "set", d, "up")
            attach_xdp(self.peer, stub.fd)  # a veth takes XDP frames only with a program on the peer
            self.ifindex = int(open(f"/sys/class/net/{self.tx}/ifindex").read())
        except Exception:
            self.close()
            raise
        self.frame = bytes(Ether(dst=dst_mac) / IP(src=SRC_BASE, dst=dst_ip) /
                           TCP(sport=40000, dport=dport, flags="S", seq=1))

    def sent(self) -> int:
        return int(self.bpf[b"sent"][0].value)

    def run(self, seconds: float, pps: Optional[int] = None) -> int:
        """Flood for ``seconds`` (at most ``pps`` frames a second); the frames sent."""
        start = time.monotonic()
        first = self.sent()
        while (now := time.monotonic()) - start < seconds:
            bpfsys.test_run(self.gen.fd, self.frame, self.ifindex, True, repeat=BATCH, live=True)
            if pps:
                ahead = (self.sent() - first) / pps - (now - start)
                if ahead > 0:
                    time.sleep(min(ahead, seconds))
        return self.sent() - first

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            sh("ip", "link", "del", self.tx, check=False)

    def __enter__(self) -> SynFlood:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _half_open(dp: Dataplane, ep_id: int) -> int:
    """(Distinct keys: a batch walk of a table that changes under it can
    return an entry twice.)"""
    return len({bytes(k) for k, e in dp.map("sg_conntrack").batch_items()
                if k.ep_id == ep_id and e.state == abi.CT_NEW})


def allowance_under_flood(seconds: float, pps: int, ct_max: int, allowance: int,
                          tag: str) -> Dict[str, Any]:
    """Instances A and B (TCP servers on port 80, allowed from
    198.18.0.0/15) and a client on one bridge, bound in workload mode with
    ``allowance``. While forged SYNs flood A for ``seconds``: connections
    held to A and B exchange data every 50 ms, and new connections to A and
    B are opened and closed in turn. A's half-open connections are counted
    when the flood is over (``half_open_after``: a quiet table) and twice a
    second during it (``half_open_peak``: a walk of a table that changes
    under it, which can count an evicted entry and its successor both).
    Everything is removed at the end."""
    topo = Topology(tag, ["a", "b", "cli"])
    servers = Servers()
    tmp = tempfile.mkdtemp(prefix="sgctl-flood-")
    dp = Dataplane(pin_dir=f"/sys/fs/bpf/sgfl{tag}", ct_max=ct_max)
    rc = Reconciler(dp, tmp)
    try:
        inst = topo.instances
        for name in ("a", "b"):
            servers.tcp(inst[name], 80)
        rc.converge(load_document({
            "sgctl": 1,
            "groups": {"sg-web": {"name": "web", "ingress": [
                {"proto": "tcp", "ports": 80, "from": "198.18.0.0/15"}]},
                "sg-cli": {"name": "cli"}},
            "interfaces": {f"eni-{n}": {"groups": ["sg-cli" if n == "cli" else "sg-web"],
                                        "ipv4": [i.ip4], "ipv6": [i.ip6], "device": i.host_dev}
                           for n, i in inst.items()},
            "settings": {"conntrack_allowance": allowance}}))
        ep_a = rc.applied().endpoints["eni-a"].ep_id
        a, b, cli = inst["a"], inst["b"], inst["cli"]
        held = {"a": cli.tcp_connect(a.ip4, 80), "b": cli.tcp_connect(b.ip4, 80)}
        if None in held.values():
            raise RuntimeError("no connection before the flood")
        stop = threading.Event()
        lost: List[str] = []
        tries: Dict[str, List[bool]] = {"a": [], "b": []}
        peak = [0]

        def keep_talking() -> None:
            while not stop.is_set():
                for name, s in held.items():
                    if s is not None and not echo_ok(s):
                        lost.append(name)
                stop.wait(0.05)

        def connect_new() -> None:
            i = 0
            while not stop.is_set():
                name = "ab"[i % 2]
                tries[name].append(cli.can_tcp(inst[name].ip4, 80))
                i += 1
                stop.wait(0.02)

        def count() -> None:
            while not stop.wait(0.5):
                peak[0] = max(peak[0], _half_open(dp, ep_a))

        workers = [threading.Thread(target=f, daemon=True)
                   for f in (keep_talking, connect_new, count)]
        for w in workers:
            w.start()
        try:
            with SynFlood(topo.bridge, a.mac, a.ip4, 80) as flood:
                start = time.monotonic()
                sent = flood.run(seconds, pps)
                took = time.monotonic() - start
            time.sleep(0.2)  # the frames in flight are through
            after = _half_open(dp, ep_a)
        finally:
            stop.set()
            for w in workers:
                w.join(5)
            for s in held.values():
                if s is not None:
                    s.close()
        return {"seconds": took, "sent": sent, "pps": sent / took, "ct_max": ct_max,
                "allowance": rc.applied().endpoints["eni-a"].ring[1],
                "half_open_after": after, "half_open_peak": peak[0],
                "evicted": ct_evicted(dp, ep_a), "lost": lost,
                "new": {n: {"tries": len(t), "ok": sum(t)} for n, t in tries.items()}}
    finally:
        servers.close()
        try:
            rc.reset()
        finally:
            topo.close()
            shutil.rmtree(dp.pin_dir, ignore_errors=True)
            shutil.rmtree(tmp, ignore_errors=True)
