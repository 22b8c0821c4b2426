"""Packets per second through a device, and TCP under a flood.

A generator XDP program returning XDP_TX is run with
BPF_F_TEST_XDP_LIVE_FRAMES on veth end A (root namespace): every run sends
one real frame out of A into its peer B, which sits in a namespace and is
the device under test. B carries one of:

- ``xdp_drop`` / ``xdp_pass``: a bare program (the physical limit here);
- ``sgctl``: sgctl's XDP program, B bound in host mode with N ingress rules;
- ``iptables``: an XDP_PASS stub (veth needs one to take XDP frames), then
  the INPUT chain: conntrack ESTABLISHED accept, N rules, drop;
- ``nftables``: the same stub, then an inet table with conntrack, the N
  rules as one interval set of (address . port range), drop.

Traffic: ``denied`` (a SYN no rule allows), ``allowed`` (replies of a flow
B opened) and ``new`` (SYNs each of a new flow, allowed by a rule: the
generator of tools/synflood.py rewrites every frame's source; each filter
tracks them in its conntrack). The processed rate is what B's filter counted
divided by the generator's wall time. Everything lives in its own namespace, veth pair and pins, and is
removed at the end; no address outside 198.18.0.0/15 is used.
"""

from __future__ import annotations

import os
import shutil
import socket as so
import tempfile
import time
from typing import Any, Dict, List

from pyroute2 import NetNS
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from controller import abi
from controller.kernel import bpfsys
from controller.kernel.conntrack import datapath_now
from controller.kernel.counters import endpoint_counters
from controller.kernel.dataplane import Dataplane
from controller.policy.formats import load_document
from controller.reconcile.converge import Reconciler
from controller.reconcile.plan import Device
from controller.tools.bench.rulesets import iptables_rules, nft_elements, nft_rules, rules, sh
from controller.tools.synflood import generator
from controller.tools.topology import XDP_DRV

RX_IP, TX_IP = "198.18.5.2", "198.18.5.1"
FLOOD_SRC = "198.19.200.1"  # no rule mentions it
NEW_SRC, NEW_PORT = "10.200.0.0", 80  # new flows: sources in this /16, one rule allows them
NEW_RULE = {"proto": "tcp", "ports": NEW_PORT, "from": f"{NEW_SRC}/16"}
BATCH = 500_000  # frames per generator run at most: a run has a set-up cost (1.5 Mpps in
# runs of 50k frames against 4.4 in one run of 2M, bare XDP_DROP here); the clock is read
# between runs, so each run is sized from the last one to end by the deadline
FIRST_BATCH = 20_000  # (a slow filter slows the generator too: 500k frames took 7 s)
MIN_BATCH = 2_000

BARE = """
BPF_PERCPU_ARRAY(cnt, u64, 1);
int xdp_drop(struct xdp_md *ctx) { int k = 0; u64 *v = cnt.lookup(&k); if (v) (*v)++;
                                   return XDP_DROP; }
int xdp_pass(struct xdp_md *ctx) { int k = 0; u64 *v = cnt.lookup(&k); if (v) (*v)++;
                                   return XDP_PASS; }
int xdp_tx(struct xdp_md *ctx) { return XDP_TX; }
"""


class DeviceBench:
    def __init__(self) -> None:
        from bcc import BPF

        tag = f"{os.getpid() % 100000}"
        self.ns, self.a, self.b = f"sgdv{tag}", f"sgdva{tag}", f"sgdvb{tag}"
        self.tmp = tempfile.mkdtemp(prefix="sgctl-dev-")
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.a, "type", "veth", "peer", "name", self.b)
        self.b_idx = int(open(f"/sys/class/net/{self.b}/ifindex").read())
        sh("ip", "link", "set", self.b, "netns", self.ns)
        ex = ("ip", "netns", "exec", self.ns)
        sh(*ex, "ip", "link", "set", "lo", "up")
        sh(*ex, "ip", "addr", "add", f"{RX_IP}/24", "dev", self.b)
        sh(*ex, "ip", "link", "set", self.b, "up")
        sh("ip", "addr", "add", f"{TX_IP}/24", "dev", self.a)
        sh("ip", "link", "set", self.a, "up")
        with NetNS(self.ns) as n:
            found = n.link_lookup(ifname=self.b)
            assert found and found[0] == self.b_idx, "ifindex changed with the namespace"
            self.b_mac = n.get_links(self.b_idx)[0].get_attr("IFLA_ADDRESS")
        self.a_idx = int(open(f"/sys/class/net/{self.a}/ifindex").read())
        self.bare = BPF(text=BARE)
        self.fns = {n: self.bare.load_func(n.encode(), BPF.XDP)
                    for n in ("xdp_drop", "xdp_pass", "xdp_tx")}
        self.gen_bpf, self.fns["new"], _ = generator(NEW_SRC)
        self.dp = Dataplane(pin_dir=f"/sys/fs/bpf/sgdv{tag}", ct_max=1 << 16)
        self.rc = Reconciler(self.dp, self.tmp)
        self.rules: List[Dict[str, Any]] = []

    # ------------------------------------------------------------ B's filter

    def set_xdp(self, fd: int) -> None:
        with NetNS(self.ns) as n:
            n.link("set", index=self.b_idx, xdp={"attrs": [("IFLA_XDP_FD", fd),
                                                           ("IFLA_XDP_FLAGS", XDP_DRV)]})

    def clear_filters(self) -> None:
        self.set_xdp(-1)
        sh("ip", "netns", "exec", self.ns, "iptables", "-F", "INPUT", check=False)
        sh("ip", "netns", "exec", self.ns, "nft", "delete", "table", "inet", "sgbench",
           check=False)
        sh("ip", "netns", "exec", self.ns, "conntrack", "-F", check=False)

    def use(self, kind: str, n_rules: int = 10) -> float:
        """Install filter ``kind`` on B; returns seconds it took to load the rules."""
        self.clear_filters()
        self.rules = rules(n_rules) + [NEW_RULE]
        start = time.monotonic()
        if kind in ("xdp_drop", "xdp_pass"):
            self._zero_bare()
            self.set_xdp(self.fns[kind].fd)
        elif kind == "sgctl":
            self._bind_sgctl(n_rules)
            self.set_xdp(self.dp.programs().xdp_fd)
        elif kind == "iptables":
            sh("ip", "netns", "exec", self.ns, "iptables-restore", "--noflush",
               inp=iptables_rules(self.rules, self.b))
            self.set_xdp(self.fns["xdp_pass"].fd)
        elif kind == "nftables":
            ex = ("ip", "netns", "exec", self.ns, "nft", "-f", "-")
            sh(*ex, inp=nft_rules(self.b))
            for cmd in nft_elements(self.rules, self.b):
                sh(*ex, inp=cmd)
            self.set_xdp(self.fns["xdp_pass"].fd)
        else:
            raise ValueError(kind)
        return time.monotonic() - start

    def _bind_sgctl(self, n_rules: int) -> None:
        """The device is in another namespace, where the reconciler cannot
        look it up: it is handed the device instead (the bench attaches)."""
        state = load_document({"sgctl": 1, "groups": {"sg-b": {"name": "b",
                                                               "ingress": self.rules}},
                               "interfaces": {"eni-b": {"groups": ["sg-b"], "ipv4": [RX_IP],
                                                        "device": self.b, "mode": "host"}}})
        self.rc.converge(state, attach=False,
                         host={self.b: Device(self.b_idx, abi.ARPHRD_ETHER)})
        ep = self.rc.applied().endpoints["eni-b"]
        assert ep.ep_id == 1, ep  # counted() reads endpoint 1's counters

    def _zero_bare(self) -> None:
        t = self.bare["cnt"]
        t[t.Key(0)] = t.Leaf(*([0] * len(t[t.Key(0)])))  # type: ignore[misc]

    def counted(self, kind: str, what: str) -> int:
        """Packets B's filter handled (``what``: denied or allowed)."""
        if kind in ("xdp_drop", "xdp_pass"):
            t = self.bare["cnt"]
            return int(sum(t[t.Key(0)]))  # type: ignore[arg-type]
        if kind == "sgctl":
            c = endpoint_counters(self.dp, 1)
            key = {"denied": "drop_no_rule", "allowed": "allow_established",
                   "new": "allow_new"}[what]
            return c.get(("ingress", key), (0, 0))[0]
        if kind == "iptables":
            out = sh("ip", "netns", "exec", self.ns, "iptables", "-L", "INPUT", "-v", "-x", "-n").stdout
            rows = [int(ln.split()[0]) for ln in out.splitlines()[2:] if ln.strip()]
            return rows[-1] if what == "denied" else rows[0] if what == "allowed" \
                else sum(rows[1:-1])  # new: accepted by a rule
        out = sh("ip", "netns", "exec", self.ns, "nft", "list", "table", "inet", "sgbench").stdout
        counts = [int(ln.split("packets")[1].split()[0]) for ln in out.splitlines()
                  if "counter packets" in ln]  # extra's rules, then input's: est, set, drop
        return counts[-1] if what == "denied" else counts[-3] if what == "allowed" \
            else sum(counts) - counts[-1] - counts[-3]

    # ------------------------------------------------------------ traffic

    def frame(self, what: str) -> bytes:
        if what == "new":  # the generator gives each frame its own source address and port
            pkt = IP(src=NEW_SRC, dst=RX_IP) / TCP(sport=1024, dport=NEW_PORT, flags="S")
        elif what == "denied":
            pkt = IP(src=FLOOD_SRC, dst=RX_IP) / TCP(sport=40000, dport=5, flags="S")
        else:  # a UDP reply of a flow B opened (tracked by whichever filter is on)
            pkt = IP(src=TX_IP, dst=RX_IP) / UDP(sport=7, dport=33333)
        return bytes(Ether(dst=self.b_mac) / pkt / (b"\0" * 18))

    def open_flow(self, kind: str) -> None:
        """B sends one datagram to A's port 7 so the flood is its replies.
        (sgctl's tc program is not attached in B's namespace, and test runs
        resolve ifindexes in ours: the flow's entry is written as the tc
        program would have written it.)"""
        if kind == "sgctl":

            k = abi.CtKey(ep_id=1, family=4, proto=17, lport=so.htons(33333), rport=so.htons(7))
            k.local = abi.addr_words(so.inet_aton(RX_IP))
            k.remote = abi.addr_words(so.inet_aton(TX_IP))
            self.dp.map("sg_conntrack").update(k, abi.CtEntry(
                last_seen=datapath_now(self.dp), state=abi.CT_STREAM, origin=abi.DIR_EGRESS))
            return
        sh("ip", "netns", "exec", self.ns, "python3", "-c",
           "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
           f"s.bind(('{RX_IP}', 33333)); s.sendto(b'x', ('{TX_IP}', 7))")
        time.sleep(0.05)

    def rate(self, kind: str, what: str, packets: int, seconds: float) -> float:
        """Packets/s B's filter processed while the generator sent up to
        ``packets`` frames, in batches, for at most ``seconds`` (a slow
        filter is measured for as long as a fast one, not for longer)."""
        if what == "allowed":
            self.open_flow(kind)
        before = self.counted(kind, what)
        gen = self.fns["new" if what == "new" else "xdp_tx"]
        frame = self.frame(what)
        start = time.monotonic()
        sent, n = 0, FIRST_BATCH
        while sent < packets:
            t0 = time.monotonic()
            left = seconds - (t0 - start)
            if left <= 0:
                break
            n = min(n, packets - sent)
            bpfsys.test_run(gen.fd, frame, self.a_idx, True, repeat=n, live=True)
            sent += n
            per_frame = max(time.monotonic() - t0, 1e-6) / n
            n = int(min(BATCH, max(MIN_BATCH, (left - n * per_frame) / per_frame)))
        elapsed = time.monotonic() - start
        time.sleep(0.05)
        return (self.counted(kind, what) - before) / elapsed

    def close(self) -> None:
        try:
            self.clear_filters()
        finally:
            self.rc.reset()
            sh("ip", "link", "del", self.a, check=False)
            sh("ip", "netns", "del", self.ns, check=False)
            shutil.rmtree(self.tmp, ignore_errors=True)


def run(packets: int, sizes: List[int], seconds: float = 5.0) -> Dict[str, Any]:
    b = DeviceBench()
    out: Dict[str, Any] = {"packets": packets, "seconds": seconds, "rates": []}
    try:
        for kind in ("xdp_drop", "xdp_pass"):
            b.use(kind)
            what = "denied" if kind == "xdp_drop" else "allowed"
            out["rates"].append({"filter": kind, "rules": 0, "traffic": what,
                                 "pps": b.rate(kind, what, packets, seconds)})
        for n in sizes:
            for kind in ("sgctl", "iptables", "nftables"):
                b.use(kind, n)
                for what in ("denied", "allowed", "new"):
                    out["rates"].append({"filter": kind, "rules": n, "traffic": what,
                                         "pps": b.rate(kind, what, packets, seconds)})
    finally:
        b.close()
    return out
