"""End-to-end: the real `sgctl` CLI enforcing policy on namespaces behind a
bridge, checked with real TCP, UDP and ping traffic."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import pytest
import yaml

from controller.tools.topology import Servers, Topology, echo_ok
from tests.harness import unique

pytestmark = pytest.mark.netns
ROOT = Path(__file__).resolve().parents[2]


class Sgctl:
    def __init__(self) -> None:
        self.pin_dir = f"/sys/fs/bpf/{unique('sge')}"
        self.state_dir = tempfile.mkdtemp(prefix="sgctl-e2e-")
        self.files = Path(self.state_dir) / "inputs"
        self.files.mkdir()
        self.n = 0

    def run(self, *args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "controller.cli", "--pin-dir", self.pin_dir,
               "--state-dir", self.state_dir, "--conntrack-max", "65536", *args]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)

    def apply_text(self, text: str, suffix: str = ".yaml") -> subprocess.CompletedProcess:
        self.n += 1
        path = self.files / f"policy{self.n}{suffix}"
        path.write_text(text)
        return self.run("apply", "-f", str(path))

    def apply(self, doc: Dict[str, Any]) -> None:
        res = self.apply_text(yaml.safe_dump(doc))
        assert res.returncode == 0, res.stderr

    def close(self) -> None:
        self.run("reset")
        shutil.rmtree(self.state_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    t = Topology(unique("")[-5:], ["web", "app", "cli"])
    servers = Servers()
    try:
        web, app, cli = t.instances["web"], t.instances["app"], t.instances["cli"]
        for port in (22, 80, 443, 999, 1000, 2000, 2001):
            servers.tcp(web, port)
        servers.tcp(web, 80, v6=True)
        servers.udp(web, 53)
        servers.tcp(app, 5432)
        servers.udp(app, 53)
        servers.tcp(cli, 7000)
        servers.udp(cli, 5353)
        t.servers = servers  # type: ignore[attr-defined]
        yield t
    finally:
        servers.close()
        t.close()


@pytest.fixture
def sgctl() -> Iterator[Sgctl]:
    s = Sgctl()
    try:
        yield s
    finally:
        s.close()


def enis(topo: Topology, groups: Dict[str, list]) -> Dict[str, Any]:
    out = {}
    for name, gs in groups.items():
        inst = topo.instances[name]
        out[f"eni-{name}"] = {"groups": gs, "ipv4": [inst.ip4], "ipv6": [inst.ip6],
                              "device": inst.host_dev, "mac_address": inst.mac}
    return out


def web_http_only(topo: Topology) -> Dict[str, Any]:
    """web accepts TCP 80 from anywhere; default egress."""
    return {"sgctl": 1, "groups": {"sg-w": {"name": "w", "ingress": [
        {"proto": "tcp", "ports": 80, "from": "0.0.0.0/0"}]}},
        "interfaces": enis(topo, {"web": ["sg-w"]})}


def test_no_policy_everything_flows(topo: Topology) -> None:
    web, cli = topo.instances["web"], topo.instances["cli"]
    assert cli.can_tcp(web.ip4, 80) and cli.ping(web.ip4)


def test_default_group_and_custom_group_defaults(topo: Topology, sgctl: Sgctl) -> None:
    """default group: members reach each other, others cannot get in, egress open.
    A new custom group: no ingress, all egress."""
    web, app, cli = (topo.instances[n] for n in ("web", "app", "cli"))
    sgctl.apply({"sgctl": 1, "groups": {"sg-custom": {"name": "custom"}},
                 "interfaces": {**enis(topo, {"web": [], "app": []}),
                                **enis(topo, {"cli": ["sg-custom"]})}})
    assert app.can_tcp(web.ip4, 80), "default group members reach each other"
    assert web.can_tcp(app.ip4, 5432)
    assert not cli.can_tcp(web.ip4, 80), "non-members are not let in"
    assert not web.can_tcp(cli.ip4, 7000), "custom group: no ingress"
    assert cli.can_tcp(app.ip4, 5432) is False
    assert web.udp_exchange(cli.ip4, 5353) is False


def test_cloudformation_example(topo: Topology, sgctl: Sgctl) -> None:
    web, cli = topo.instances["web"], topo.instances["cli"]
    text = (ROOT / "examples" / "web-stack.yaml").read_text().replace("sgdemo-web", web.host_dev)
    res = sgctl.apply_text(text)
    assert res.returncode == 0, res.stderr
    assert cli.can_tcp(web.ip4, 80)
    assert cli.can_tcp(web.ip6, 80)
    assert not cli.can_tcp(web.ip4, 22)
    assert not cli.ping(web.ip4)
    assert web.can_tcp(cli.ip4, 7000), "default egress: all"
    status = json.loads(sgctl.run("status", "-o", "json").stdout)
    row = status["interfaces"][0]
    assert row["device"] == web.host_dev and row["rules_ingress"] == 4
    assert row["attached"]["tc_filters"] == 1 and row["attached"]["xdp_mode"] in ("driver",
                                                                                   "generic")


def test_stateful_both_directions_and_udp(topo: Topology, sgctl: Sgctl) -> None:
    web, cli = topo.instances["web"], topo.instances["cli"]
    sgctl.apply({"sgctl": 1, "groups": {"sg-w": {"name": "w", "ingress": [
        {"proto": "tcp", "ports": 80, "from": cli.ip4 + "/32"},
        {"proto": "udp", "ports": 53, "from": cli.ip4 + "/32"}],
        "egress": [{"proto": "tcp", "ports": 7000, "to": cli.ip4 + "/32"}]}},
        "interfaces": enis(topo, {"web": ["sg-w"]})})
    assert cli.can_tcp(web.ip4, 80), "ingress rule, replies by conntrack"
    assert web.can_tcp(cli.ip4, 7000), "egress rule, replies by conntrack"
    assert cli.udp_exchange(web.ip4, 53)
    assert not web.udp_exchange(cli.ip4, 5353), "no egress rule for UDP 5353"
    assert not cli.can_tcp(web.ip4, 22)


def test_bulk_transfer_both_ways_v4_v6(topo: Topology, sgctl: Sgctl) -> None:
    """Full-size segments (GSO/paged skbs at tc) pass whole: 2 MB echoed over
    IPv4 and IPv6, nothing dropped as malformed."""
    web, cli = topo.instances["web"], topo.instances["cli"]
    sgctl.apply({"sgctl": 1, "groups": {"sg-w": {"name": "w", "ingress": [
        {"proto": "tcp", "ports": 80, "from": cli.ip4 + "/32"},
        {"proto": "tcp", "ports": 80, "from": cli.ip6 + "/128"}], "egress": []}},
        "interfaces": enis(topo, {"web": ["sg-w"]})})
    blob = bytes(range(256)) * 8192  # 2 MiB
    for dst in (web.ip4, web.ip6):
        s = cli.tcp_connect(dst, 80, timeout=5.0)
        assert s is not None
        try:
            got = bytearray()
            sender = threading.Thread(target=s.sendall, args=(blob,), daemon=True)
            sender.start()
            while len(got) < len(blob):
                chunk = s.recv(1 << 16)
                assert chunk, "connection closed mid-transfer"
                got += chunk
            sender.join(timeout=5)
            assert bytes(got) == blob
        finally:
            s.close()
    counters = json.loads(sgctl.run("status", "-o", "json").stdout)["interfaces"][0]["counters"]
    assert not [k for k in counters if "malformed" in k or "truncated" in k], counters


def test_group_reference_prefix_list_port_edges(topo: Topology, sgctl: Sgctl) -> None:
    web, app, cli = (topo.instances[n] for n in ("web", "app", "cli"))
    sgctl.apply({"sgctl": 1,
                 "prefix_lists": {"pl-cli": {"family": "ipv4", "max_entries": 2,
                                             "entries": [cli.ip4 + "/32"]}},
                 "groups": {
                     "sg-w": {"name": "w", "ingress": [
                         {"proto": "tcp", "ports": 22, "from": "sg-a"},
                         {"proto": "tcp", "ports": 443, "from": "pl-cli"},
                         {"proto": "tcp", "ports": "1000-2000", "from": "0.0.0.0/0"}],
                         "egress": []},
                     "sg-a": {"name": "a", "ingress": []}},
                 "interfaces": enis(topo, {"web": ["sg-w"], "app": ["sg-a"]})})
    assert app.can_tcp(web.ip4, 22), "member of the referenced group"
    assert not cli.can_tcp(web.ip4, 22), "not a member"
    assert cli.can_tcp(web.ip4, 443) and not app.can_tcp(web.ip4, 443), "prefix list"
    edges = {p: cli.can_tcp(web.ip4, p) for p in (999, 1000, 2000, 2001)}
    assert edges == {999: False, 1000: True, 2000: True, 2001: False}


def test_icmp_type_code_and_ipv6(topo: Topology, sgctl: Sgctl) -> None:
    web, cli = topo.instances["web"], topo.instances["cli"]
    sgctl.apply({"sgctl": 1, "groups": {"sg-w": {"name": "w", "ingress": [
        {"proto": "icmp", "type": 8, "code": 0, "from": "0.0.0.0/0"},
        {"proto": "tcp", "ports": 80, "from": "2001:db8::/64"}], "egress": []}},
        "interfaces": enis(topo, {"web": ["sg-w"]})})
    assert cli.ping(web.ip4), "echo request allowed, reply by conntrack"
    assert not cli.ping(web.ip6), "no ICMPv6 rule"
    assert cli.can_tcp(web.ip6, 80), "IPv6 rule (neighbour discovery exempt)"
    assert not cli.can_tcp(web.ip4, 80), "IPv6 peer never matches IPv4"


def test_two_groups_union(topo: Topology, sgctl: Sgctl) -> None:
    web, cli = topo.instances["web"], topo.instances["cli"]
    sgctl.apply({"sgctl": 1, "groups": {
        "sg-x": {"name": "x", "ingress": [{"proto": "tcp", "ports": 80, "from": "0.0.0.0/0"}]},
        "sg-y": {"name": "y", "ingress": [{"proto": "tcp", "ports": 443, "from": "0.0.0.0/0"}]}},
        "interfaces": enis(topo, {"web": ["sg-x", "sg-y"]})})
    assert cli.can_tcp(web.ip4, 80) and cli.can_tcp(web.ip4, 443)
    assert not cli.can_tcp(web.ip4, 22)


def test_rule_removal_tracked_vs_untracked(topo: Topology, sgctl: Sgctl) -> None:
    """Tracked connections survive the rule's removal; untracked flows stop at once."""
    web, cli = topo.instances["web"], topo.instances["cli"]
    base = {"proto": "tcp", "ports": 443, "from": cli.ip4 + "/32"}  # tracked (not world)
    world = {"proto": "tcp", "ports": 80, "from": "0.0.0.0/0"}  # untracked with default egress
    sgctl.apply({"sgctl": 1, "groups": {"sg-w": {"name": "w", "ingress": [base, world]}},
                 "interfaces": enis(topo, {"web": ["sg-w"]})})
    tracked = cli.tcp_connect(web.ip4, 443)
    untracked = cli.tcp_connect(web.ip4, 80)
    assert tracked is not None and untracked is not None
    assert echo_ok(tracked) and echo_ok(untracked)
    sgctl.apply({"sgctl": 1, "groups": {"sg-w": {"name": "w", "ingress": []}},
                 "interfaces": enis(topo, {"web": ["sg-w"]})})
    try:
        assert echo_ok(tracked), "tracked connection survives"
        untracked.settimeout(1.0)
        assert not echo_ok(untracked), "untracked flow stops at once"
        assert not cli.can_tcp(web.ip4, 443), "new connections are judged by the new rules"
    finally:
        tracked.close()
        untracked.close()


def test_revalidate_cuts_connections_the_new_policy_would_not_open(topo: Topology,
                                                                   sgctl: Sgctl) -> None:
    """The revalidate option, per interface: on a policy change, tracked
    connections the new rules would not let open are cut; the others live
    on. Without the option (test above) they all survive."""
    web, cli = topo.instances["web"], topo.instances["cli"]
    keep = {"proto": "tcp", "ports": 22, "from": cli.ip4 + "/32"}
    cut = {"proto": "tcp", "ports": 443, "from": cli.ip4 + "/32"}
    interfaces = enis(topo, {"web": ["sg-w"]})
    for eni in interfaces.values():
        eni["revalidate"] = True
    sgctl.apply({"sgctl": 1, "groups": {"sg-w": {"name": "w", "ingress": [keep, cut]}},
                 "interfaces": interfaces})
    kept, doomed = cli.tcp_connect(web.ip4, 22), cli.tcp_connect(web.ip4, 443)
    assert kept is not None and doomed is not None
    try:
        assert echo_ok(kept) and echo_ok(doomed)
        res = sgctl.apply_text(yaml.safe_dump({"sgctl": 1, "interfaces": interfaces, "groups": {
            "sg-w": {"name": "w", "ingress": [keep]}}}))
        assert res.returncode == 0 and "revalidate: cut 1 connections" in res.stdout, res

        assert echo_ok(kept), "a connection the new policy allows survives"
        doomed.settimeout(1.0)
        assert not echo_ok(doomed), "a connection it would not allow is cut"
    finally:
        kept.close()
        doomed.close()


def test_host_mode(topo: Topology, sgctl: Sgctl) -> None:
    """The root namespace as the instance, on its own veth end (host mode)."""
    tag = unique("")[-5:]
    host_if, peer_ns = f"sgH{tag}", f"sgnH{tag}"
    from controller.tools.topology import Instance, Servers, sh

    sh("ip", "netns", "add", peer_ns)
    servers = Servers()
    try:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", peer_ns)
        sh("ip", "addr", "add", "198.19.77.1/30", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        ex = ("ip", "netns", "exec", peer_ns)
        sh(*ex, "ip", "addr", "add", "198.19.77.2/30", "dev", "eth0")
        sh(*ex, "ip", "link", "set", "eth0", "up")
        sh(*ex, "ip", "link", "set", "lo", "up")
        outside = Instance(peer_ns, "", "198.19.77.2", "")
        servers.tcp(outside, 7100)
        # a listener in the root namespace, on the host's own address only
        import socket
        import threading

        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("198.19.77.1", 7200))
        ls.listen(8)
        ls.settimeout(0.2)
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                try:
                    c, _ = ls.accept()
                    c.settimeout(1)
                    c.sendall(c.recv(100))
                    c.close()
                except OSError:
                    continue

        threading.Thread(target=serve, daemon=True).start()
        sgctl.apply({"sgctl": 1, "groups": {"sg-h": {"name": "h", "ingress": [
            {"proto": "tcp", "ports": 7200, "from": "198.19.77.2/32"}],
            "egress": [{"proto": "tcp", "ports": 7100, "to": "198.19.77.0/30"}]}},
            "interfaces": {"eni-host": {"groups": ["sg-h"], "ipv4": ["198.19.77.1"],
                                        "device": host_if, "mode": "host"}}})
        assert outside.can_tcp("198.19.77.1", 7200), "host ingress allowed by rule"
        s = socket.create_connection(("198.19.77.2", 7100), timeout=1)
        assert echo_ok(s), "host egress allowed by rule"
        s.close()
        sgctl.apply({"sgctl": 1, "groups": {"sg-h": {"name": "h", "ingress": [], "egress": []}},
                     "interfaces": {"eni-host": {"groups": ["sg-h"], "ipv4": ["198.19.77.1"],
                                                 "device": host_if, "mode": "host"}}})
        assert not outside.can_tcp("198.19.77.1", 7200)
        try:
            socket.create_connection(("198.19.77.2", 7100), timeout=1).close()
            raise AssertionError("host egress should be denied")
        except OSError:
            pass
        stop.set()
        ls.close()
    finally:
        servers.close()
        sh("ip", "link", "del", host_if, check=False)
        sh("ip", "netns", "del", peer_ns, check=False)


def test_bad_file_keeps_old_policy(topo: Topology, sgctl: Sgctl) -> None:
    web, cli = topo.instances["web"], topo.instances["cli"]
    good = web_http_only(topo)
    sgctl.apply(good)
    before = sgctl.run("status", "-o", "json").stdout
    bad = yaml.safe_dump(good).replace("ports: 80", "ports: 80-70000")
    res = sgctl.apply_text(bad)
    assert res.returncode == 2
    assert "sg-w ingress[0]" in res.stderr and "ToPort" in res.stderr and "70000" in res.stderr
    res = sgctl.apply_text("groups: [unclosed")
    assert res.returncode == 2 and "not valid YAML" in res.stderr
    assert cli.can_tcp(web.ip4, 80) and not cli.can_tcp(web.ip4, 22)
    after = sgctl.run("status", "-o", "json").stdout
    assert json.loads(after)["policies"] == json.loads(before)["policies"]


def test_foreign_xdp_program_is_not_replaced(topo: Topology, sgctl: Sgctl) -> None:
    """A device held by someone else's XDP program: apply fails, nothing changes."""
    from bcc import BPF
    from pyroute2 import IPRoute

    web, cli = topo.instances["web"], topo.instances["cli"]
    good = web_http_only(topo)
    sgctl.apply(good)
    before = json.loads(sgctl.run("status", "-o", "json").stdout)["policies"]
    prog = BPF(text=b"int pass_all(struct xdp_md *c) { return XDP_PASS; }")
    fn = prog.load_func(b"pass_all", BPF.XDP)
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=cli.host_dev)[0]
        ipr.link("set", index=idx, xdp={"attrs": [("IFLA_XDP_FD", fn.fd), ("IFLA_XDP_FLAGS", 2)]})
    try:
        both = {**good, "interfaces": enis(topo, {"web": ["sg-w"], "cli": ["sg-w"]})}
        both["groups"]["sg-w"]["ingress"].append({"proto": "tcp", "ports": 22, "from": "0.0.0.0/0"})
        res = sgctl.apply_text(yaml.safe_dump(both))
        assert res.returncode == 1 and "did not attach" in res.stderr
        assert json.loads(sgctl.run("status", "-o", "json").stdout)["policies"] == before
        assert not cli.can_tcp(web.ip4, 22), "the old policy is still enforced"
    finally:
        with IPRoute() as ipr:
            ipr.link("set", index=idx, xdp={"attrs": [("IFLA_XDP_FD", -1),
                                                      ("IFLA_XDP_FLAGS", 2)]})


# --------------------------------------------------------------------------- forged frames (1.3, 1.6)
# A hostile instance (cli) sends frames it builds itself from inside its own
# namespace; what arrives is checked at the receiver (web): sockets, raw
# sockets, its neighbour table.

class Receiver:
    """A socket inside an instance that records what arrives."""

    def __init__(self, inst, family: int, kind: int, proto: int = 0,
                 port: Optional[int] = None) -> None:
        import socket

        with inst.inside():
            self.sock = socket.socket(family, kind, proto)
        if port is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            self.sock.bind(("0.0.0.0", port))
        self.sock.settimeout(0.05)

    def got(self, marker: bytes, wait: float = 1.0) -> bool:
        import time

        end = time.monotonic() + wait
        while time.monotonic() < end:
            try:
                if marker in self.sock.recv(2048):
                    return True
            except OSError:
                continue
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def checked() -> Iterator[Sgctl]:
    """One dataplane for the forged-frame tests (they only re-apply policies):
    the programs are compiled once, not once per test."""
    s = Sgctl()
    try:
        yield s
    finally:
        s.close()


def send_frames(inst, *frames) -> None:  # type: ignore[no-untyped-def]
    """Frames built with scapy, written as they are onto the instance's eth0."""
    import socket

    with inst.inside():
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        s.bind(("eth0", 0))
    try:
        for f in frames:
            s.send(bytes(f))
    finally:
        s.close()


def spoof_policy(topo: Topology, cli_check: bool = True) -> Dict[str, Any]:
    """web (db) takes udp/7777 and tcp/80 only from sg-app; app is in sg-app,
    cli is not. cli's SourceDestCheck as given."""
    doc = {"sgctl": 1, "groups": {
        "sg-db": {"name": "db", "ingress": [
            {"proto": "udp", "ports": 7777, "from": "sg-app"},
            {"proto": "tcp", "ports": 80, "from": "0.0.0.0/0"}]},
        "sg-app": {"name": "app"}, "sg-cli": {"name": "cli"}},
        "interfaces": enis(topo, {"web": ["sg-db"], "app": ["sg-app"], "cli": ["sg-cli"]})}
    doc["interfaces"]["eni-cli"]["source_dest_check"] = cli_check
    return doc


def test_forged_member_source_is_dropped_unless_the_check_is_off(topo: Topology,
                                                                  checked: Sgctl) -> None:
    """A group reference is only as strong as the source address: cli forging
    app's address reaches web's udp/7777 only when cli's SourceDestCheck is off."""
    import socket

    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    from controller.tools.topology import sh

    web, app, cli = (topo.instances[n] for n in ("web", "app", "cli"))
    rx = Receiver(web, socket.AF_INET, socket.SOCK_DGRAM, port=7777)
    try:
        checked.apply(spoof_policy(topo))

        def forged(marker: bytes) -> Any:
            return (Ether(src=cli.mac, dst=web.mac) / IP(src=app.ip4, dst=web.ip4) /
                    UDP(sport=4444, dport=7777) / marker)

        send_frames(app, Ether(src=app.mac, dst=web.mac) / IP(src=app.ip4, dst=web.ip4) /
                    UDP(sport=4444, dport=7777) / b"from-app")
        assert rx.got(b"from-app"), "the member itself gets through"
        send_frames(cli, forged(b"forged-1"))
        assert not rx.got(b"forged-1"), "a forged member address was delivered"
        status = json.loads(checked.run("status", "-o", "json").stdout)
        row = next(r for r in status["interfaces"] if r["device"] == cli.host_dev)
        assert row["counters"]["egress/drop_src_spoof"]["packets"] >= 1, row["counters"]
        # app's MAC from cli's port: dropped before the bridge could learn it there
        send_frames(cli, Ether(src=app.mac, dst=web.mac) / IP(src=cli.ip4, dst=web.ip4) /
                    UDP(sport=4444, dport=7777) / b"forged-mac")
        assert not rx.got(b"forged-mac")
        fdb = sh("bridge", "fdb", "show", "dev", cli.host_dev).stdout
        assert app.mac not in fdb, f"the bridge learned app's MAC on cli's port: {fdb}"
        checked.apply(spoof_policy(topo, cli_check=False))
        send_frames(cli, forged(b"forged-2"))
        assert rx.got(b"forged-2"), "with SourceDestCheck off the forged source is delivered"
    finally:
        rx.close()


def test_forged_exempt_source_and_ipv4_protocol_58_are_judged_by_the_rules(
        topo: Topology, checked: Sgctl) -> None:
    """A packet *from* 169.254.169.254 is not exempt (cli's own check is off
    here, so only web's rules stand in the way); nor is an IPv4 packet of
    protocol 58 whose first byte says "neighbour solicitation"."""
    import socket

    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    web, cli = topo.instances["web"], topo.instances["cli"]
    udp = Receiver(web, socket.AF_INET, socket.SOCK_DGRAM, port=7777)
    raw58 = Receiver(web, socket.AF_INET, socket.SOCK_RAW, 58)
    try:
        checked.apply(spoof_policy(topo, cli_check=False))
        send_frames(cli, Ether(src=cli.mac, dst=web.mac) /
                    IP(src="169.254.169.254", dst=web.ip4) / UDP(sport=80, dport=7777) /
                    b"exempt-src")
        assert not udp.got(b"exempt-src"), "a forged metadata source was delivered"
        send_frames(cli, Ether(src=cli.mac, dst=web.mac) / IP(src=cli.ip4, dst=web.ip4, proto=58) /
                    Raw(bytes([135, 0, 0, 0]) + b"\0" * 4 + b"proto58-as-nd"))
        assert not raw58.got(b"proto58-as-nd"), "IPv4 protocol 58 passed as neighbour discovery"
        checked.apply({"sgctl": 1, "groups": {}, "interfaces": {}})  # the control: no filter
        send_frames(cli, Ether(src=cli.mac, dst=web.mac) / IP(src=cli.ip4, dst=web.ip4, proto=58) /
                    Raw(bytes([135, 0, 0, 0]) + b"\0" * 4 + b"proto58-open"))
        assert raw58.got(b"proto58-open"), "the raw socket sees protocol 58 without sgctl"
    finally:
        udp.close()
        raw58.close()


def test_rogue_dhcp_offer_is_dropped(topo: Topology, checked: Sgctl) -> None:
    """A DHCP "server" on the bridge (cli) cannot reach web's client port
    unless web asked; web's own request opens the way for the answer."""
    import socket

    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    web, cli = topo.instances["web"], topo.instances["cli"]
    rx = Receiver(web, socket.AF_INET, socket.SOCK_DGRAM, port=68)
    try:
        checked.apply(spoof_policy(topo))
        offer = (Ether(src=cli.mac, dst="ff:ff:ff:ff:ff:ff") /
                 IP(src=cli.ip4, dst="255.255.255.255") / UDP(sport=67, dport=68))
        send_frames(cli, offer / b"rogue-offer")
        assert not rx.got(b"rogue-offer"), "an offer nobody asked for was delivered"
        send_frames(web, Ether(src=web.mac, dst="ff:ff:ff:ff:ff:ff") /
                    IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67) /
                    b"discover")
        send_frames(cli, offer / b"answered-offer")
        assert rx.got(b"answered-offer"), "the answer to web's own request"
    finally:
        rx.close()


def test_forged_arp_does_not_poison_a_neighbour(topo: Topology, checked: Sgctl) -> None:
    """cli claims app's address in an ARP reply to web: web's neighbour entry
    for app keeps app's MAC (and takes cli's once cli's check is off)."""
    from scapy.layers.l2 import ARP, Ether

    from controller.tools.topology import sh

    web, app, cli = (topo.instances[n] for n in ("web", "app", "cli"))
    ex = ("ip", "netns", "exec", web.ns)

    def web_thinks_app_is_at() -> str:
        out = sh(*ex, "ip", "neigh", "show", app.ip4, "dev", "eth0").stdout.split()
        return out[out.index("lladdr") + 1] if "lladdr" in out else ""

    claim = (Ether(src=cli.mac, dst=web.mac) /
             ARP(op=2, hwsrc=cli.mac, psrc=app.ip4, hwdst=web.mac, pdst=web.ip4))
    checked.apply(spoof_policy(topo))
    sh(*ex, "ip", "neigh", "replace", app.ip4, "lladdr", app.mac, "dev", "eth0", "nud", "stale")
    try:
        time.sleep(1.2)  # past the neighbour's locktime (1 s): a claim would now be taken
        send_frames(cli, claim, claim)
        time.sleep(0.2)
        assert web_thinks_app_is_at() == app.mac, "web's neighbour table was poisoned"
        checked.apply(spoof_policy(topo, cli_check=False))
        for _ in range(15):
            send_frames(cli, claim)
            time.sleep(0.2)
            if web_thinks_app_is_at() == cli.mac:
                break
        assert web_thinks_app_is_at() == cli.mac, "the control: the same claim, unchecked, lands"
    finally:
        sh(*ex, "ip", "neigh", "del", app.ip4, "dev", "eth0", check=False)


def test_traffic_to_an_address_the_interface_does_not_have(topo: Topology, checked: Sgctl) -> None:
    """web gives itself 198.18.0.99 (not declared): nothing reaches it there,
    while its declared address still answers."""
    from controller.tools.topology import sh

    web, cli = topo.instances["web"], topo.instances["cli"]
    undeclared = "198.18.0.99"
    sh("ip", "netns", "exec", web.ns, "ip", "addr", "add", f"{undeclared}/32", "dev", "eth0")
    sh("ip", "netns", "exec", cli.ns, "ip", "neigh", "replace", undeclared, "lladdr", web.mac,
       "dev", "eth0")
    try:
        checked.apply(spoof_policy(topo))
        assert cli.can_tcp(web.ip4, 80)
        assert not cli.can_tcp(undeclared, 80), "delivered to an address web gave itself"
        status = json.loads(checked.run("status", "-o", "json").stdout)
        row = next(r for r in status["interfaces"] if r["device"] == web.host_dev)
        assert row["counters"]["ingress/drop_dst_foreign"]["packets"] >= 1, row["counters"]
    finally:
        sh("ip", "netns", "exec", web.ns, "ip", "addr", "del", f"{undeclared}/32", "dev", "eth0",
           check=False)
        sh("ip", "netns", "exec", cli.ns, "ip", "neigh", "del", undeclared, "dev", "eth0",
           check=False)
