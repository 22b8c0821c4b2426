"""Differential test: random rule sets and packet sequences; the kernel
program and the reference evaluator must give the same verdict and reason
for every packet. Fixed seed; SGCTL_DIFF_EXAMPLES raises the count."""

from __future__ import annotations

import os
from typing import Any, Dict, List

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from controller.evaluator import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Evaluator, Packet, addr
from controller.formats import load_document
from tests.harness import KERNEL_CT_MAX

pytestmark = pytest.mark.kernel

EXAMPLES = int(os.environ.get("SGCTL_DIFF_EXAMPLES", "400"))
MIN_PACKETS = int(os.environ.get("SGCTL_DIFF_MIN_PACKETS", "20000"))
PACKETS_PER_EXAMPLE = (40, 70)

LOCAL4, LOCAL6 = addr("198.18.0.10"), addr("2001:db8::10")
REMOTES4 = [addr(a) for a in ("198.18.1.1", "198.18.1.200", "198.18.3.3", "198.19.255.1",
                              "169.254.169.254")]
REMOTES6 = [addr(a) for a in ("2001:db8:1::1", "2001:db8:3::3", "2001:db8:ffff::1")]
# nested so that 198.18.1.1 can sit in more prefixes than the datapath checks (4)
PEERS = ["198.18.1.0/24", "198.18.1.1/32", "198.18.0.0/15", "0.0.0.0/0", "::/0",
         "2001:db8:1::/48", "pl-x", "sg-b", "sg-a", "198.18.1.0/26", "198.18.0.0/16"]
PORTS = [0, 1, 22, 53, 79, 80, 81, 443, 1023, 1024, 65535]
PROTOS = ["tcp", "udp", "icmp", "icmpv6", 47, "all"]
FLAGS = [TCP_SYN, TCP_SYN, TCP_SYN | TCP_ACK, TCP_ACK, TCP_ACK, TCP_FIN | TCP_ACK, TCP_RST,
         TCP_RST | TCP_ACK, TCP_SYN | TCP_FIN]
ICMP_TYPES = {1: [0, 3, 8, 11, 13], 58: [1, 2, 128, 129, 135]}
TIME_STEPS = [0, 0, 0, 0, 1, 5, 11, 29, 31, 61, 200]


@st.composite
def rules(draw: Any) -> List[Dict[str, Any]]:
    out: List[Dict[str, Any]] = []
    seen = set()
    for _ in range(draw(st.integers(0, 6))):
        proto = draw(st.sampled_from(PROTOS))
        rule: Dict[str, Any] = {"proto": proto, "peer": draw(st.sampled_from(PEERS))}
        if proto in ("tcp", "udp"):
            lo = draw(st.sampled_from(PORTS))
            hi = draw(st.sampled_from([p for p in PORTS if p >= lo]))
            rule["ports"] = f"{lo}-{hi}"
        elif proto in ("icmp", "icmpv6"):
            typ = draw(st.sampled_from([-1, 0, 3, 8, 128, 129, 2]))
            rule["type"] = typ
            rule["code"] = -1 if typ == -1 else draw(st.sampled_from([-1, 0, 4]))
        key = tuple(sorted(rule.items(), key=str))
        if key not in seen:
            seen.add(key)
            out.append(rule)
    return out


@st.composite
def policy(draw: Any) -> Dict[str, Any]:
    groups: Dict[str, Any] = {
        "sg-a": {"ingress": draw(rules())},
        "sg-b": {"ingress": draw(rules()), "egress": draw(rules())},
    }
    if draw(st.booleans()):
        groups["sg-a"]["egress"] = draw(rules())  # else: the default world egress
    eni_groups = ["sg-a", "sg-b"] if draw(st.booleans()) else ["sg-a"]
    return {
        "sgctl": 1, "groups": groups,
        "prefix_lists": {"pl-x": {"family": "ipv4", "max_entries": 3,
                                  "entries": draw(st.lists(st.sampled_from(
                                      ["198.18.1.0/25", "198.19.0.0/16", "198.18.3.3/32"]),
                                      unique=True, max_size=3))}},
        "interfaces": {
            "eni-a": {"groups": eni_groups, "ipv4": [str(LOCAL4)], "ipv6": [str(LOCAL6)],
                      "device": "DEV"},
            "eni-b": {"groups": ["sg-b"], "ipv4": ["198.18.3.3"], "ipv6": ["2001:db8:3::3"]},
        },
    }


@st.composite
def packets(draw: Any) -> List[tuple]:
    out: List[tuple] = []
    for _ in range(draw(st.integers(*PACKETS_PER_EXAMPLE))):
        at = draw(st.sampled_from(TIME_STEPS))
        if out and draw(st.integers(0, 9)) == 0:  # an ICMP error about an earlier packet
            _, direction, prev = draw(st.sampled_from(out))
            proto = 1 if prev.family == 4 else 58
            typ = draw(st.sampled_from([3, 11] if proto == 1 else [1, 2, 3]))
            err = Packet(prev.dst, prev.src, proto, icmp_type=typ, icmp_code=0, embedded=prev)
            out.append((at, "ingress" if direction == "egress" else "egress", err))
            continue
        if out and draw(st.integers(0, 2)) == 0:  # the reverse of an earlier packet
            _, direction, prev = draw(st.sampled_from(out))
            if prev.embedded is None:
                rev = prev.reversed()
                if prev.proto == 6:
                    rev = Packet(rev.src, rev.dst, 6, rev.sport, rev.dport,
                                 tcp_flags=draw(st.sampled_from(FLAGS)))
                elif prev.is_echo:
                    rev = Packet(rev.src, rev.dst, prev.proto, ident=prev.ident,
                                 icmp_type={8: 0, 0: 8, 128: 129, 129: 128}[prev.icmp_type])
                out.append((at, "ingress" if direction == "egress" else "egress", rev))
                continue
        v6 = draw(st.integers(0, 3)) == 0
        local = LOCAL6 if v6 else LOCAL4
        remote = draw(st.sampled_from(REMOTES6 if v6 else REMOTES4))
        direction = draw(st.sampled_from(["ingress", "egress"]))
        src, dst = (remote, local) if direction == "ingress" else (local, remote)
        proto = draw(st.sampled_from([6, 6, 17, 17, 58 if v6 else 1, 47]))
        if proto in (6, 17):
            pkt = Packet(src, dst, proto, draw(st.sampled_from(PORTS)),
                         draw(st.sampled_from(PORTS)), tcp_flags=draw(st.sampled_from(FLAGS)))
        elif proto in (1, 58):
            typ = draw(st.sampled_from([t for t in ICMP_TYPES[proto] if t not in (3, 11, 1, 2)]))
            pkt = Packet(src, dst, proto, icmp_type=typ, icmp_code=draw(st.sampled_from([0, 4])),
                         ident=draw(st.sampled_from([1, 2])))
        else:
            pkt = Packet(src, dst, proto)
        out.append((at, direction, pkt))
    return out


def test_kernel_agrees_with_evaluator(kernel, test_devs) -> None:
    counted = {"packets": 0, "examples": 0, "allowed": 0, "reasons": set()}

    @seed(20261127)
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(doc=policy(), seq=packets())
    def check(doc: Dict[str, Any], seq: List[tuple]) -> None:
        doc["interfaces"]["eni-a"]["device"] = test_devs[0]
        state = load_document(doc)
        kernel.flush()
        kernel.apply(state)
        now = {"t": 1000}
        oracle = Evaluator(state, clock=lambda: now["t"], ct_max=KERNEL_CT_MAX)
        for i, (at, direction, pkt) in enumerate(seq):
            now["t"] += at
            kernel.set_clock(now["t"])
            want = oracle.packet("eni-a", direction, pkt)
            got = kernel.run("eni-a", direction, pkt)
            assert got == want.reason, (f"packet {i} {direction} {pkt}: kernel {got.name}, "
                                        f"evaluator {want.reason.name}")
            counted["packets"] += 1
            counted["allowed"] += got.allowed
            counted["reasons"].add(got.name)
        counted["examples"] += 1

    check()
    print(f"\ndifferential: {counted['examples']} rule sets, {counted['packets']} packets, "
          f"{counted['allowed']} allowed, reasons seen: {sorted(counted['reasons'])}")
    assert counted["packets"] >= MIN_PACKETS
    assert {"ALLOW_NEW", "ALLOW_ESTABLISHED", "ALLOW_UNTRACKED", "ALLOW_RELATED",
            "DROP_NO_RULE"} <= counted["reasons"]
