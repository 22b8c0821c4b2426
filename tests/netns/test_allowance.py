"""1.4 allowance through real devices: a flood of forged SYNs into one
instance takes no more than its allowance of the table, and neither the
connections held on both instances nor new ones suffer."""

from __future__ import annotations

import shutil
import tempfile
import threading
from typing import Dict, Iterator, List

import pytest

from controller import abi
from controller.kernel.counters import ct_evicted
from controller.kernel.dataplane import Dataplane
from controller.policy.formats import load_document
from controller.reconcile.converge import Reconciler
from controller.tools.synflood import SynFlood
from tests.harness import unique
from tests.topology import Servers, Topology, echo_ok

CT_MAX = 1 << 15  # a flood of FLOOD_SECONDS * FLOOD_PPS SYNs would fill it several times
ALLOWANCE = 2048
FLOOD_SECONDS, FLOOD_PPS = 6, 40_000


@pytest.fixture
def hosts() -> Iterator[Dict[str, object]]:
    tag = unique("")[-5:]
    topo = Topology(tag, ["a", "b", "cli"])
    servers = Servers()
    tmp = tempfile.mkdtemp(prefix="sgctl-allow-")
    dp = Dataplane(pin_dir=f"/sys/fs/bpf/{unique('sga')}", ct_max=CT_MAX)
    rc = Reconciler(dp, tmp)
    try:
        for name in ("a", "b"):
            servers.tcp(topo.instances[name], 80)
        inst = topo.instances
        rc.converge(load_document({
            "sgctl": 1,
            "groups": {"sg-web": {"name": "web", "ingress": [
                {"proto": "tcp", "ports": 80, "from": "198.18.0.0/15"}]},
                "sg-cli": {"name": "cli"}},
            "interfaces": {
                "eni-a": {"groups": ["sg-web"], "ipv4": [inst["a"].ip4],
                          "ipv6": [inst["a"].ip6], "device": inst["a"].host_dev},
                "eni-b": {"groups": ["sg-web"], "ipv4": [inst["b"].ip4],
                          "ipv6": [inst["b"].ip6], "device": inst["b"].host_dev},
                "eni-cli": {"groups": ["sg-cli"], "ipv4": [inst["cli"].ip4],
                            "ipv6": [inst["cli"].ip6], "device": inst["cli"].host_dev}},
            "settings": {"conntrack_allowance": ALLOWANCE}}))
        yield {"topo": topo, "dp": dp, "rc": rc}
    finally:
        servers.close()
        try:
            rc.reset()
        finally:
            topo.close()
            shutil.rmtree(dp.pin_dir, ignore_errors=True)
            shutil.rmtree(tmp, ignore_errors=True)


def half_open(dp: Dataplane, ep_id: int) -> int:
    return sum(1 for k, e in dp.map("sg_conntrack").batch_items()
               if k.ep_id == ep_id and e.state == abi.CT_NEW)


def test_a_syn_flood_takes_only_its_interfaces_allowance(hosts: Dict[str, object]) -> None:
    topo, dp, rc = hosts["topo"], hosts["dp"], hosts["rc"]
    assert isinstance(topo, Topology) and isinstance(dp, Dataplane)
    assert isinstance(rc, Reconciler)
    a, b, cli = (topo.instances[n] for n in ("a", "b", "cli"))
    ep_a = rc.applied().endpoints["eni-a"].ep_id
    held = {name: cli.tcp_connect(inst.ip4, 80) for name, inst in (("a", a), ("b", b))}
    assert all(s is not None for s in held.values())
    stop = threading.Event()
    lost: List[str] = []
    tries: Dict[str, List[bool]] = {"a": [], "b": []}

    def keep_talking() -> None:  # the held connections, every 50 ms
        while not stop.is_set():
            for name, s in held.items():
                assert s is not None
                if not echo_ok(s):
                    lost.append(name)
            stop.wait(0.05)

    def connect_new() -> None:  # new connections, alternately to A and B
        i = 0
        while not stop.is_set():
            name, inst = (("a", a), ("b", b))[i % 2]
            tries[name].append(cli.can_tcp(inst.ip4, 80))
            i += 1
            stop.wait(0.02)

    workers = [threading.Thread(target=f, daemon=True) for f in (keep_talking, connect_new)]
    for w in workers:
        w.start()
    try:
        with SynFlood(topo.bridge, a.mac, a.ip4, 80) as flood:
            sent = flood.run(FLOOD_SECONDS, FLOOD_PPS)
            during = half_open(dp, ep_a)
    finally:
        stop.set()
        for w in workers:
            w.join(5)
        for s in held.values():
            if s is not None:
                s.close()
    assert sent > 4 * CT_MAX, f"the flood sent only {sent} SYNs"
    assert during <= ALLOWANCE, f"A holds {during} half-open connections"
    assert ct_evicted(dp, ep_a) > sent // 2  # the flood reclaimed its own entries
    assert lost == [], f"held connections lost packets: {lost}"
    rate = {n: sum(t) / max(1, len(t)) for n, t in tries.items()}
    assert len(tries["a"]) > 20 and len(tries["b"]) > 20
    assert rate["b"] >= 0.99, rate
    assert rate["a"] >= 0.90, rate
