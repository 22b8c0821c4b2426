"""TCP throughput with iperf3 between two namespaces on a bridge:
no filter, sgctl (workload mode on the server's host-side veth; also with
flow logs on, which counts every packet in its connection's entry), iptables
and nftables (INPUT of the server's namespace, with conntrack); and the
server's throughput while a denied flood hits its device (sgctl vs the
others, via the live-frames generator on a second veth into the server)."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from typing import Any, Dict

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from controller import abi
from controller.kernel import bpfsys
from controller.kernel.dataplane import Dataplane
from controller.policy.formats import load_document
from controller.reconcile.converge import Reconciler
from controller.tools.bench.device import BARE
from controller.tools.bench.rulesets import iptables_rules, nft_elements, nft_rules, rules, sh
from controller.tools.topology import attach_xdp

SRV, CLI = "198.18.6.2", "198.18.6.3"


class TcpBench:
    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.br, self.srv_ns, self.cli_ns = f"sgtb{tag}", f"sgts{tag}", f"sgtc{tag}"
        self.srv_host, self.cli_host = f"sgtsh{tag}", f"sgtch{tag}"
        self.tmp = tempfile.mkdtemp(prefix="sgctl-tcp-")
        sh("ip", "link", "add", self.br, "type", "bridge")
        sh("ip", "link", "set", self.br, "up")
        for ns, host, ip in ((self.srv_ns, self.srv_host, SRV), (self.cli_ns, self.cli_host, CLI)):
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", host, "master", self.br)
            sh("ip", "link", "set", host, "up")
            ex = ("ip", "netns", "exec", ns)
            sh(*ex, "ip", "link", "set", "lo", "up")
            sh(*ex, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
            sh(*ex, "ip", "link", "set", "eth0", "up")
        self.server = subprocess.Popen(["ip", "netns", "exec", self.srv_ns, "iperf3", "-s"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        self.dp = Dataplane(pin_dir=f"/sys/fs/bpf/sgtb{tag}", ct_max=1 << 16)
        self.rc = Reconciler(self.dp, self.tmp)

    def clear(self) -> None:
        ex = ("ip", "netns", "exec", self.srv_ns)
        sh(*ex, "iptables", "-F", "INPUT", check=False)
        sh(*ex, "nft", "delete", "table", "inet", "sgbench", check=False)
        if os.path.exists(self.dp.pin_dir):
            self.rc.reset()
            self.dp = Dataplane(pin_dir=self.dp.pin_dir, ct_max=1 << 16)
            self.rc = Reconciler(self.dp, self.tmp)

    def use(self, kind: str, n_rules: int) -> None:
        self.clear()
        rs = rules(n_rules) + [{"proto": "tcp", "ports": "5201", "from": f"{CLI}/32"}]
        ex = ("ip", "netns", "exec", self.srv_ns)
        if kind.startswith("sgctl"):
            self.rc.converge(load_document({"sgctl": 1, "groups": {"sg-s": {"name": "s",
                                                                         "ingress": rs}},
                                         "interfaces": {"eni-s": {"groups": ["sg-s"],
                                                                  "ipv4": [SRV],
                                                                  "device": self.srv_host}}}))
            if kind == "sgctl+flowlogs":  # the connection's accounting on every packet
                self.dp.set_config(abi.CFG_FLOW_LOG, abi.CFG_FLOW_LOG, flow_cost_ns=10**5,
                                   flow_burst_ns=10**9)
        elif kind == "iptables":
            sh(*ex, "iptables-restore", "--noflush", inp=iptables_rules(rs, "eth0"))
        elif kind == "nftables":
            sh(*ex, "nft", "-f", "-", inp=nft_rules("eth0"))
            for cmd in nft_elements(rs, "eth0"):
                sh(*ex, "nft", "-f", "-", inp=cmd)

    def throughput(self, seconds: int) -> float:
        """Gbit/s from the client to the server."""
        out = sh("ip", "netns", "exec", self.cli_ns, "iperf3", "-c", SRV, "-t", str(seconds),
                 "-J").stdout
        return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9

    def under_flood(self, seconds: int) -> float:
        """Throughput while a denied flood is sent into the server's host-side
        device (frames the bridge forwards to the server)."""
        from bcc import BPF

        gen = BPF(text=BARE)
        tx = gen.load_func(b"xdp_tx", BPF.XDP)
        tag = f"{os.getpid() % 100000}"
        fa, fb = f"sgtfa{tag}", f"sgtfb{tag}"
        sh("ip", "link", "add", fa, "type", "veth", "peer", "name", fb)
        try:
            sh("ip", "link", "set", fb, "master", self.br)
            for d in (fa, fb):
                sh("ip", "link", "set", d, "up")
            stub = gen.load_func(b"xdp_pass", BPF.XDP)
            attach_xdp(fb, stub.fd)  # veth takes XDP frames only with a program on the peer
            idx = int(open(f"/sys/class/net/{fa}/ifindex").read())
            mac = sh("ip", "netns", "exec", self.srv_ns, "cat", "/sys/class/net/eth0/address").stdout

            frame = bytes(Ether(dst=mac.strip()) / IP(src="198.19.201.1", dst=SRV) /
                          TCP(sport=40000, dport=5, flags="S") / (b"\0" * 18))
            result: Dict[str, float] = {}

            def flood() -> None:
                end = time.monotonic() + seconds + 1
                while time.monotonic() < end:
                    bpfsys.test_run(tx.fd, frame, idx, True, repeat=200_000, live=True)

            t = threading.Thread(target=flood, daemon=True)
            t.start()
            time.sleep(0.3)
            result["gbps"] = self.throughput(seconds)
            t.join()
            return result["gbps"]
        finally:
            sh("ip", "link", "del", fa, check=False)

    def close(self) -> None:
        self.server.terminate()
        self.server.wait()
        try:
            self.clear()
        finally:
            self.rc.reset()
            for link in (self.srv_host, self.cli_host, self.br):
                sh("ip", "link", "del", link, check=False)
            for ns in (self.srv_ns, self.cli_ns):
                sh("ip", "netns", "del", ns, check=False)
            shutil.rmtree(self.tmp, ignore_errors=True)


def run(seconds: int, n_rules: int, flood: bool = True, rounds: int = 1) -> Dict[str, Any]:
    """Each filter ``rounds`` times, the filters interleaved, the median
    reported: single iperf3 runs here vary by a few percent from one run to
    the next, as much as the difference being measured."""
    b = TcpBench()
    kinds = ("none", "sgctl", "sgctl+flowlogs", "iptables", "nftables")
    out: Dict[str, Any] = {"seconds": seconds, "rules": n_rules, "rounds": rounds,
                           "throughput": [], "under_flood": []}
    samples: Dict[str, list] = {k: [] for k in kinds}
    try:
        for _ in range(rounds):
            for kind in kinds:
                b.use(kind, n_rules) if kind != "none" else b.clear()
                samples[kind].append(b.throughput(seconds))
        out["throughput"] = [{"filter": k, "gbps": statistics.median(samples[k]),
                              "samples": samples[k]} for k in kinds]
        if flood:
            for kind in kinds:
                b.use(kind, n_rules) if kind != "none" else b.clear()
                out["under_flood"].append({"filter": kind, "gbps": b.under_flood(seconds)})
    finally:
        b.close()
    return out

