"""A flood of TCP SYNs from forged sources into a bridge, for the
conntrack-allowance test and bench.

An XDP program run with live frames (``BPF_F_TEST_XDP_LIVE_FRAMES``) on
one end of a veth pair sends every repeat of one SYN frame out into the
peer, which sits on the bridge; each repeat gets the next source address of
``SRC_SPAN`` in 198.19.0.0/16 (both checksums fixed, so that the target's
TCP stack answers). The rate is bounded by sending in batches of ``BATCH``
frames, paced to ``pps``; a run stops by itself after its seconds.
"""

from __future__ import annotations

import ipaddress
import os
import time
from typing import Any, Optional

from pyroute2 import IPRoute
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from controller.kernel import bpfsys
from controller.tools.bench.rulesets import sh

SRC_BASE = "198.19.0.0"
SRC_SPAN = 1 << 16
BATCH = 4096
XDP_DRV = 4

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
	return XDP_TX;
}

int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }
"""


def _xdp(dev: str, fd: int) -> None:
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=dev)[0]
        ipr.link("set", index=idx, xdp={"attrs": [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", XDP_DRV)]})


class SynFlood:
    """``with SynFlood(bridge, mac, ip, port) as f: f.run(seconds, pps)``"""

    def __init__(self, bridge: str, dst_mac: str, dst_ip: str, dport: int) -> None:
        from bcc import BPF  # compiled here: only the flood needs it

        base = int(ipaddress.ip_address(SRC_BASE))
        self.bpf: Any = BPF(text=GENERATOR, cflags=[f"-DSRC_BASE={base}U",
                                                    f"-DSRC_SPAN={SRC_SPAN}"])
        self.gen = self.bpf.load_func(b"xdp_synflood", BPF.XDP)
        stub = self.bpf.load_func(b"xdp_pass", BPF.XDP)
        tag = f"{os.getpid() % 100000}"
        self.tx, self.peer = f"sgfa{tag}", f"sgfb{tag}"
        sh("ip", "link", "add", self.tx, "type", "veth", "peer", "name", self.peer)
        self.closed = False
        try:
            sh("ip", "link", "set", self.peer, "master", bridge)
            for d in (self.tx, self.peer):
                sh("ip", "link", "set", d, "up")
            _xdp(self.peer, stub.fd)  # a veth takes XDP frames only with a program on the peer
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
